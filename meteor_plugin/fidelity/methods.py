"""The pruning methods the fidelity benchmark compares, as MeteorConfigs at equal budgets.

A budget is the number of visual tokens that reach the language model (of the model's 208), or for
Stage 3 the tokens left after ``llm_layer`` (the convention of METEOR's and FastV's papers); every
method is run at the same budgets and the tokens really kept are read back from ``meteor_plugin.stats``.

| name | what runs | config |
|---|---|---|
| unpruned | nothing pruned | all stages off |
| random | a seeded uniform draw of K tokens per image (several seeds) | ``method="random"`` |
| avgpool | each encoder's grid (8x8, 12x12) average-pooled, K split by token count | ``method="avgpool"`` |
| visionzip | dominant tokens by CLIP attention / ConvNeXt feature norm + merged context | ``method="visionzip"`` |
| drop-clip / drop-convnext | one encoder removed, the other evenly subsampled to K (not run where K exceeds its tokens) | ``method="drop_encoder"`` |
| fastv | last instruction token's attention (all heads) at ``llm_layer``, K fixed; in the bench at every layer (``fastv:<layer>``), read as the frontier over them | ``method="fastv"`` |
| random+pa, visionzip+pa, fastv+pa | the same with proportional attention, as METEOR runs (kept tokens at their unpruned places, each standing for the dropped tokens most like it): at equal cost the comparison isolates the selection. avgpool cannot (its tokens are means over cells, and the cells it drops have no kept token standing for them) | ``proportional_attention="on"`` |
| meteor-s1 | Stage 1 alone: K tokens split across encoders by rank, pruned inside them | ``encoder_keep=K`` |
| meteor-s2 | Stage 2 alone: K tokens by the Stage 2 similarity | ``fusion_keep=K`` |
| meteor-s3 | Stage 3 alone: adaptive, K on average after ``llm_layer`` | ``llm_lambda`` solved |
| meteor-s3-fixed | Stage 3 alone with the same scoring, K for every question (what the adaptive budget must beat) | ``llm_min_keep = llm_max_keep = K`` |
| meteor | all three: Stage 1 to E, Stage 2 to F = 2K, Stage 3 to K on average | see `fusion_share` |
| meteor-fixed | all three, Stage 3 at K for every question (what METEOR's adaptive budget must beat) | the same, ``llm_min_keep = llm_max_keep = K`` |
| meteor:NAME | ``meteor`` with one choice switched (`ABLATIONS`; ``paper``: all of them) | the same |

Every METEOR row runs the config defaults unless told otherwise. Calibration uses the validation split
only: encoder ranks (``calibrate.encoder_ranks``, effective and numerical) and Stage 3's
``llm_lambda``, solved per config so that the mean clipped budget on validation questions equals K
(the test split then shows the budget that really resulted). ``llm_layer`` is chosen on validation
too for METEOR's Stage 3 (unless ``--meteor-set`` pins it); FastV runs at every layer and is read along its
accuracy-vs-FLOPs frontier over them. ``Calibration.meteor`` holds MeteorConfig fields set on
every METEOR run on top of the defaults (the bench's ``--meteor-set``, e.g. the paper's choices for an
ablation); the baselines never take them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import LEGACY
from .model import VISUAL_TOKENS
BUDGETS = (0.5, 0.25, 0.125, 0.0625)
METEOR_TARGET = 0.24  # the paper's setting: 242 of EAGLE's 1024 visual tokens
RANDOM_SEEDS = (0, 1, 2)
BASELINES = ("random", "avgpool", "visionzip", "drop-clip", "drop-convnext", "fastv",
             "random+pa", "visionzip+pa", "fastv+pa")
WITH_PA = "+pa"  # a baseline's name + this: the same selection with proportional attention
FRONTIERS = ("fastv", "fastv+pa")  # run at every layer (``<name>:<layer>``) and read along their frontier
METEOR = ("meteor-s1", "meteor-s2", "meteor-s3", "meteor-s3-fixed", "meteor-fixed", "meteor")
ALL_METHODS = BASELINES + METEOR
# METEOR (all stages) with one choice switched to its alternative: the paper's where ours differs
# (``paper`` switches them all: the method as version 1 of the config ran it). Run as ``meteor:<name>``.
ABLATIONS: Dict[str, Dict[str, Any]] = {
    "numerical-rank": {"rank": "numerical"},  # Stage 1 split by the paper's numerical rank (uniform here)
    "deep-similarity": {"encoder_deep_score": "similarity"},
    "cosine-s2": {"fusion_similarity": "cosine"},
    "centred-s2": {"fusion_similarity": "centred_cosine"},
    "one-head": {"llm_min_heads": 1},
    "mass-budget": {"llm_budget_signal": "mass"},
    "spread-budget": {"llm_budget_signal": "spread"},  # config versions 2-3: tokens covered, not regions
    "all-query": {"text_query": "all"},
    "no-spread-floor": {"spread_floor": 0.0},
    "no-proportional": {"proportional_attention": "off"},  # versions 1-4: compacted positions, no sizes
    "top-selection": {"llm_selection": "top"},  # versions 1-5: Stage 3 keeps the most attended tokens
    "regions-budget": {"llm_budget_signal": "regions"},  # version 4-5's signal
    "own-layer-signal": {"llm_signal_layers": "own"},  # versions 1-5: the signal of Stage 3's layer alone
    "own-layer-scores": {"llm_score_layers": "own"},  # versions 1-5: the tokens chosen by Stage 3's layer alone
    "version-5": {"llm_selection": "top", "llm_budget_signal": "regions", "llm_signal_layers": "own",
                  "llm_score_layers": "own"},
    # Version 1's values of every field added since (llm_lambda aside: the bench solves it per run).
    "paper": {"rank": "numerical", **{k: v for old in sorted(LEGACY, reverse=True) for k, v in LEGACY[old].items()
                                      if k != "llm_lambda"}},  # the oldest version's value of each field wins
}
GLOBAL_KINDS = ("background",)  # any few tokens answer it
TOKEN_KINDS = ("colour", "digit", "count")  # the kinds that need the right tokens (the targets compare these)


def tokens_for(ratio: float, total: int = VISUAL_TOKENS) -> int:
    return max(1, int(round(ratio * total)))


def llm_clip(k: int, entering: int) -> Tuple[int, int]:
    """Stage 3's per-question bounds around an average of ``k``: no question loses its image or takes
    all of it beyond 3x its share."""
    return max(2, k // 4), min(entering, 3 * k)  # 2: a count of 1 is refused as ambiguous (MeteorConfig)


def fusion_share(k: int, total: int = VISUAL_TOKENS) -> Tuple[int, int]:
    """(Stage 1 keep E, Stage 2 keep F) for METEOR with all stages at an average of ``k`` after Stage 3:
    Stage 3 halves what Stages 1-2 pass (F = 2k, at most 3/4 of the tokens), Stage 1 stops halfway
    between all tokens and F, so each stage removes a share (as the paper's 1024 -> ~1200/576 -> 242)."""
    f = min(2 * k, (3 * total) // 4)
    e = (total + f) // 2
    return e, f


@dataclass
class Calibration:
    encoder_ranks: Dict[str, float]
    meteor_layer: int
    fastv_layer: int
    lambdas: Dict[str, float] = field(default_factory=dict)  # "<method>@<k>" -> llm_lambda
    meteor: Dict[str, Any] = field(default_factory=dict)  # MeteorConfig fields of every METEOR run
    numerical_ranks: Optional[Dict[str, float]] = None  # the paper's rank, for the numerical-rank ablation
    # FastV's layers in a bench: ``fastv`` runs at each (``fastv:<layer>``), its accuracy-vs-FLOPs frontier over
    # them; empty: at ``fastv_layer`` alone.
    fastv_layers: Sequence[int] = ()

    def to_dict(self) -> Dict[str, object]:
        return {"encoder_ranks": self.encoder_ranks, "numerical_ranks": self.numerical_ranks,
                "meteor_layer": self.meteor_layer, "fastv_layer": self.fastv_layer, "lambdas": dict(self.lambdas),
                "meteor": dict(self.meteor), "fastv_layers": list(self.fastv_layers)}


def meteor_fields(method: str, cal: Calibration) -> Tuple[str, Dict[str, Any], Dict[str, float]]:
    """(base method, MeteorConfig fields, encoder ranks) of a METEOR method or ``meteor:<ablation>``."""
    name, _, variant = method.partition(":")
    fields, ranks = dict(cal.meteor), cal.meteor.get("encoder_ranks", cal.encoder_ranks)
    if variant:
        change = dict(ABLATIONS[variant])
        if change.pop("rank", None) == "numerical":
            if cal.numerical_ranks is None:
                raise ValueError(f"{method} needs the numerical ranks in the calibration")
            ranks = cal.numerical_ranks
            fields.pop("encoder_ranks", None)
        fields.update(change)
    return name, fields, ranks


def _meteor_run(own: Dict[str, Any], pinned: Dict[str, Any]):
    """A METEOR run's config: what the method and the calibration set (``own``), then the fields every METEOR
    run is given (``pinned``: the bench's ``--meteor-set``, and an ablation's switch), which win."""
    return base().replace(**{**own, **pinned})


def base():
    from ..config import MeteorConfig

    return MeteorConfig(encoder=False, fusion=False, llm=False)


def unpruned():
    return base()


def stage3_fields(k: int, entering: int, layer: int, lam: float) -> dict:
    lo, hi = llm_clip(k, entering)
    return {"llm": True, "llm_layer": layer, "llm_lambda": lam, "llm_min_keep": lo, "llm_max_keep": hi}


def config_for(method: str, k: int, cal: Calibration, seed: int = 0):
    """The MeteorConfig of ``method`` at an average of ``k`` visual tokens (a lambda must already be in
    ``cal.lambdas`` for Stage 3 methods: see `stage3_key` and `solve_lambda`)."""
    name, _, layer = method.partition(":")
    if name.endswith(WITH_PA):
        plain = name[:-len(WITH_PA)] + (f":{layer}" if layer else "")
        return config_for(plain, k, cal, seed).replace(proportional_attention="on")
    b = base()
    if method == "random":
        return b.replace(method="random", fusion_keep=k, seed=seed)
    if method in ("avgpool", "visionzip"):
        return b.replace(method=method, fusion_keep=k)
    if method in ("drop-clip", "drop-convnext"):
        return b.replace(method="drop_encoder", drop_encoder=0 if method == "drop-clip" else 1, fusion_keep=k)
    if method == "fastv" or method.startswith("fastv:"):  # ``fastv:<layer>``: at that layer
        layer = int(method.partition(":")[2] or cal.fastv_layer)
        return b.replace(method="fastv", llm=True, llm_layer=layer, llm_max_keep=k, llm_min_keep=k)
    if method == "meteor-s1":
        return _meteor_run({"encoder": True, "encoder_keep": k, "encoder_ranks": cal.encoder_ranks}, cal.meteor)
    if method == "meteor-s2":
        return _meteor_run({"fusion": True, "fusion_keep": k}, cal.meteor)
    if method == "meteor-s3-fixed":
        return _meteor_run({"llm": True, "llm_layer": cal.meteor_layer, "llm_min_keep": k, "llm_max_keep": k},
                           cal.meteor)
    if method == "meteor-fixed":
        return _stage3_run("meteor", k, cal, {"llm_min_keep": k, "llm_max_keep": k})
    if method in ("meteor-s3", "meteor") or is_ablation(method):
        lam = cal.meteor.get("llm_lambda", cal.lambdas.get(stage3_key(method, k)))
        if lam is None:
            raise KeyError(f"no llm_lambda calibrated for {method} at {k} tokens: run solve_lambda first")
        return _stage3_run(method, k, cal, {"llm_lambda": lam, **_clip_fields(method, k)})
    raise ValueError(f"unknown method {method!r}: allowed {', '.join(ALL_METHODS)}")


def is_ablation(method: str) -> bool:
    name, _, variant = method.partition(":")
    return name == "meteor" and variant in ABLATIONS


def stage3_key(method: str, k: int) -> str:
    return f"{method}@{k}"


def entering_tokens(method: str, k: int) -> int:
    """Visual tokens that reach Stage 3 in ``method`` at an average of ``k`` after it."""
    return fusion_share(k)[1] if method.partition(":")[0] == "meteor" else VISUAL_TOKENS


def _clip_fields(method: str, k: int) -> dict:
    lo, hi = llm_clip(k, entering_tokens(method, k))
    return {"llm_min_keep": lo, "llm_max_keep": hi}


def stage3_probe(method: str, k: int, cal: Calibration):
    """The Stage 3 config with every visual token kept: its forwards record the budget signal (a pinned
    ``llm_lambda`` or clip does not apply to the probe, which must keep everything)."""
    return _stage3_run(method, k, cal, {"llm_lambda": 1.0, "llm_min_keep": 1.0, "llm_max_keep": 1.0}, probe=True)


def _stage3_run(method: str, k: int, cal: Calibration, stage3: Dict[str, Any], probe: bool = False):
    """``meteor-s3``, ``meteor`` or an ablation at ``k``, with Stage 3's ``stage3`` fields (lambda and clip)."""
    name, pinned, ranks = meteor_fields(method, cal)
    own = {**stage3_fields(k, entering_tokens(method, k), cal.meteor_layer, 1.0), **stage3}
    if name == "meteor":
        e, f = fusion_share(k)
        own.update(encoder=True, fusion=True, encoder_keep=e, fusion_keep=f, encoder_ranks=ranks)
    if probe:
        pinned = {key: v for key, v in pinned.items() if key not in stage3}
    return _meteor_run(own, pinned)


def stage3_clip(method: str, k: int, cal: Calibration) -> Tuple[int, int]:
    """Stage 3's per-question bounds of ``method`` at ``k`` (a pinned ``llm_min_keep`` / ``llm_max_keep`` wins),
    as token counts of what enters Stage 3: what ``solve_lambda`` must solve under."""
    from ..core.budget import resolve_budget

    entering = entering_tokens(method, k)
    lo, hi = llm_clip(k, entering)
    pinned = meteor_fields(method, cal)[1]
    lo = resolve_budget(pinned["llm_min_keep"], entering) if "llm_min_keep" in pinned else lo
    hi = resolve_budget(pinned["llm_max_keep"], entering) if "llm_max_keep" in pinned else hi
    return lo, hi


def clipped_mean(masses: Sequence[float], lam: float, lo: int, hi: int) -> float:
    """Mean Stage 3 budget ``clip(round(lam * mass), lo, hi)`` over questions (as ``adaptive_keep``)."""
    m = torch.tensor(list(masses), dtype=torch.float64)
    return float(torch.clamp(torch.floor(m * lam + 0.5), lo, hi).mean())


def solve_lambda(masses: Sequence[float], k: int, entering: int, clip: Optional[Tuple[int, int]] = None) -> float:
    """The llm_lambda whose clipped budgets average ``k`` over ``masses`` (bisection; the mean grows
    with lambda). ``clip``: the per-question bounds (default ``llm_clip(k, entering)``)."""
    lo, hi = clip or llm_clip(k, entering)
    if not masses or max(masses) <= 0:
        raise ValueError("Stage 3 recorded no visual attention mass on the calibration questions")
    a, b = 0.0, 1.0
    while clipped_mean(masses, b, lo, hi) < k and b < 1e9:
        b *= 2
    for _ in range(60):
        mid = (a + b) / 2
        if clipped_mean(masses, mid, lo, hi) < k:
            a = mid
        else:
            b = mid
    return b


def configs(methods: Sequence[str], budgets: Sequence[int], cal: Calibration,
            meteor_extra: Sequence[int] = (), ablations: Sequence[str] = (),
            ablation_budgets: Sequence[int] = ()) -> List[Tuple[str, int, int, object]]:
    """(method, budget, seed, config) for every run, in table order."""
    out: List[Tuple[str, int, int, object]] = [("unpruned", VISUAL_TOKENS, 0, unpruned())]
    for k in budgets:
        for method in methods:
            if k > remaining_tokens(method):
                continue  # dropping the ConvNeXt leaves CLIP's 64 tokens: no run keeps 104 (50%) of them
            if method in FRONTIERS and cal.fastv_layers:  # its frontier: every layer
                out += [(f"{method}:{layer}", k, 0, config_for(f"{method}:{layer}", k, cal)) for layer in cal.fastv_layers]
                continue
            seeds = RANDOM_SEEDS if method.startswith("random") else (0,)
            for seed in seeds:
                out.append((method, k, seed, config_for(method, k, cal, seed)))
    for k in meteor_extra:
        if "meteor" in methods:
            out.append(("meteor", k, 0, config_for("meteor", k, cal)))
    for k in ablation_budgets:
        for name in ablations:
            out.append((f"meteor:{name}", k, 0, config_for(f"meteor:{name}", k, cal)))
    return out


def remaining_tokens(method: str) -> int:
    """The most tokens ``method`` can keep: one encoder's grid for drop-clip / drop-convnext."""
    from .model import GRIDS

    if method in ("drop-clip", "drop-convnext"):
        kept = GRIDS[1] if method == "drop-clip" else GRIDS[0]
        return kept * kept
    return VISUAL_TOKENS


def needed_lambdas(methods: Sequence[str], budgets: Sequence[int], meteor_extra: Sequence[int] = (),
                   ablations: Sequence[str] = (), ablation_budgets: Sequence[int] = (),
                   pinned: Optional[Dict[str, Any]] = None) -> List[Tuple[str, int]]:
    """(method, budget) pairs whose ``llm_lambda`` calibration must solve (none where it is pinned)."""
    out = [(m, k) for k in budgets for m in methods if m in ("meteor-s3", "meteor")]
    out += [("meteor", k) for k in meteor_extra if "meteor" in methods]
    out += [(f"meteor:{name}", k) for k in ablation_budgets for name in ablations]
    if pinned and "llm_lambda" in pinned:
        out = [(m, k) for m, k in out if "llm_lambda" in ABLATIONS.get(m.partition(":")[2], {})]
    return out


def signals_from_stats(run_stats) -> List[float]:
    """Stage 3's budget signal per sample (what ``llm_lambda`` multiplies)."""
    return [float(s["llm"].detail["signal"]) for s in run_stats.stages]


def check_methods(methods: Sequence[str]) -> List[str]:
    bad = [m for m in methods if m not in ALL_METHODS]
    if bad:
        raise ValueError(f"unknown method(s) {', '.join(bad)}: allowed {', '.join(ALL_METHODS)}")
    return list(methods)


def check_ablations(names: Sequence[str]) -> List[str]:
    bad = [n for n in names if n not in ABLATIONS]
    if bad:
        raise ValueError(f"unknown ablation(s) {', '.join(bad)}: allowed {', '.join(ABLATIONS)}")
    return list(names)


def frontier(points: Sequence[tuple]) -> List[tuple]:
    """The (cost, accuracy, ...) points no other point beats (none as cheap or cheaper and at least as accurate),
    by cost: a method run at several settings (FastV at each layer) is read along this upper envelope."""
    out: List[tuple] = []
    for p in sorted(points, key=lambda q: (q[0], -q[1])):
        if not out or p[1] > out[-1][1]:
            out.append(p)
    return out


def with_lambda(cal: Calibration, method: str, k: int, lam: float) -> Calibration:
    cal.lambdas[stage3_key(method, k)] = lam
    return cal
