"""LLaVA-style batches: ``input_ids`` with the image placeholder, answer-only ``labels``, a mask.

One sequence per image: ``<bos> <image> q1 ? a1 q2 ? a2 ...``, with ``IMAGE_TOKEN_INDEX`` (-200) at
the image position, as LLaVA's ``prepare_inputs_labels_for_multimodal`` expects; the model splices
the visual tokens in there. ``labels`` equal ``input_ids`` at the answer words and are
``IGNORE_INDEX`` (-100) everywhere else, so with the usual shift the loss is taken at every ``?``:
several answers per image, which the note found needed for learning. Batches are right-padded with
``<pad>``; ``attention_mask`` is 1 on real tokens.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple, Union

import torch

from ..stages.layout import IGNORE_INDEX
from ..adapters.family import IMAGE_TOKEN_INDEX
from .questions import KINDS, Question
from .tokenizer import WordTokenizer

Turn = Union[Question, Tuple[str, str]]  # a Question, or (question text, answer word)


def _turn(turn: Turn) -> Tuple[str, str, int]:
    if isinstance(turn, Question):
        return turn.text, turn.answer, KINDS.index(turn.kind)
    question, answer = turn
    return question, answer, -1


def conversation_ids(tokenizer: WordTokenizer, turns: Sequence[Turn],
                     image_token_index: int = IMAGE_TOKEN_INDEX) -> Tuple[List[int], List[int], List[int]]:
    """``input_ids``, ``labels`` and per-position answer kinds (index into KINDS, -1 elsewhere or when
    the turn is a plain pair) of one conversation about one image."""
    if not turns:
        raise ValueError("turns is empty: a conversation needs at least one (question, answer)")
    ids = [tokenizer.bos_token_id, image_token_index]
    labels = [IGNORE_INDEX, IGNORE_INDEX]
    kinds = [-1, -1]
    for turn in turns:
        question, answer, kind = _turn(turn)
        q = tokenizer.encode(question)
        a = tokenizer.encode(answer)
        if len(a) != 1:
            raise ValueError(f"answer {answer!r} is {len(a)} words: answers must be one word")
        ids += q + a
        labels += [IGNORE_INDEX] * len(q) + a
        kinds += [-1] * len(q) + [kind]
    return ids, labels, kinds


def build_llava_batch(tokenizer: WordTokenizer, conversations: Sequence[Sequence[Turn]],
                      image_token_index: int = IMAGE_TOKEN_INDEX) -> Dict[str, torch.Tensor]:
    """Right-padded (B, L) ``input_ids``, ``labels``, ``attention_mask`` and ``label_kinds``.

    Each conversation is a sequence of turns about one image; the image placeholder appears exactly
    once per row, right after ``<bos>``. ``label_kinds`` gives the question kind (index into KINDS) at
    each labelled position, -1 elsewhere, for per-kind accuracy on multi-turn batches.
    """
    if not conversations:
        raise ValueError("conversations is empty: a batch needs at least one conversation")
    rows = [conversation_ids(tokenizer, turns, image_token_index) for turns in conversations]
    length = max(len(r[0]) for r in rows)

    def padded(column: int, fill: int) -> torch.Tensor:  # one tensor call per field: fast
        return torch.tensor([r[column] + [fill] * (length - len(r[column])) for r in rows], dtype=torch.long)

    return {
        "input_ids": padded(0, tokenizer.pad_token_id),
        "labels": padded(1, IGNORE_INDEX),
        "attention_mask": torch.tensor([[1] * len(r[0]) + [0] * (length - len(r[0])) for r in rows]),
        "label_kinds": padded(2, -1),
    }
