"""MeteorConfig: every setting of the three pruning stages, validated on creation.

Budgets (``*_keep``, ``llm_top_heads``) are a ratio in (0, 1] of the tokens entering that stage, or a
count >= 2 (0 where no tokens is allowed). Their meaning depends on the number's value only, never on how
it is printed: JSON tools write the ratio ``1.0`` as ``1``, so the bare integer ``1`` (a count of one
token in meteor-plugin 0.1) is refused as ambiguous, ``1.0`` or ``"all"`` mean every token, and ``2.0``
is the count 2. A saved config writes the ratio 1.0 as ``"all"``, so no JSON tool can change it.

A config is frozen once validated: ``replace`` (or ``dataclasses.replace``) makes a validated copy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple, Union

Budget = Union[int, float]

TEXT_QUERIES = ("all", "last")
METHODS = ("meteor", "random", "avgpool", "fastv", "visionzip", "drop_encoder")
FUSION_MODES = ("auto", "post_projection", "training_free")
FUSION_SIMILARITIES = ("cosine", "centred_cosine", "duplicate")
FUSION_QUOTAS = ("none", "rank")
DEEP_SCORES = ("attention", "similarity")
BUDGET_SIGNALS = ("mass", "spread", "regions", "coverage")
LLM_SELECTIONS = ("top", "coverage")
SIGNAL_LAYERS = ("own", "up_to")
PROPORTIONAL = ("auto", "on", "off")
VERSION = 6  # of the config format; see LEGACY

# Fields added after version 1, with the value that reproduces version 1's behaviour: a config saved
# (or written) without a ``version`` gets these for the fields it lacks, so it prunes as it did.
LEGACY = {
    1: {"fusion_similarity": "cosine", "llm_min_heads": 1, "llm_budget_signal": "mass", "llm_lambda": 64.0,
        "text_query": "all"},
    2: {"spread_floor": 0.0},
    3: {"llm_budget_signal": "spread", "llm_lambda": 0.6},
    4: {"proportional_attention": "off"},
    5: {"llm_selection": "top", "llm_budget_signal": "regions", "llm_signal_layers": "own", "llm_score_layers": "own",
        "llm_lambda": 11.0},
}


class ConfigError(ValueError):
    """A mistake in a METEOR config a user wrote (an unknown field, a bad value, a file that is missing, unreadable
    or not JSON/YAML): the message is one line that names the field and, for a file, the file. Entry points print
    that line alone; any other exception is a bug and keeps its traceback."""


class ConfigFileNotFoundError(ConfigError, FileNotFoundError):
    """A METEOR config file that is not there."""


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"MeteorConfig.{name}={value!r} is invalid: allowed {allowed}")


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(name, value, "True or False")


def _check_budget(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _fail(name, value, "a ratio in (0, 1], \"all\", or a token count (an int >= 2, or 0)")
    if isinstance(value, int) and value < 0:
        _fail(name, value, "a token count >= 2 (or 0) or a ratio in (0, 1]")
    if isinstance(value, float) and not (0.0 < value <= 1.0):
        _fail(name, value, "a ratio in (0, 1] or a whole token count >= 2")


def _budget_value(name: str, value: Any) -> Any:
    """A budget by its value: ``"all"`` and 1.0 are the ratio 1.0, integral floats >= 2 are counts."""
    if value == "all":
        return 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value  # _check_budget names the field
    if value == 1:
        if isinstance(value, int):
            _fail(name, value, "1.0 or \"all\" for all the tokens, or a count >= 2 (the integer 1 is refused: "
                  "JSON tools write the ratio 1.0 as 1, and meteor-plugin 0.1 read 1 as one token)")
        return 1.0
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and (value == 0 or value >= 2):
        return int(value)
    return value


def _check_int(name: str, value: Any, lo: int, hi: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        _fail(name, value, f"an int in [{lo}, {hi if hi is not None else 'inf'})" if hi is None
              else f"an int in [{lo}, {hi}]")


def _check_float(name: str, value: Any, lo: float, hi: float = math.inf, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        v = float(value)
        ok = (v > lo if lo_open else v >= lo) and v <= hi
    if not ok:
        left = "(" if lo_open else "["
        _fail(name, value, f"a number in {left}{lo}, {hi}]")


def _parse_file(path: str, text: str) -> Any:
    """The data in a config file's text; a syntax error names the file and the place."""
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"METEOR config file {path} is not valid JSON: {exc}") from None
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml is a dependency
        raise ImportError("reading a YAML METEOR config needs PyYAML: pip install pyyaml") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"METEOR config file {path} is not valid YAML: {exc}".replace("\n", " ")) from None


def _check_choice(name: str, value: Any, choices) -> None:
    if value not in choices:
        _fail(name, value, "one of " + ", ".join(repr(c) for c in choices))


def _budget_fields(cls) -> Tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.type in ("Budget", "Optional[Budget]", Budget))


@dataclass(frozen=True)
class MeteorConfig:
    """Settings of METEOR's three pruning stages (every field: docs/guide.md, "Configuration")."""

    # Stage switches.
    encoder: bool = True
    fusion: bool = True
    llm: bool = True
    # Which token scorer every stage uses; "meteor" is the method, the others are baselines.
    method: str = "meteor"

    # Stage 1: rank-guided per-encoder pruning.
    encoder_keep: Budget = 0.5
    encoder_ranks: Optional[Dict[str, float]] = None
    encoder_shallow_share: float = 0.5
    # Deep-boundary score: "attention" (CLS attention; without a CLS token, mean received attention) or
    # "similarity" (dissimilarity to the mean token, as at the shallow boundary).
    encoder_deep_score: str = "attention"

    # Stage 2: cooperative pruning at fusion.
    fusion_keep: Budget = 0.5
    fusion_mode: str = "auto"
    # "cosine" (the paper's summed cosine), "centred_cosine" (after subtracting each encoder's mean token),
    # "duplicate" (greedy: a token is redundant when a kept token of another encoder has its content).
    fusion_similarity: str = "duplicate"
    # How Stage 2's keep is shared among the encoders: "none" (one selection over all of them: an encoder gets
    # what its tokens win) or "rank" (each encoder keeps its share in proportion to its rank, as in Stage 1,
    # and the selection runs within those shares). The paper does not say which.
    fusion_quota: str = "none"
    # Stages 1 and 2: this share of the tokens each keeps is evenly spaced over each encoder's tokens. Both
    # stages favour distinctive tokens and would keep almost no look-alike ones, and a question about the
    # whole image (its background, its lighting) reads the image from what is kept. 0: none (the paper's,
    # and version 2's). 0.375: the best of 0, 1/8, 1/4, 3/8 on the v2 fidelity model's validation split.
    spread_floor: float = 0.375
    # Stages 1 and 2 before the language model: the visual tokens that reach it keep the positions they have
    # unpruned (the text after them continues as if none were removed), and each attends with the weight of
    # the tokens it stands for: itself and the dropped tokens most like it, log(size) added to its attention
    # logit in every layer (ToMe's proportional attention). A model trained on whole images counts and reads
    # geometry from the shares of attention; without it, dropping look-alike tokens inflates the share of
    # what is kept. "auto" (since version 5): where it can run (the llava package's and EAGLE's models, eager,
    # sdpa or, on transformers 5, FlashAttention-2: the sizes ride in a key column), with a warning where it
    # cannot; "on": refuse where it
    # cannot; "off": versions 1-4. On the v2 fidelity model's validation split, METEOR at 25% keeps 0.99 with
    # it against 0.86 without (it keeps counting: 0.96 against 0.63).
    proportional_attention: str = "auto"

    # Stage 3: adaptive text-guided pruning inside the LLM.
    llm_layer: int = 2
    llm_top_heads: Budget = 0.25
    llm_min_heads: int = 4  # floor on the heads used (a ratio of a small model's heads can be one head)
    # K = llm_lambda * "mass" (the paper's), "spread" (how many visual tokens the attention covers) or
    # "regions" (how many distinct regions: look-alike tokens count once; core/text_attention.py). "regions"
    # since version 4: on the v2 fidelity model's validation split it ties "spread" with every stage on, keeps
    # the object's colour at 6.25% with Stage 3 alone (0.99 against 0.87), and gives counting questions twice
    # the tokens of the global question (the spread gave them the same).
    # "coverage" (since version 6): how many tokens it takes to cover ``llm_coverage_share`` of the attention, a
    # token covering those it looks like (core/coverage.py). On the v2 fidelity model's validation split, with
    # Stage 3 alone at layer 2, it beats a fixed budget by 0.02-0.03 (regions: a tie) and gives counting 3x the
    # global question's tokens.
    llm_budget_signal: str = "coverage"
    llm_region_sharpness: float = 16.0  # "regions", "coverage": cos ** 16 between two tokens is how much they are alike
    llm_coverage_share: float = 0.75  # "coverage": the share of the attention the counted tokens cover
    # Where the signal is read: at Stage 3's layer ("own", versions 1-5), or averaged over every layer from 1 up to
    # it ("up_to", since version 6): one layer's attention can be idiosyncratic (the fidelity model's layer 2 sends a
    # counting question's attention to the background, its layer 4 spreads a digit question's over the image).
    llm_signal_layers: str = "up_to"
    # Which attention chooses the kept tokens: Stage 3's layer's ("own", versions 1-5), or the mean over every layer
    # from 1 up to it, each renormalised over the visual tokens ("up_to", since version 6). On the v2 fidelity model's
    # validation split, Stage 3 alone at layer 4 with 13 tokens: 0.938 with its own layer's, 0.973 with the mean.
    llm_score_layers: str = "up_to"
    # Which tokens Stage 3 keeps: the K most attended ("top": the paper's, versions 1-5) or the K that cover most of
    # the attention, each covering the tokens it looks like ("coverage", since version 6; core/coverage.py): top-K
    # can spend the budget on one look-alike region. On the v2 fidelity model's validation split, Stage 3 alone at
    # layer 2 with 50 tokens: counting 0.57 with top-K, 0.90 with coverage.
    llm_selection: str = "coverage"
    # Tokens per unit of the signal. 11.8: Stage 3 alone at layer 2 keeps 25% of the v2 fidelity model's 208
    # visual tokens on its validation split (its coverage signal averages 4.4 there); calibrate for another model.
    llm_lambda: float = 11.8
    llm_min_keep: Budget = 0.05
    llm_max_keep: Budget = 0.5
    text_query: str = "last"

    # Baselines.
    drop_encoder: Optional[int] = None
    seed: int = 0

    version: int = VERSION  # of the config format (LEGACY says what changed)

    def __post_init__(self) -> None:
        for name in _budget_fields(type(self)):
            object.__setattr__(self, name, _budget_value(name, getattr(self, name)))
        for name in ("encoder", "fusion", "llm"):
            _check_bool(name, getattr(self, name))
        _check_choice("method", self.method, METHODS)
        _check_budget("encoder_keep", self.encoder_keep)
        if self.encoder_ranks is not None:
            if not isinstance(self.encoder_ranks, dict) or not self.encoder_ranks:
                _fail("encoder_ranks", self.encoder_ranks, "None or a non-empty dict {encoder name: rank >= 0}")
            for key, rank in self.encoder_ranks.items():
                if not isinstance(key, str):
                    _fail("encoder_ranks", self.encoder_ranks, "string keys (encoder names)")
                _check_float(f"encoder_ranks[{key!r}]", rank, 0.0)
            object.__setattr__(self, "encoder_ranks", {k: float(v) for k, v in self.encoder_ranks.items()})
        _check_float("encoder_shallow_share", self.encoder_shallow_share, 0.0, 1.0)
        _check_choice("encoder_deep_score", self.encoder_deep_score, DEEP_SCORES)
        _check_budget("fusion_keep", self.fusion_keep)
        _check_choice("fusion_mode", self.fusion_mode, FUSION_MODES)
        _check_choice("fusion_similarity", self.fusion_similarity, FUSION_SIMILARITIES)
        _check_choice("fusion_quota", self.fusion_quota, FUSION_QUOTAS)
        _check_float("spread_floor", self.spread_floor, 0.0, 0.5)
        _check_choice("proportional_attention", self.proportional_attention, PROPORTIONAL)
        _check_int("llm_layer", self.llm_layer, 1)
        _check_budget("llm_top_heads", self.llm_top_heads)
        if self.llm_top_heads == 0:
            _fail("llm_top_heads", 0, "at least one head (an int >= 1 or a ratio in (0, 1])")
        _check_int("llm_min_heads", self.llm_min_heads, 1)
        _check_choice("llm_budget_signal", self.llm_budget_signal, BUDGET_SIGNALS)
        _check_float("llm_lambda", self.llm_lambda, 0.0, lo_open=True)
        _check_float("llm_region_sharpness", self.llm_region_sharpness, 0.0, lo_open=True)
        _check_float("llm_coverage_share", self.llm_coverage_share, 0.0, 1.0, lo_open=True)
        _check_choice("llm_signal_layers", self.llm_signal_layers, SIGNAL_LAYERS)
        _check_choice("llm_score_layers", self.llm_score_layers, SIGNAL_LAYERS)
        _check_choice("llm_selection", self.llm_selection, LLM_SELECTIONS)
        _check_budget("llm_min_keep", self.llm_min_keep)
        _check_budget("llm_max_keep", self.llm_max_keep)
        if type(self.llm_min_keep) is type(self.llm_max_keep) and self.llm_min_keep > self.llm_max_keep:
            raise ConfigError(
                f"MeteorConfig.llm_min_keep={self.llm_min_keep!r} is larger than "
                f"llm_max_keep={self.llm_max_keep!r}: allowed llm_min_keep <= llm_max_keep"
            )
        _check_choice("text_query", self.text_query, TEXT_QUERIES)
        if self.drop_encoder is not None:
            _check_int("drop_encoder", self.drop_encoder, 0)
        if self.method == "drop_encoder" and self.drop_encoder is None:
            _fail("drop_encoder", None, "the index of the encoder to drop when method='drop_encoder'")
        _check_int("seed", self.seed, 0)
        _check_int("version", self.version, 1, VERSION)

    # Serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in _budget_fields(type(self)):
            if data[name] == 1.0 and isinstance(data[name], float):
                data[name] = "all"  # a JSON tool would print 1.0 as 1, which is refused
        return data

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "MeteorConfig":
        if not isinstance(data, dict):
            raise ConfigError(f"a METEOR config must be a mapping of field names to values, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown MeteorConfig field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        version = data.get("version", 1)
        if isinstance(version, int) and not isinstance(version, bool) and not 1 <= version <= VERSION:
            _fail("version", version, f"an int in [1, {VERSION}]")
        legacy = {}
        for old in range(version if isinstance(version, int) else VERSION, VERSION):
            legacy.update({k: v for k, v in LEGACY[old].items() if k not in legacy})
        return cls(**{**legacy, **data, "version": version})

    @classmethod
    def from_json(cls, text: str) -> "MeteorConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"a METEOR config in JSON is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_file(cls, path: Union[str, os.PathLike]) -> "MeteorConfig":
        """Load from a .json, .yaml or .yml file; every error names the file."""
        path = os.fspath(path)
        if not path.endswith((".json", ".yaml", ".yml")):
            raise ConfigError(f"METEOR config file {path} must end in .json, .yaml or .yml")
        if not os.path.isfile(path):
            what = "is not a file" if os.path.exists(path) else "not found"
            raise ConfigFileNotFoundError(f"METEOR config file {what}: {path}")
        try:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"METEOR config file {path} cannot be read: {exc}") from None
        if not text.strip():
            raise ConfigError(f"METEOR config file {path} is empty: write a mapping of MeteorConfig fields "
                             "(an empty mapping, {}, for the defaults)")
        data = _parse_file(path, text)
        if not isinstance(data, dict):
            shown = "null" if data is None else type(data).__name__
            raise ConfigError(f"METEOR config file {path} holds {shown}, not a mapping of MeteorConfig field names "
                             "to values (an empty mapping, {}, for the defaults)")
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"METEOR config file {path}: {exc}") from None

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json() + "\n")

    def default_of(self, name: str) -> Any:
        """The default of field ``name`` for this config's format version (what it means when unset)."""
        for old in range(self.version, VERSION):
            if name in LEGACY[old]:
                return LEGACY[old][name]
        return {f.name: f.default for f in dataclasses.fields(self)}[name]

    def replace(self, **changes: Any) -> "MeteorConfig":
        """A copy with some fields changed (validated like a new config)."""
        return self.from_dict({**self.to_dict(), **changes})

