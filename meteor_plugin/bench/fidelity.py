"""``meteor-plugin bench fidelity``: accuracy against cost on the fidelity model.

On random weights every token choice is as good as any other; this benchmark uses a trained model
(``meteor_plugin/fidelity/checkpoint``, or one trained now with ``--train``) and asks it the test
split's questions under every method at equal budgets (``fidelity/methods.py``), side by side in one
run: accuracy per question kind, the tokens each method really kept (from ``meteor_plugin.stats``), the
visual tokens each decoder layer ran on, the prefill FLOPs that are needed (``meteor_plugin.flops``, as ``meteor-plugin
bench`` counts them: causal attention as its lower triangle), accuracy relative to the unpruned model, every baseline read at METEOR's FLOPs
(equal cost, not only equal final tokens: a method that prunes later spends more), Stage 3's spending
per kind, optional ablations of METEOR's choices, the targets, a PNG plot of accuracy against FLOPs and,
with ``--json``, everything as JSON.

Steps: calibrate on the validation split (encoder ranks, ``llm_layer`` for METEOR's Stage 3 and for
FastV, Stage 3's ``llm_lambda`` per budget), then evaluate on the test split (``test_seed`` draws a
fresh one).
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..config import MeteorConfig
from ..fidelity import calibration
from ..fidelity import evaluate as ev
from ..fidelity import methods as mt
from ..fidelity.questions import KINDS
from ..progress import phase


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
    meteor: Dict[str, Any] = field(default_factory=dict)  # MeteorConfig fields of every METEOR run (--meteor-set)
    ablations: Sequence[str] = ()  # names of mt.ABLATIONS, run as meteor:<name>
    ablation_budgets: Sequence[float] = (0.25, 0.125)
    test_seed: int = 0  # seed of the test split's scenes: another seed draws fresh held-out questions
    split: str = "test"  # "val": ask validation questions after the calibration ones, to choose defaults on
    flops_questions: int = 32  # questions whose prefill FLOPs are counted per run (each alone)


def _bar(total: int, desc: str, enabled: bool):
    from ..progress import bar

    return bar(total, desc, "q", enabled)


def _accuracies(r: ev.EvalResult) -> Dict[str, float]:
    out = {k: r.accuracy(k) for k in KINDS}
    out["overall"] = r.accuracy()
    out["needs_tokens"] = statistics.mean(r.accuracy(k) for k in mt.TOKEN_KINDS)
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
            "visual_per_layer": [statistics.mean(col) for col in zip(*(g["visual_per_layer"] for g in group))],
            "gflops": statistics.mean(g["gflops"] for g in group),
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


def read_at(points: Sequence[tuple], x: float) -> tuple:
    """A method's accuracy at cost ``x`` from its (cost, accuracy) points: linear interpolation inside them;
    below its cheapest point, that point's accuracy (it never runs that cheaply, and the comparison then
    favours it); above its dearest, None. Returns (accuracy or None, "interpolated" | "cheapest" | "dearer")."""
    pts = sorted(points)
    if not pts or x > pts[-1][0] + 1e-9:
        return None, "dearer"
    if x < pts[0][0] - 1e-9:
        return pts[0][1], "cheapest"
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return (y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)), "interpolated"
    return pts[0][1], "interpolated"


def _curve_rows(rows: List[Dict[str, Any]], method: str) -> List[Dict[str, Any]]:
    """A method's rows: FastV's at every layer it ran at (``fastv:<layer>``, ``fastv+pa:<layer>``), read along their
    frontier."""
    return [r for r in rows if r["method"] == method or (method in mt.FRONTIERS and r["method"].startswith(method + ":"))]


def equal_flops(rows: List[Dict[str, Any]], budgets: Sequence[int]) -> List[Dict[str, Any]]:
    """Each baseline's accuracy read off its accuracy-vs-FLOPs curve (its rows at every budget; FastV's frontier
    over its layers and budgets by overall accuracy, every kind read on the runs of that frontier) at the prefill
    FLOPs METEOR spent at each of ``budgets`` (``read_at``): the comparison at equal cost."""
    series = list(KINDS) + ["overall"]
    meteor = {r["budget"]: r for r in rows if r["method"] == "meteor"}
    out = []
    for budget in budgets:
        if budget not in meteor:
            continue
        m = meteor[budget]
        for method in mt.BASELINES + ("meteor-s3", "meteor-s3-fixed"):
            curve = _curve_rows(rows, method)
            if not curve:
                continue
            read, layers = {}, None
            if any(r["method"] != method for r in curve):  # run at several layers: the runs on its overall frontier,
                front = mt.frontier([(r["gflops"], r["accuracy"]["overall"], r["method"], i)  # every kind read there
                                     for i, r in enumerate(curve)])
                layers = _bracketing(front, m["gflops"])
                for key in series:
                    read[key] = read_at([(p[0], curve[p[3]]["accuracy"][key]) for p in front], m["gflops"])
            for key in series if not read else ():
                points = mt.frontier([(r["gflops"], r["accuracy"][key], r["method"]) for r in curve])
                read[key] = read_at([p[:2] for p in points], m["gflops"])
            entry = {"budget": budget, "gflops": m["gflops"], "baseline": method,
                     "accuracy": {key: v[0] for key, v in read.items()}, "read": read["overall"][1],
                     "cheapest_gflops": min(r["gflops"] for r in curve),
                     "meteor": {key: m["accuracy"][key] for key in series}}
            if layers is not None:
                entry["frontier_runs"] = layers
            out.append(entry)
    return out


def _bracketing(points: Sequence[tuple], x: float) -> List[str]:
    """The runs (names) of the frontier points a reading at cost ``x`` comes from: the two around it, or the
    cheapest where it never runs that cheaply (none where it always costs less)."""
    below = [p for p in points if p[0] <= x + 1e-9]
    above = [p for p in points if p[0] > x + 1e-9]
    if not below:
        return [above[0][2]] if above else []
    if abs(below[-1][0] - x) <= 1e-9:
        return [below[-1][2]]
    return [below[-1][2], above[0][2]] if above else []


MANY_TOKEN_KIND, FEW_TOKEN_KIND = "count", "background"  # every object of a colour, against a global property
COMPARED = ("overall", "needs_tokens") + mt.TOKEN_KINDS  # what METEOR must win at equal FLOPs


def targets(rows: List[Dict[str, Any]], budgets: Sequence[int]) -> Dict[str, Any]:
    """The testbed issue's targets, checked on the measured rows (reported, not asserted)."""
    out: Dict[str, Any] = {}
    meteor = {r["budget"]: r for r in rows if r["method"] == "meteor"}
    k25 = mt.tokens_for(0.25)
    if k25 in meteor:
        rel = meteor[k25]["relative"]["overall"]
        out["meteor_25_keeps_97"] = {"met": rel >= 0.97, "relative_overall": rel, "kept": meteor[k25]["kept"]}
    k24 = mt.tokens_for(mt.METEOR_TARGET)
    if k24 in meteor:
        rel = meteor[k24]["relative"]["overall"]
        out["meteor_24_keeps_99"] = {"met": rel >= 0.99, "relative_overall": rel, "kept": meteor[k24]["kept"]}
    checked = [b for b in budgets if b in (mt.tokens_for(0.25), mt.tokens_for(0.125))]
    comparisons = []
    for c in equal_flops(rows, checked):
        if c["baseline"] in ("meteor-s3", "meteor-s3-fixed"):
            continue
        for key, other in c["accuracy"].items():
            if key not in COMPARED:
                continue
            if other is None:
                continue  # the baseline costs less than METEOR at every budget: no reading at METEOR's cost
            comparisons.append({"budget": c["budget"], "baseline": c["baseline"], "series": key,
                                "meteor": c["meteor"][key], "other": other, "met": c["meteor"][key] > other})
    if comparisons:
        out["meteor_beats_baselines_at_equal_flops"] = {
            "met": all(x["met"] for x in comparisons), "losses": [x for x in comparisons if not x["met"]],
            "comparisons": len(comparisons)}
    spend = []
    for r in rows:
        if r["method"] in ("meteor-s3", "meteor"):
            many, few = r["kept_per_kind"][MANY_TOKEN_KIND], r["kept_per_kind"][FEW_TOKEN_KIND]
            spend.append({"method": r["method"], "budget": r["budget"], "many": many, "few": few,
                          "ratio": many / few if few else float("inf"), "met": many >= 2 * few})
    if spend:
        out["stage3_adapts"] = {"met": all(x["met"] for x in spend), "by_run": spend}
    versus = []
    for adaptive, same in (("meteor-s3", "meteor-s3-fixed"), ("meteor", "meteor-fixed")):  # alone, all stages
        fixed = {r["budget"]: r for r in rows if r["method"] == same}
        versus += [{"method": adaptive, "budget": r["budget"], "adaptive": r["accuracy"]["overall"],
                    "fixed": fixed[r["budget"]]["accuracy"]["overall"], "adaptive_kept": r["kept"],
                    "fixed_kept": fixed[r["budget"]]["kept"],
                    "met": r["accuracy"]["overall"] > fixed[r["budget"]]["accuracy"]["overall"]}
                   for r in rows if r["method"] == adaptive and r["budget"] in fixed]
    if versus:
        out["stage3_adaptive_beats_fixed"] = {"met": all(x["met"] for x in versus), "by_budget": versus}
    return out


def run(settings: FidelityBench, log=print) -> Dict[str, Any]:
    from ..fidelity import checkpoint_path
    from ..fidelity.model import load

    MeteorConfig(**settings.meteor)  # a bad field or value fails here, before any work
    ablations = mt.check_ablations(settings.ablations)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    path = settings.model_path or checkpoint_path()
    with phase("fidelity: loading the checkpoint"):
        model, tokenizer = load(path)
    budgets = [mt.tokens_for(b) for b in settings.budgets]
    extra = [mt.tokens_for(b) for b in settings.meteor_extra if mt.tokens_for(b) not in budgets]
    ablation_budgets = [mt.tokens_for(b) for b in settings.ablation_budgets] if ablations else []
    methods = mt.check_methods(settings.methods)
    began = time.perf_counter()
    cal = calibration.calibrate(model, tokenizer, settings.methods, budgets, extra, settings.val_per_kind,
                                settings.layers, settings.batch_size, log, settings.meteor, ablations,
                                ablation_budgets)
    if settings.split == "val":  # the validation questions after those calibration used
        test = ev.eval_set(tokenizer, settings.per_kind, split="val", start=len(KINDS) * settings.val_per_kind)
    elif settings.split == "test":
        test = ev.eval_set(tokenizer, settings.per_kind, split="test", seed=settings.test_seed)
    else:
        raise ValueError(f"split={settings.split!r} is invalid: allowed 'test' or 'val'")
    plan = mt.configs(methods, budgets, cal, extra, ablations, ablation_budgets)
    runs = []
    try:
        with _bar(len(plan) * len(test), "fidelity", settings.progress) as bar:
            for method, budget, seed, config in plan:
                bar.set_postfix_str(f"{method}@{budget}")
                r = ev.evaluate(model, test, config, settings.batch_size, progress=bar.update)
                runs.append({"method": method, "budget": budget, "seed": seed, "config": config.to_dict(),
                             "accuracy": _accuracies(r), "kept": r.mean_kept(), "llm_input": r.mean_llm_input(),
                             "kept_per_kind": {k: r.mean_kept(k) for k in KINDS},
                             "visual_per_layer": r.mean_layer_visual(),
                             "gflops": ev.prefill_flops(model, test, config, settings.flops_questions) / 1e9,
                             "kept_exact": _exact(r, method, budget)})
        interrupted = None
    except KeyboardInterrupt:  # Ctrl-C: what is finished is reported (unpruned first), the rest is named as missing
        if not runs:
            raise
        interrupted = {"runs_done": len(runs), "runs_planned": len(plan),
                       "missing": [f"{m}@{b}" + (f" seed {s}" if m.startswith("random") else "") for m, b, s, _ in plan[len(runs):]]}
    import meteor_plugin

    meteor_plugin.detach(model)  # load() attached it
    unpruned = runs[0]["accuracy"]
    rows = _rows(runs, unpruned)
    result = {
        "model": os.path.abspath(path), "machine": _machine(), "seconds": round(time.perf_counter() - began, 1),
        "questions_per_kind": settings.per_kind, "split": settings.split, "test_seed": settings.test_seed,
        "kinds": list(KINDS),
        "calibration": cal.to_dict(), "meteor": dict(settings.meteor), "flops_questions": settings.flops_questions,
        "rows": rows, "runs": runs, "equal_flops": [] if interrupted else equal_flops(rows, budgets),
        "targets": {} if interrupted else targets(rows, budgets), "interrupted": interrupted,
    }
    if interrupted:  # the comparisons and the plot need every run
        return result
    if settings.plot:
        from ..fidelity.plot import draw

        result["plot"] = os.path.abspath(draw(rows, settings.plot))
    return result


def _exact(r: ev.EvalResult, method: str, budget: int) -> Optional[bool]:
    """Whether every question kept exactly ``budget`` tokens (None for adaptive and unpruned runs)."""
    if method.partition(":")[0] in ("meteor-s3", "meteor", "unpruned"):
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


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.3f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: Sequence[int] = (0, -1),
          indent: str = "") -> List[str]:
    """Lines of a table whose columns are as wide as their widest cell and two spaces apart (the columns ``left``
    aligned left, the others right), the header underlined: no cell runs into the next."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    left = {i % len(header) for i in left}

    def line(cells):
        return indent + "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    head = line(header)
    return [head, indent + "-" * (len(head) - len(indent))] + [line(r) for r in rows]


def report(result: Dict[str, Any]) -> str:
    rows = result["rows"]
    kinds = result["kinds"]
    overrides = ", ".join(f"{k}={v!r}" for k, v in result["meteor"].items()) or "none (the config defaults)"
    lines = [f"model: {result['model']}", f"METEOR fields set on top of the defaults: {overrides}",
             f"{result['split']} questions: {result['questions_per_kind']} per kind "
             f"({'test seed ' + str(result['test_seed']) if result['split'] == 'test' else 'after the calibration ones'}); prefill "
             f"FLOPs (needed: causal attention as its lower triangle) counted on {result['flops_questions']} of them, each alone; {result['seconds']} s on "
             f"{result['machine']['cores']} cores (torch threads {result['machine']['threads']}, load "
             f"{result['machine']['loadavg_at_end']})", ""]
    stopped = result.get("interrupted")
    if stopped:
        lines += [f"INTERRUPTED after {stopped['runs_done']} of {stopped['runs_planned']} runs: the rows below are the "
                  f"runs that finished; not run: {', '.join(stopped['missing'])}. The comparisons at equal FLOPs, the "
                  "targets and the plot need every run and are left out.", ""]
    body = []
    for r in rows:
        acc = r["accuracy"]
        spread = f"(seeds {r['low']['overall']:.3f}-{r['high']['overall']:.3f})" if "low" in r else ""
        body.append([r["method"], r["budget"], f"{r['kept']:.1f}", f"{r['gflops']:.3f}",
                     "/".join(f"{v:.0f}" for v in r["visual_per_layer"])] + [f"{acc[k]:.3f}" for k in kinds]
                    + [f"{acc['overall']:.3f}", f"{r['relative']['overall']:.3f}", spread])
    lines += table(["method", "budget", "kept", "GFLOPs", "per layer", *kinds, "overall", "rel.", ""], body)
    lines += ["", "'per layer': visual tokens each decoder layer ran on (mean); 'kept': after the last stage.", ""]
    if result["equal_flops"]:
        lines.append("At equal prefill FLOPs (each baseline's accuracy-vs-FLOPs curve read at METEOR's FLOPs, FastV's "
                     "frontier over its layers by overall accuracy, every kind read on the same runs; a "
                     "baseline that never runs that cheaply is read at its cheapest run, which costs more):")
        body, shown = [], set()
        for c in result["equal_flops"]:
            if c["budget"] not in shown:
                shown.add(c["budget"])
                body.append([c["budget"], f"{c['gflops']:.3f}", "meteor"] + [f"{c['meteor'][k]:.3f}" for k in kinds]
                            + [f"{c['meteor']['overall']:.3f}", ""])
            note = {"cheapest": f"(its cheapest run, {c['cheapest_gflops']:.3f} GFLOPs)",
                    "dearer": "(costs less than METEOR at every budget)"}.get(c["read"], "")
            if c.get("frontier_runs"):
                note += f" (frontier over its layers: {' and '.join(c['frontier_runs'])})"
            body.append(["", "", c["baseline"]] + [_fmt(c["accuracy"][k]) for k in kinds]
                        + [_fmt(c["accuracy"]["overall"]), note])
        lines += table(["METEOR at", "GFLOPs", "method", *kinds, "overall", ""], body, left=(0, 2, -1), indent="  ")
        lines.append("")
    lines.append("Stage 3 tokens kept per kind (adaptive):")
    for r in rows:
        if r["method"].partition(":")[0] in ("meteor-s3", "meteor"):
            per = ", ".join(f"{k} {r['kept_per_kind'][k]:.1f}" for k in kinds)
            lines.append(f"  {r['method']}@{r['budget']}: {per}")
    lines += ["", "targets (reported, not asserted):"]
    t = result["targets"]
    for key, label, target in (("meteor_25_keeps_97", "METEOR at 25% keeps >= 97% of unpruned overall", 0.97),
                               ("meteor_24_keeps_99", "METEOR at 24% keeps >= 99% of unpruned overall", 0.99)):
        if key in t:
            x = t[key]
            lines.append(f"  {label}: {'met' if x['met'] else 'NOT met'} ({x['relative_overall']:.3f}, "
                         f"{x['kept']:.1f} tokens)")
    if "meteor_beats_baselines_at_equal_flops" in t:
        x = t["meteor_beats_baselines_at_equal_flops"]
        lines.append(f"  METEOR beats every baseline at equal FLOPs at 25% and 12.5%, overall and per kind: "
                     f"{'met' if x['met'] else 'NOT met'} ({x['comparisons'] - len(x['losses'])}/{x['comparisons']} "
                     "comparisons won)")
        by_budget: Dict[int, List[str]] = {}
        for loss in x["losses"]:
            by_budget.setdefault(loss["budget"], []).append(
                f"{loss['baseline']} {loss['series']} {loss['meteor']:.3f} vs {loss['other']:.3f}")
        for budget, items in sorted(by_budget.items()):
            lines.append(f"    not beaten at METEOR's {budget}-token FLOPs: " + "; ".join(items))
    if "stage3_adapts" in t:
        x = t["stage3_adapts"]
        detail = "; ".join(f"{s['method']}@{s['budget']} {s['many']:.1f} vs {s['few']:.1f}" for s in x["by_run"])
        lines.append(f"  Stage 3 spends >= 2x the tokens on {MANY_TOKEN_KIND} as on {FEW_TOKEN_KIND}: "
                     f"{'met' if x['met'] else 'NOT met'} ({detail})")
    if "stage3_adaptive_beats_fixed" in t:
        x = t["stage3_adaptive_beats_fixed"]
        detail = "; ".join(f"{v['method']}@{v['budget']}: {v['adaptive']:.3f} vs {v['fixed']:.3f}" for v in x["by_budget"])
        lines.append(f"  Stage 3's adaptive budget beats the same scoring at a fixed budget of the same average: "
                     f"{'met' if x['met'] else 'NOT met'} ({detail})")
    if result.get("plot"):
        lines.append(f"\nplot: {result['plot']}")
    return "\n".join(lines)
