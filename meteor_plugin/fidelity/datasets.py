"""Splits of the fidelity testbed: seeded samples, a Dataset per split, and a fast batch generator.

Sample ``index`` of split ``split`` under ``seed`` is drawn from its own generator,
``random.Random(f"fidelity/{seed}/{split}/{index}")`` (a string seed is hashed with SHA-512), so
samples are independent, reproducible one by one (same arguments and library versions, same bytes),
and the three splits come from disjoint seed streams. Python's ``random`` is used rather than numpy's
for speed: a scalar draw costs about 0.3 us against about 1 us. The train split is unbounded: take as
many indices as the budget allows.

Speed: about 40 ms of CPU time per batch of 32 multi-turn samples with their token labels, on the
2-core CPU machine with torch 2.13 (textured 96 px scenes; the v1 flat 64 px ones took 7 ms).

The kind of sample ``index`` is ``kinds[index % len(kinds)]`` and its answer cycles through that
kind's answers, so any run of indices is balanced over kinds and answers (chance is exact).

Images are ``torch.uint8`` tensors (3, 96, 96), exactly the rendered bytes; divide by 255 for [0, 1].
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from .batches import build_llava_batch
from .questions import ANSWERS, KINDS, Question, generate, pack_turns
from .scenes import Scene, render, token_labels
from .tokenizer import WordTokenizer

SPLITS = ("train", "val", "test")
LABEL_GRIDS = (8, 12)  # the fidelity model's encoder maps, in fusion order (``model.GRIDS``)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid: allowed {', '.join(SPLITS)}")


def _check_kinds(kinds: Optional[Sequence[str]]) -> Tuple[str, ...]:
    kinds = KINDS if kinds is None else tuple(kinds)
    bad = [k for k in kinds if k not in KINDS]
    if not kinds or bad:
        raise ValueError(f"kinds={kinds!r} is invalid: allowed a non-empty subset of {', '.join(KINDS)}")
    return kinds


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """The generator that sample ``index`` of ``split`` is drawn from."""
    _check_split(split)
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}={value!r} is invalid: allowed an int >= 0")
    return random.Random(f"fidelity/{int(seed)}/{split}/{int(index)}")


@dataclass(frozen=True)
class Sample:
    """One image with its ground truth, its primary question and the questions packed with it."""

    split: str
    index: int
    scene: Scene
    image: torch.Tensor  # uint8 (3, 96, 96)
    question: Question  # the primary, balanced question: evaluate on this one
    turns: Tuple[Question, ...]  # primary plus derived questions, in training order
    token_labels: Dict[str, torch.Tensor]  # "what", "colour", "digit", "centre": int64 (tokens,)

    @property
    def kind(self) -> str:
        return self.question.kind


def make_sample(split: str, index: int, seed: int = 0, kinds: Optional[Sequence[str]] = None,
                max_turns: Optional[int] = None, label_grids: Sequence[int] = LABEL_GRIDS, per_kind: int = 1) -> Sample:
    """Sample ``index`` of ``split``. ``max_turns=1`` gives the primary question alone (evaluation);
    None packs up to ``per_kind`` questions of every kind that is valid for the scene (training)."""
    kinds = _check_kinds(kinds)
    rng = sample_rng(seed, split, index)
    kind = kinds[index % len(kinds)]
    answers = ANSWERS[kind]
    scene, question = generate(kind, answers[(index // len(kinds)) % len(answers)], rng)
    turns = pack_turns(scene, question, rng, max_turns, per_kind)  # after the scene: never changes it
    labels = {k: torch.from_numpy(v) for k, v in token_labels(scene, label_grids).items()}
    return Sample(split, index, scene, torch.from_numpy(render(scene)), question, turns, labels)


class FidelityDataset:
    """Samples ``start .. start + size - 1`` of one split, as a map-style dataset."""

    def __init__(self, split: str, size: int, seed: int = 0, kinds: Optional[Sequence[str]] = None,
                 max_turns: Optional[int] = None, label_grids: Sequence[int] = LABEL_GRIDS, start: int = 0):
        _check_split(split)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size={size!r} is invalid: allowed an int >= 0")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start={start!r} is invalid: allowed an int >= 0")
        self.split, self.size, self.seed, self.start = split, size, seed, start
        self.kinds = _check_kinds(kinds)
        self.max_turns, self.label_grids = max_turns, tuple(label_grids)
        if size:
            self[0]  # one sample (about 1 ms) checks seed, max_turns and label_grids now, not mid-training

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Sample:
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} is out of range for a dataset of {self.size}")
        return make_sample(self.split, self.start + i % self.size, self.seed, self.kinds,
                           self.max_turns, self.label_grids)


def collate(samples: Sequence[Sample], tokenizer: WordTokenizer) -> Dict[str, object]:
    """A batch: ``images`` uint8 (B, 3, 96, 96), ``token_<name>`` labels (B, tokens), the
    LLaVA tensors of `build_llava_batch` over each sample's turns, ``kinds`` (primary kind per row),
    and the samples themselves."""
    if not samples:
        raise ValueError("samples is empty: a batch needs at least one sample")
    batch: Dict[str, object] = {"images": torch.stack([s.image for s in samples])}
    for name in samples[0].token_labels:
        batch["token_" + name] = torch.stack([s.token_labels[name] for s in samples])
    batch.update(build_llava_batch(tokenizer, [s.turns for s in samples]))
    batch["kinds"] = [s.kind for s in samples]
    batch["samples"] = list(samples)
    return batch


def iter_batches(split: str, batch_size: int = 32, seed: int = 0, tokenizer: Optional[WordTokenizer] = None,
                 start: int = 0, stop: Optional[int] = None, kinds: Optional[Sequence[str]] = None,
                 max_turns: Optional[int] = None, label_grids: Sequence[int] = LABEL_GRIDS) -> Iterator[Dict[str, object]]:
    """Collated batches of consecutive samples ``start, start + 1, ...`` (up to ``stop``, exclusive;
    unbounded when None). The last batch may be smaller."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: allowed an int >= 1")
    if stop is not None and stop < start:
        raise ValueError(f"stop={stop!r} is invalid: allowed None or an int >= start ({start})")
    tokenizer = tokenizer or WordTokenizer()
    i = start
    while stop is None or i < stop:
        end = i + batch_size if stop is None else min(i + batch_size, stop)
        yield collate([make_sample(split, j, seed, kinds, max_turns, label_grids) for j in range(i, end)], tokenizer)
        i = end
