"""What the families of transformers' own vision-language classes share (LLaVA/NeXT/OneVision, Qwen-VL): their
per-call record (``VlmCall``, in ``MeteorCall.family``), the prompt's runs of image tokens cut to the features
each image keeps (``fit_prompt``), the labels flag of a loss forward, and the refusals they have in common.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

from ... import percall


@dataclass
class VlmCall:
    """What one call of a transformers vision-language model carries between its methods (``MeteorCall.family``)."""

    layout: Any = None  # the layout generate built for its prefill
    plan: Any = None  # Stage 1's plan while the tower runs
    kept: Any = None  # Stage 1's (or a pre-LLM baseline's) kept patches per CLIP input, from the last encoding
    stage: Optional[str] = None  # which of them kept those: "encoder" or "baseline" (None: nothing was pruned)
    baseline: Any = None  # a pre-LLM baseline while the tower runs (hf_llava/common.Baseline)
    sizes: Any = None  # with proportional attention: the tokens each kept patch stands for, per CLIP input
    labels: bool = False  # a loss is taken
    embeds: Any = None  # transformers 4.x: the spliced prompt generate's prefill runs on (hf_llava/v4.py)


def state() -> VlmCall:
    """This call's record (created at its first use)."""
    call = percall.current()
    if call.family is None:
        call.family = VlmCall()
    return call.family


def image_runs(ids: torch.Tensor, valid: torch.Tensor, token: int) -> List[Tuple[int, int, int]]:
    """(sample, start, end) of every run of image tokens, in the order the model fills them."""
    runs = []
    image = (ids == token) & valid
    for i in range(ids.shape[0]):
        positions = torch.nonzero(image[i]).flatten().tolist()
        for p in positions:
            if runs and runs[-1][0] == i and runs[-1][2] == p:
                runs[-1] = (i, runs[-1][1], p + 1)
            else:
                runs.append((i, p, p + 1))
    return runs


def fit_prompt(ids: torch.Tensor, mask: Optional[torch.Tensor], token: int, counts: List[int]) -> tuple:
    """Each image's run of image tokens cut to its feature count (its last tokens dropped), rows re-padded on
    the side the mask pads; returns (ids, mask, runs after the cut)."""
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    runs = image_runs(ids, valid, token)
    if len(runs) != len(counts) or any(end - start < n for (_, start, end), n in zip(runs, counts)):
        raise ValueError(
            f"meteor-plugin: the prompt has {len(runs)} runs of image tokens of lengths "
            f"{[end - start for _, start, end in runs]} for {len(counts)} images of {counts} features; was it built "
            "by this model's processor (one run per image, images not adjacent)?")
    kept = valid.clone()
    for (i, start, end), n in zip(runs, counts):
        kept[i, start + n:end] = False
    if bool(kept.eq(valid).all()):
        return ids, mask, runs
    b = ids.shape[0]
    width = int(kept.sum(dim=1).max())
    left = mask is not None and bool((~valid[:, 0]).any()) and bool(valid[:, -1].all())
    new_ids = ids.new_zeros(b, width)
    new_mask = torch.zeros(b, width, dtype=mask.dtype if mask is not None else torch.long, device=ids.device)
    for i in range(b):
        row = ids[i][kept[i]]
        span = slice(width - row.shape[0], width) if left else slice(0, row.shape[0])
        new_ids[i, span] = row
        new_mask[i, span] = 1
    new_valid = new_mask.bool()
    return new_ids, (new_mask if mask is not None or not bool(new_valid.all()) else None), image_runs(
        new_ids, new_valid, token)


def wrap_causal_forward(original: Any) -> Any:
    """The causal class's ``forward``: notes for the inner forward whether labels were given."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    @percall.entry
    def forward(self, *args, **kwargs):
        mine = state()
        mine.labels = signature.bind(self, *args, **kwargs).arguments.get("labels") is not None
        try:
            return original(self, *args, **kwargs)
        finally:
            mine.labels = False

    return forward


def refuse_beams(model: Any, cfg: Any, kwargs: Dict[str, Any]) -> None:
    if cfg.llm:
        beams = kwargs.get("num_beams", getattr(getattr(model, "generation_config", None), "num_beams", 1)) or 1
        if beams > 1:
            raise NotImplementedError(
                f"meteor-plugin Stage 3 does not support beam search (num_beams={beams}); use num_beams=1 "
                "or enable(..., llm=False)")


def refuse_training(model: Any, labels: bool) -> None:
    if labels or (model.training and torch.is_grad_enabled()):
        raise NotImplementedError(
            f"meteor-plugin: a loss or training forward of transformers' {type(model).__name__} with pruning "
            "is not supported (its labels would not follow the pruned sequence); the llava package's "
            "classes train pruned (meteor_plugin.train), or set encoder=False, llm=False")


def with_users_prompt(out: Any, prompt: torch.Tensor, fitted: torch.Tensor) -> Any:
    """``generate``'s output with the user's ``prompt`` in front of the new tokens, where the model ran a ``fitted``
    (shortened) prompt: callers slice the new tokens off at their prompt's length, as unpruned generate lets them."""
    if fitted.shape == prompt.shape:
        return out
    sequences = out if torch.is_tensor(out) else out.sequences
    repeat = sequences.shape[0] // prompt.shape[0]
    restored = torch.cat([prompt.repeat_interleave(repeat, dim=0), sequences[:, fitted.shape[1]:]], dim=1)
    if torch.is_tensor(out):
        return restored
    out.sequences = restored
    return out


def chat_inputs(model: Any, processor: Any, image: Any, question: str) -> Dict[str, Any]:
    """The inputs of ``model.generate`` (and ``model``) asking ``question`` about the PIL ``image`` through the
    checkpoint's own processor and chat template (what transformers' model cards do)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    param = next(model.parameters())
    return {k: (v.to(device=param.device, dtype=param.dtype) if v.is_floating_point() else v.to(param.device))
            if torch.is_tensor(v) else v for k, v in inputs.items()}


def open_checkpoint(path: str, config: Dict[str, Any], class_names: List[str]) -> Optional[tuple]:
    """(processor, model) of a transformers checkpoint whose ``architectures`` name one of ``class_names``, loaded
    with transformers' own loaders in float32 on the CPU; None for any other checkpoint."""
    import importlib

    import transformers

    name = next((a for a in config.get("architectures") or [] if a in class_names), None)
    if name is None:
        return None
    cls = getattr(transformers, name, None) or getattr(importlib.import_module("transformers"), name)
    processor = transformers.AutoProcessor.from_pretrained(path)
    model = cls.from_pretrained(path).float().eval()
    return processor, model
