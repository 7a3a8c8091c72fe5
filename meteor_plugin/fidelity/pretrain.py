"""Phase 1 of the fidelity model's training: vision pretraining with a dense per-token auxiliary loss.

Real LLaVA and EAGLE checkpoints start from pretrained encoders (CLIP, ConvNeXt) and a projector aligned
to the LLM; ours start from random weights. The shared note measured that VQA training from scratch
stays at chance for 10 CPU minutes, and that a dense per-token loss on the visual tokens, predicting
what each token's cell holds, breaks that. This phase is that loss alone, on the two encoders and
their per-encoder projectors: every projected token of both encoders predicts its cell's content
(``what``: nothing/shape/digit, ``colour``, ``digit`` value) through three linear heads shared by the
encoders, and ``centre``: whether the token holds an object's centre, which counting reads). The heads
are thrown away; the encoders and projectors are saved in the checkpoint that
phase 2 (VQA fine-tuning through ``python -m meteor_plugin.train``) starts from.

The projected tokens come from the model's own ``encode_images`` with meteor-plugin enabled and
nothing pruned, exactly what the language model receives later.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .datasets import iter_batches
from .scenes import COLOUR_CLASSES, DIGIT_CLASSES, WHAT_CLASSES

LABELS = (("what", len(WHAT_CLASSES)), ("colour", len(COLOUR_CLASSES)), ("digit", len(DIGIT_CLASSES)),
          ("centre", 2))


@dataclass
class PretrainSettings:
    steps: int = 600  # at most; fewer when ``seconds`` runs out first
    seconds: Optional[float] = None  # wall-clock budget: the schedule follows whichever ends first
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 30
    seed: int = 0
    data_seed: int = 0
    start: int = 10_000_000  # train-split indices far from phase 2's, so the phases see different images
    log_every: int = 50


class CellHeads(nn.Module):
    """Linear heads from a projected visual token to its cell's labels."""

    def __init__(self, width: int):
        super().__init__()
        self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in LABELS})

    def forward(self, tokens: torch.Tensor) -> Dict[str, torch.Tensor]:
        return {name: head(tokens) for name, head in self.heads.items()}


def vision_parameters(model) -> List[nn.Parameter]:
    inner = model.get_model()
    return list(inner.get_vision_tower().parameters()) + list(inner.mm_projectors.parameters())


def aux_loss(model, heads: CellHeads, batch: Dict[str, object]) -> Dict[str, torch.Tensor]:
    """Cross-entropy of every projected token's labels, and per-label accuracy.

    Factorised so that rare classes are learned: ``what`` on every token and again on the tokens of
    objects and the digit (most tokens are background), ``colour`` and ``centre`` only on tokens of an
    object, ``digit`` only on tokens of the digit. Unmasked, "nothing here" was 95% of the digit targets
    in v1 and a 300-step run never learned a digit value (accuracy stayed at the share of empty tokens).
    """
    from .model import pixels

    tokens = model.encode_images(pixels(batch["images"]))  # (B, 208, D), encoder by encoder
    logits = heads(tokens)
    what = batch["token_what"]  # (B, 208), in the same order (``scenes.token_labels``)
    if what.shape != tokens.shape[:2]:
        raise ValueError(f"labels for {tuple(what.shape)} tokens, the model made {tuple(tokens.shape[:2])}")
    shape = (what > 0) & (what < WHAT_CLASSES.index("digit"))
    on = {"what": torch.ones_like(what, dtype=torch.bool), "colour": shape, "centre": shape,
          "digit": what == WHAT_CLASSES.index("digit")}
    out: Dict[str, torch.Tensor] = {}
    total = tokens.new_zeros(())
    for name, n in LABELS:
        target = batch["token_" + name]
        mask = on[name]
        if not bool(mask.any()):
            continue
        picked, wanted = logits[name][mask], target[mask]
        total = total + F.cross_entropy(picked, wanted)
        out[name + "_acc"] = (picked.argmax(-1) == wanted).float().mean().detach()
    # "what" again on the tokens of things: which shape, or the digit
    occupied = what > 0
    if bool(occupied.any()):
        picked = logits["what"][occupied]
        total = total + F.cross_entropy(picked, what[occupied])
        out["object_what_acc"] = (picked.argmax(-1) == what[occupied]).float().mean().detach()
    out["loss"] = total
    return out


def lr_at(step: int, settings: PretrainSettings, elapsed: float = 0.0) -> float:
    """Linear warmup, then cosine to 10% of the peak over the steps or the seconds, whichever ends first."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    if settings.seconds:
        progress = max(progress, elapsed / settings.seconds)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain(model, settings: Optional[PretrainSettings] = None,
             log: Optional[Callable[[Dict[str, float]], None]] = None) -> List[Dict[str, float]]:
    """Train ``model``'s encoders and per-encoder projectors in place; returns the logged history.

    meteor-plugin must be enabled with nothing pruned (``model.enable_unpruned``).
    """
    from .model import GRIDS

    settings = settings or PretrainSettings()
    torch.manual_seed(settings.seed)
    heads = CellHeads(model.config.hidden_size)
    params = vision_parameters(model) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, betas=(0.9, 0.98), weight_decay=settings.weight_decay)
    # Eval mode with gradients: the towers have no dropout or batch norm, and eval mode skips the
    # activation checkpointing EAGLE's towers do in training (it would only recompute them).
    model.eval()
    history: List[Dict[str, float]] = []
    batches = iter_batches("train", settings.batch_size, settings.data_seed, start=settings.start,
                           stop=settings.start + settings.steps * settings.batch_size, max_turns=1, label_grids=GRIDS)
    began = time.perf_counter()
    for step, batch in enumerate(batches):
        elapsed = time.perf_counter() - began
        if settings.seconds is not None and elapsed >= settings.seconds:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, settings, elapsed)
        out = aux_loss(model, heads, batch)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        last = step + 1 == settings.steps or (settings.seconds is not None
                                              and time.perf_counter() - began >= settings.seconds)
        if step == 0 or (step + 1) % settings.log_every == 0 or last:
            record = {"step": step + 1, "seconds": round(time.perf_counter() - began, 1),
                      **{k: round(float(v.detach()), 4) for k, v in out.items()}}
            history.append(record)
            if log is not None:
                log(record)
    return history
