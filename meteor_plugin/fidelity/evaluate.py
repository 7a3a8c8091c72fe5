"""Accuracy of a fidelity model under a pruning config, per question kind, with the tokens really kept.

Each test sample's primary question is asked alone in the ``v1`` prompt the model was trained on
(``<s> SYSTEM USER: <image> question ASSISTANT:``); the answer is the most likely next word over the
whole vocabulary, read at the last prompt position (every answer is one word). Batches are left-padded
inside the model (``tokenizer_padding_side``), so the last position is the prompt's last token for every
row whatever a pruning stage removed.

Tokens kept come from ``meteor_plugin.stats(model)`` after each batch: per sample, the visual tokens
that left the last stage that ran (``baseline`` for the pre-LLM baselines, else ``encoder`` ->
``fusion`` -> ``llm``; for Stage 3, the tokens after ``llm_layer``), and the tokens that entered the
language model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..progress import steps
from .datasets import make_sample
from .llava_format import prompt_ids
from .model import pixels
from .questions import KINDS
from .tokenizer import IMAGE_TOKEN_INDEX

PIPELINE = ("baseline", "encoder", "fusion", "llm")  # stage names in RunStats, in the order they run
LLM_INPUT = ("baseline", "encoder", "fusion")


@dataclass
class EvalSet:
    """Test questions ready for the model: ids (unpadded), uint8 images, answer ids and kinds."""

    ids: List[List[int]]
    images: torch.Tensor  # uint8 (N, 3, 96, 96)
    answers: torch.Tensor  # (N,) answer token ids
    kinds: List[str]
    indices: List[int]

    def __len__(self) -> int:
        return len(self.ids)


def eval_set(tokenizer, per_kind: int, split: str = "test", seed: int = 0, start: int = 0) -> EvalSet:
    """``per_kind`` primary questions of every kind: samples ``start .. start + 4 * per_kind - 1`` of
    ``split`` (kinds cycle with the index, answers are balanced within each kind)."""
    if per_kind < 1:
        raise ValueError(f"per_kind={per_kind} is invalid: allowed >= 1")
    samples = [make_sample(split, i, seed=seed, max_turns=1)
               for i in steps(range(start, start + per_kind * len(KINDS)), f"{split} questions", "question")]
    answers = []
    for s in samples:
        ids = tokenizer(s.question.answer, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(f"answer {s.question.answer!r} is not one token of this tokenizer: {ids}")
        answers.append(ids[0])
    return EvalSet([prompt_ids(tokenizer, s.question.text) for s in samples], torch.stack([s.image for s in samples]),
                   torch.tensor(answers), [s.kind for s in samples], [s.index for s in samples])


@dataclass
class EvalResult:
    correct: List[bool]
    kinds: List[str]
    kept: List[int]  # visual tokens after the last stage that ran, per sample
    llm_input: List[int]  # visual tokens entering the language model, per sample
    predictions: List[int] = field(default_factory=list)
    layer_visual: List[List[int]] = field(default_factory=list)  # per sample: visual tokens each decoder layer ran on

    def accuracy(self, kind: Optional[str] = None) -> float:
        picked = [c for c, k in zip(self.correct, self.kinds) if kind is None or k == kind]
        return sum(picked) / len(picked) if picked else float("nan")

    def mean_kept(self, kind: Optional[str] = None) -> float:
        picked = [t for t, k in zip(self.kept, self.kinds) if kind is None or k == kind]
        return sum(picked) / len(picked) if picked else float("nan")

    def mean_llm_input(self, kind: Optional[str] = None) -> float:
        picked = [t for t, k in zip(self.llm_input, self.kinds) if kind is None or k == kind]
        return sum(picked) / len(picked) if picked else float("nan")

    def mean_layer_visual(self) -> List[float]:
        """Mean visual tokens each decoder layer processed (what its compute scales with)."""
        if not self.layer_visual:
            return []
        return [sum(col) / len(col) for col in zip(*self.layer_visual)]

    def summary(self) -> Dict[str, object]:
        kinds = [k for k in KINDS if k in self.kinds]
        return {
            "accuracy": {**{k: self.accuracy(k) for k in kinds}, "overall": self.accuracy()},
            "kept": {**{k: self.mean_kept(k) for k in kinds}, "overall": self.mean_kept()},
            "llm_input": self.mean_llm_input(),
            "questions": len(self.correct),
        }


def tokens_from_stats(run_stats, batch: int) -> (List[int], List[int]):
    kept, entered = [], []
    for i in range(batch):
        sample = run_stats.stages[i] if run_stats is not None else {}
        last = [sample[s].left for s in PIPELINE if s in sample]
        into_llm = [sample[s].left for s in LLM_INPUT if s in sample]
        if not last:
            raise RuntimeError("meteor-plugin recorded no visual-token counts for this forward: is it enabled?")
        kept.append(last[-1])
        entered.append(into_llm[-1] if into_llm else last[0])
    return kept, entered


@contextlib.contextmanager
def left_padded(model):
    """LLaVA's splice re-pads every row on ``tokenizer_padding_side``: left, so the prompt ends last."""
    before = getattr(model.config, "tokenizer_padding_side", "right")
    model.config.tokenizer_padding_side = "left"
    try:
        yield
    finally:
        model.config.tokenizer_padding_side = before


def forward(model, rows: Sequence[Sequence[int]], images: torch.Tensor):
    """One forward of prompts ``rows`` (unpadded ids) and their uint8 images, right-padded with a mask."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([list(r) + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return model(input_ids=ids, attention_mask=mask, images=pixels(images), use_cache=False)


@torch.no_grad()
def evaluate(model, data: EvalSet, config, batch_size: int = 100,
             progress: Optional[Callable[[int], None]] = None) -> EvalResult:
    """Answer every question of ``data`` with meteor-plugin enabled with ``config`` (a scope: nothing else changes)."""
    import meteor_plugin

    model.eval()
    correct: List[bool] = []
    kept: List[int] = []
    entered: List[int] = []
    predictions: List[int] = []
    layer_visual: List[List[int]] = []
    with meteor_plugin.enabled(config), left_padded(model):
        for start in range(0, len(data), batch_size):
            rows = data.ids[start:start + batch_size]
            logits = forward(model, rows, data.images[start:start + len(rows)]).logits
            guess = logits[:, -1].argmax(-1)
            predictions += guess.tolist()
            correct += (guess == data.answers[start:start + len(rows)]).tolist()
            run = meteor_plugin.stats(model)
            k, e = tokens_from_stats(run, len(rows))
            kept += k
            entered += e
            text = [sum(1 for t in r if t != IMAGE_TOKEN_INDEX) for r in rows]
            layer_visual += [[layer[i] - text[i] for layer in run.layer_tokens] for i in range(len(rows))]
            if progress is not None:
                progress(len(rows))
    return EvalResult(correct, list(data.kinds), kept, entered, predictions, layer_visual)


def prefill_flops(model, data: EvalSet, config, count: int = 32) -> float:
    """Mean prefill FLOPs of one question under ``config``, the work that is needed, counted as ``meteor-plugin bench``
    counts them (``meteor_plugin.flops``: matmuls, convolutions, attention with causal attention as its lower
    triangle, whether a mask makes the kernel compute more or not; encoders, projectors and language model) over the
    first ``count`` questions of ``data``, each alone (a batch would count its padding)."""
    import meteor_plugin

    from ..flops import count_flops

    model.eval()
    total = 0.0
    n = min(count, len(data))
    with torch.no_grad(), meteor_plugin.enabled(config), left_padded(model):
        for i in range(n):
            total += count_flops(lambda: forward(model, data.ids[i:i + 1], data.images[i:i + 1]))
    return total / n


def per_kind_table(results: Dict[str, EvalResult], kinds: Sequence[str] = KINDS) -> str:
    """A plain table: one row per config, accuracy per kind and overall, mean tokens kept."""
    head = f"{'config':<28}" + "".join(f"{k:>14}" for k in kinds) + f"{'overall':>9}{'kept':>7}"
    lines = [head]
    for name, r in results.items():
        lines.append(f"{name:<28}" + "".join(f"{r.accuracy(k):>14.3f}" for k in kinds)
                     + f"{r.accuracy():>9.3f}{r.mean_kept():>7.1f}")
    return "\n".join(lines)
