"""``meteor-plugin bench fidelity``: accuracy against retained visual tokens on the fidelity model.

On random weights every token choice is as good as any other; this benchmark uses a trained model
(``meteor_plugin/fidelity/checkpoint``, or one trained now with ``--train``) and asks it the test
split's questions under every method at equal budgets (``fidelity/methods.py``), side by side in one
run: a table per question kind, the tokens each method really kept (from ``meteor_plugin.stats``),
accuracy relative to the unpruned model, Stage 3's spending per kind, the issue's targets, a PNG plot
and, with ``--json``, everything as JSON.

Steps: calibrate on the validation split (encoder ranks, ``llm_layer`` for METEOR's Stage 3 and for
FastV, Stage 3's ``llm_lambda`` per budget), then evaluate on the test split.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..config import MeteorConfig
from ..fidelity import calibration
from ..fidelity import evaluate as ev
from ..fidelity import methods as mt
from ..fidelity.questions import KINDS


@dataclass
class FidelityBench:
    model_path: Optional[str] = None  # None: the shipped checkpoint
    per_kind: int = 500  # test questions per kind
    val_per_kind: int = 100  # validation questions per kind, for calibration
    budgets: Sequence[float] = mt.BUDGETS
    meteor_extra: Sequence[float] = (mt.METEOR_TARGET,)
    methods: Sequence[str] = mt.ALL_METHODS
    batch_size: int = 100
    layers: Optional[Sequence[int]] = None  # llm_layer candidates (default: every layer but 0)
    progress: bool = True
    plot: Optional[str] = "fidelity.png"
    threads: Optional[int] = None
    fusion_similarity: str = "cosine"  # Stage 2's similarity in meteor-s2 and meteor (MeteorConfig.fusion_similarity)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="q", disable=not enabled, leave=False, dynamic_ncols=True)


def _accuracies(r: ev.EvalResult) -> Dict[str, float]:
    out = {k: r.accuracy(k) for k in KINDS}
    out["overall"] = r.accuracy()
    out["fine"] = statistics.mean(r.accuracy(k) for k in mt.FINE_KINDS)
    out["coarse"] = statistics.mean(r.accuracy(k) for k in mt.COARSE_KINDS)
    return out


def _rows(runs: List[Dict[str, Any]], unpruned: Dict[str, float]) -> List[Dict[str, Any]]:
    """One row per (method, budget): random's seeds averaged, with their low and high."""
    grouped: Dict[tuple, List[Dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["method"], run["budget"]), []).append(run)
    rows = []
    for (method, budget), group in grouped.items():
        acc = {key: statistics.mean(g["accuracy"][key] for g in group) for key in group[0]["accuracy"]}
        row = {
            "method": method, "budget": budget, "budget_ratio": budget / mt.VISUAL_TOKENS,
            "kept": statistics.mean(g["kept"] for g in group),
            "kept_per_kind": {k: statistics.mean(g["kept_per_kind"][k] for g in group) for k in KINDS},
            "llm_input": statistics.mean(g["llm_input"] for g in group),
            "accuracy": acc,
            "relative": {key: acc[key] / unpruned[key] if unpruned[key] else float("nan") for key in acc},
            "seeds": [g["seed"] for g in group], "config": group[0]["config"],
        }
        if len(group) > 1:
            row["low"] = {key: min(g["accuracy"][key] for g in group) for key in acc}
            row["high"] = {key: max(g["accuracy"][key] for g in group) for key in acc}
            row["stdev"] = {key: statistics.stdev(g["accuracy"][key] for g in group) for key in acc}
        rows.append(row)
    return rows


def targets(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The issue's three targets, checked on the measured rows (reported, not asserted)."""
    out: Dict[str, Any] = {}
    meteor = {r["budget"]: r for r in rows if r["method"] == "meteor"}
    k24 = mt.tokens_for(mt.METEOR_TARGET)
    if k24 in meteor:
        rel = meteor[k24]["relative"]["overall"]
        out["meteor_24_keeps_99"] = {"met": rel >= 0.99, "relative_overall": rel, "kept": meteor[k24]["kept"]}
    beats = []
    for budget, row in sorted(meteor.items()):
        if budget > mt.tokens_for(0.25):
            continue
        for r in rows:
            if r["budget"] != budget or r["method"] in ("meteor", "unpruned") or r["method"] not in mt.BASELINES:
                continue
            for key in ("overall", "fine"):
                beats.append({"budget": budget, "baseline": r["method"], "series": key,
                              "meteor": row["accuracy"][key], "other": r["accuracy"][key],
                              "met": row["accuracy"][key] > r["accuracy"][key]})
    if beats:
        out["meteor_beats_baselines_at_25_or_less"] = {"met": all(b["met"] for b in beats),
                                                       "losses": [b for b in beats if not b["met"]],
                                                       "comparisons": len(beats)}
    s3 = [r for r in rows if r["method"] in ("meteor-s3", "meteor")]
    if s3:
        spend = []
        for r in s3:
            fine = statistics.mean(r["kept_per_kind"][k] for k in mt.FINE_KINDS)
            coarse = statistics.mean(r["kept_per_kind"][k] for k in mt.COARSE_KINDS)
            spend.append({"method": r["method"], "budget": r["budget"], "fine": fine, "coarse": coarse,
                          "met": fine > coarse})
        out["stage3_spends_more_on_fine"] = {"met": all(s["met"] for s in spend), "by_run": spend}
    return out


def run(settings: FidelityBench, log=print) -> Dict[str, Any]:
    from ..fidelity import checkpoint_path
    from ..fidelity.model import load

    MeteorConfig(fusion_similarity=settings.fusion_similarity)  # a bad value fails here, before any work
    if settings.threads:
        torch.set_num_threads(settings.threads)
    path = settings.model_path or checkpoint_path()
    model, tokenizer = load(path)
    budgets = [mt.tokens_for(b) for b in settings.budgets]
    extra = [mt.tokens_for(b) for b in settings.meteor_extra if mt.tokens_for(b) not in budgets]
    methods = mt.check_methods(settings.methods)
    began = time.perf_counter()
    cal = calibration.calibrate(model, tokenizer, settings.methods, budgets, extra, settings.val_per_kind,
                                settings.layers, settings.batch_size, log, settings.fusion_similarity)
    test = ev.eval_set(tokenizer, settings.per_kind, split="test")
    plan = mt.configs(methods, budgets, cal, extra)
    runs = []
    with _bar(len(plan) * len(test), "fidelity", settings.progress) as bar:
        for method, budget, seed, config in plan:
            bar.set_postfix_str(f"{method}@{budget}")
            r = ev.evaluate(model, test, config, settings.batch_size, progress=bar.update)
            runs.append({"method": method, "budget": budget, "seed": seed, "config": config.to_dict(),
                         "accuracy": _accuracies(r), "kept": r.mean_kept(), "llm_input": r.mean_llm_input(),
                         "kept_per_kind": {k: r.mean_kept(k) for k in KINDS},
                         "kept_exact": _exact(r, method, budget)})
    import meteor_plugin

    meteor_plugin.disable()
    unpruned = runs[0]["accuracy"]
    rows = _rows(runs, unpruned)
    result = {
        "model": os.path.abspath(path), "machine": _machine(), "seconds": round(time.perf_counter() - began, 1),
        "questions_per_kind": settings.per_kind, "kinds": list(KINDS), "calibration": cal.to_dict(),
        "fusion_similarity": settings.fusion_similarity,
        "rows": rows, "runs": runs, "targets": targets(rows),
    }
    if settings.plot:
        from ..fidelity.plot import draw

        result["plot"] = os.path.abspath(draw(rows, settings.plot))
    return result


def _exact(r: ev.EvalResult, method: str, budget: int) -> Optional[bool]:
    """Whether every question kept exactly ``budget`` tokens (None for adaptive and unpruned runs)."""
    if method in ("meteor-s3", "meteor", "unpruned"):
        return None
    return all(k == budget for k in r.kept)


def _machine() -> Dict[str, Any]:
    import transformers

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "loadavg_at_end": load}


def report(result: Dict[str, Any]) -> str:
    rows = result["rows"]
    kinds = result["kinds"]
    lines = [f"model: {result['model']}", f"Stage 2 similarity (meteor-s2, meteor): {result['fusion_similarity']}",
             f"test questions: {result['questions_per_kind']} per kind; "
             f"{result['seconds']} s on {result['machine']['cores']} cores (torch threads "
             f"{result['machine']['threads']}, load {result['machine']['loadavg_at_end']})", ""]
    head = f"{'method':<14}{'budget':>7}{'kept':>7}" + "".join(f"{k:>15}" for k in kinds) + \
        f"{'overall':>9}{'rel.':>7}"
    lines.append(head)
    lines.append("-" * len(head))
    for r in rows:
        acc = r["accuracy"]
        cells = "".join(f"{acc[k]:>15.3f}" for k in kinds)
        spread = ""
        if "low" in r:
            spread = f"  (seeds {r['low']['overall']:.3f}-{r['high']['overall']:.3f})"
        lines.append(f"{r['method']:<14}{r['budget']:>7}{r['kept']:>7.1f}{cells}{acc['overall']:>9.3f}"
                     f"{r['relative']['overall']:>7.3f}{spread}")
    lines.append("")
    lines.append("Stage 3 tokens kept per kind (adaptive):")
    for r in rows:
        if r["method"] in ("meteor-s3", "meteor"):
            per = ", ".join(f"{k} {r['kept_per_kind'][k]:.1f}" for k in kinds)
            lines.append(f"  {r['method']}@{r['budget']}: {per}")
    lines.append("")
    lines.append("targets (reported, not asserted):")
    t = result["targets"]
    if "meteor_24_keeps_99" in t:
        x = t["meteor_24_keeps_99"]
        lines.append(f"  METEOR at 24% keeps >= 99% of unpruned overall: {'met' if x['met'] else 'NOT met'} "
                     f"({x['relative_overall']:.3f}, {x['kept']:.1f} tokens)")
    if "meteor_beats_baselines_at_25_or_less" in t:
        x = t["meteor_beats_baselines_at_25_or_less"]
        lines.append(f"  METEOR beats every baseline at <= 25% (overall and fine): {'met' if x['met'] else 'NOT met'} "
                     f"({x['comparisons'] - len(x['losses'])}/{x['comparisons']} comparisons won)")
        by_budget: Dict[int, List[str]] = {}
        for loss in x["losses"]:
            by_budget.setdefault(loss["budget"], []).append(
                f"{loss['baseline']} {loss['series']} {loss['meteor']:.3f} vs {loss['other']:.3f}")
        for budget, items in sorted(by_budget.items()):
            lines.append(f"    not beaten at {budget} tokens: " + "; ".join(items))
    if "stage3_spends_more_on_fine" in t:
        x = t["stage3_spends_more_on_fine"]
        detail = "; ".join(f"{s['method']}@{s['budget']} fine {s['fine']:.1f} vs coarse {s['coarse']:.1f}"
                           for s in x["by_run"])
        lines.append(f"  Stage 3 spends more tokens on fine questions: {'met' if x['met'] else 'NOT met'} ({detail})")
    if result.get("plot"):
        lines.append(f"\nplot: {result['plot']}")
    return "\n".join(lines)
