"""What the pruning methods need from a trained fidelity model, measured on the validation split only.

- encoder ranks (``calibrate.encoder_ranks``, Stage 1's budget split) on validation images;
- ``llm_layer``: the decoder layer where Stage 3 (METEOR's adaptive scoring) and FastV prune, each
  picked as the layer where that method is most accurate on validation questions at 25% of the tokens
  (ties: the earlier layer, which saves more);
- ``llm_lambda`` per (method, budget): a probe keeps every token and records Stage 3's attention mass
  per question, then ``methods.solve_lambda`` finds the lambda whose clipped budgets average the target.

`meteor_config` gives METEOR with all three stages at a target ratio, what the demo runs.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..progress import steps
from . import evaluate as ev
from . import methods as mt


def calibrate(model, tokenizer, methods: Sequence[str], budgets: Sequence[int], extra: Sequence[int] = (),
              val_per_kind: int = 100, layers: Optional[Sequence[int]] = None, batch_size: int = 100,
              log=print, meteor: Optional[Dict[str, Any]] = None, ablations: Sequence[str] = (),
              ablation_budgets: Sequence[int] = ()) -> mt.Calibration:
    """Everything the methods need, on ``val_per_kind`` validation questions per kind. ``meteor``: MeteorConfig
    fields of every METEOR run (``Calibration.meteor``)."""
    from ..calibrate import encoder_ranks
    from .model import pixels

    val = ev.eval_set(tokenizer, val_per_kind, split="val")
    images = pixels(val.images[:32])
    ranks, numerical = encoder_ranks(model, images), encoder_ranks(model, images, "numerical")
    pinned = dict(meteor or {})
    layers = list(layers or range(1, model.config.num_hidden_layers))
    k = mt.tokens_for(0.25)
    scores = {}
    for layer in steps(layers, "calibration: llm_layer", "layer"):
        trial = mt.Calibration(ranks, layer, layer, meteor=pinned)
        s3 = None
        if "llm_layer" not in pinned:  # a pinned layer is not chosen: only FastV's is
            solve(model, val, trial, mt.needed_lambdas(["meteor-s3"], [k], pinned=pinned), batch_size)
            s3 = round(ev.evaluate(model, val, mt.config_for("meteor-s3", k, trial), batch_size).accuracy(), 4)
        fv = ev.evaluate(model, val, mt.config_for("fastv", k, trial), batch_size).accuracy()
        scores[layer] = (s3, round(fv, 4))
    meteor_layer = pinned.get("llm_layer") or max(layers, key=lambda la: (scores[la][0], -la))
    cal = mt.Calibration(ranks, meteor_layer, max(layers, key=lambda la: (scores[la][1], -la)), meteor=pinned,
                         numerical_ranks=numerical, fastv_layers=layers)
    chosen = "pinned" if "llm_layer" in pinned else "chosen"
    log(f"calibration on {len(val)} validation questions: encoder ranks {ranks} (numerical {numerical}); accuracy "
        f"at {k} tokens per llm_layer (meteor-s3, fastv) {scores} -> meteor {cal.meteor_layer} ({chosen}), fastv "
        f"{cal.fastv_layer}")
    solve(model, val, cal, mt.needed_lambdas(methods, budgets, extra, ablations, ablation_budgets, pinned), batch_size)
    return cal


def solve(model, val: ev.EvalSet, cal: mt.Calibration, pairs, batch_size: int = 100) -> None:
    """Stage 3's lambda per (method, budget) into ``cal``: probe with every token kept, then bisect."""
    import meteor_plugin

    for method, k in steps(pairs, "calibration: llm_lambda", "run"):
        signals: List[float] = []
        with torch.no_grad(), meteor_plugin.enabled(mt.stage3_probe(method, k, cal)), ev.left_padded(model):
            for start in range(0, len(val), batch_size):
                rows = val.ids[start:start + batch_size]
                ev.forward(model, rows, val.images[start:start + len(rows)])
                signals += mt.signals_from_stats(meteor_plugin.stats(model))
        mt.with_lambda(cal, method, k, mt.solve_lambda(signals, k, mt.entering_tokens(method, k),
                                                       mt.stage3_clip(method, k, cal)))


def meteor_config(model, tokenizer, ratio: float = mt.METEOR_TARGET, val_per_kind: int = 100, log=print,
                  meteor: Optional[Dict[str, Any]] = None):
    """METEOR with all three stages at ``ratio`` of the visual tokens, calibrated on validation."""
    k = mt.tokens_for(ratio)
    cal = calibrate(model, tokenizer, ["meteor"], [k], (), val_per_kind, log=log, meteor=meteor)
    return mt.config_for("meteor", k, cal)
