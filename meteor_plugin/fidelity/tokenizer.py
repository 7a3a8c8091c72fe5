"""A word-level tokenizer built in code: the testbed's vocabulary, no downloads.

Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``<image>`` 4, then every question and answer
word (`questions.vocabulary()`, 39 words). Text is split on whitespace, with ``?`` always a word of its
own. An unknown word raises ``ValueError`` naming it, unless ``unknown="unk"`` asks for ``<unk>``:
the testbed's text is closed, so an unknown word is a bug to surface, not data to absorb.

LLaVA marks the image inside ``input_ids`` with ``IMAGE_TOKEN_INDEX = -200`` (see `batches.py`);
`decode` reads -200 back as ``<image>``.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Optional, Sequence, Union

from ..adapters.family import IMAGE_TOKEN_INDEX  # LLaVA's placeholder id for the image in input_ids
from .questions import vocabulary

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<image>")
_FORMAT = "meteor_plugin.fidelity.WordTokenizer"


class WordTokenizer:
    """Maps words to ids and back over a fixed vocabulary (the special tokens come first)."""

    def __init__(self, words: Optional[Sequence[str]] = None):
        words = tuple(vocabulary() if words is None else words)
        for w in words:
            if not isinstance(w, str) or not w or w != w.strip() or len(w.split()) != 1:
                raise ValueError(f"words contains {w!r}: each word must be a non-empty string without spaces")
            if w in SPECIAL_TOKENS:
                raise ValueError(f"words contains the special token {w!r}: they are added automatically")
        self.vocab = SPECIAL_TOKENS + words
        self._ids: Dict[str, int] = {w: i for i, w in enumerate(self.vocab)}
        if len(self._ids) != len(self.vocab):
            dup = sorted({w for w in words if words.count(w) > 1})
            raise ValueError(f"words has duplicates: {dup}")
        self.pad_token_id, self.bos_token_id, self.eos_token_id, self.unk_token_id, self.image_token_id = range(5)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    def token_to_id(self, word: str) -> int:
        """The id of one word; raises ValueError if it is not in the vocabulary."""
        try:
            return self._ids[word]
        except KeyError:
            raise ValueError(f"word {word!r} is not in the vocabulary ({len(self.vocab)} words)") from None

    @staticmethod
    def split(text: str) -> List[str]:
        return text.replace("?", " ? ").split()

    def encode(self, text: str, add_bos: bool = False, unknown: str = "error") -> List[int]:
        """Ids of the words of ``text``; ``unknown`` is "error" (raise) or "unk" (map to ``<unk>``)."""
        if unknown not in ("error", "unk"):
            raise ValueError(f"unknown={unknown!r} is invalid: allowed 'error' or 'unk'")
        words = self.split(text)
        if unknown == "unk":
            ids = [self._ids.get(w, self.unk_token_id) for w in words]
        else:
            ids = [self.token_to_id(w) for w in words]
        return [self.bos_token_id] + ids if add_bos else ids

    __call__ = encode

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Words of ``ids`` joined by spaces; -200 (LLaVA's image placeholder) reads as ``<image>``."""
        words = []
        for i in ids:
            i = int(i)
            if i == IMAGE_TOKEN_INDEX:
                i = self.image_token_id
            if not 0 <= i < len(self.vocab):
                raise ValueError(f"id {i} is invalid: allowed [0, {len(self.vocab) - 1}] or {IMAGE_TOKEN_INDEX}")
            if skip_special_tokens and i < len(SPECIAL_TOKENS):
                continue
            words.append(self.vocab[i])
        return " ".join(words)

    def save(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"format": _FORMAT, "vocab": list(self.vocab)}, f, indent=1)

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "WordTokenizer":
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a saved WordTokenizer (no format {_FORMAT!r})")
        vocab = data["vocab"]
        if tuple(vocab[:len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: the vocabulary must start with {SPECIAL_TOKENS}")
        return cls(vocab[len(SPECIAL_TOKENS):])
