"""A tiny LLaVA checkpoint on disk, with a tokenizer, that LLaVA's own code opens without the hub.

Used by tests of several parts (loading, patching, training). What it satisfies:

- ``load_pretrained_model`` (llava/model/builder.py) reads the folder name: it contains "llava" (so the
  multimodal branch and an image processor are used) and "v1" (the eval scripts guess the conversation
  mode from it). The CLIP tower is saved beside the checkpoint and named by absolute path in
  ``mm_vision_tower``, which LLaVA's ``CLIPVisionTower`` loads from a local folder.
- ``AutoTokenizer.from_pretrained(folder, use_fast=False)`` (what LLaVA's ``train()`` and loader call) loads
  a word-level ``tokenizers`` tokenizer saved through ``PreTrainedTokenizerFast``: no slow class exists
  for it, so transformers 4.37, 4.44 and 5.x all return the fast one.
- ``llava.train.train``'s ``preprocess_v1`` and ``preprocess_plain`` mask the instruction by tokenising
  the prompt in pieces and checking that the lengths add up ("tokenization mismatch" otherwise masks the
  whole sample). A whitespace word tokenizer is concatenative: the tokens of "a b" are those of "a" and
  of "b". ``</s>`` is a special token, so it splits off "answer</s>" as the v1 template writes it, and
  every word of the v1 system prompt is in the vocabulary (an unknown word becomes ``<unk>``, which is
  also the pad token LLaVA sets for v1, and the collator would mask it out of attention).
- Multi-turn v1 samples read ``tokenizer.legacy``, which only the slow Llama tokenizer has: use
  single-turn samples with this tokenizer (``training_words`` lists the words samples may use).
"""

from __future__ import annotations

import json
import os
from typing import Iterable, List, Optional

from .llava import TinyLlavaSpec, build_tiny_llava

UNK, BOS, EOS = "<unk>", "<s>", "</s>"  # ids 0, 1, 2: the tiny LLaVA config's pad, bos and eos

# Every word of LLaVA's v1 and v0 system prompts, split on whitespace as the tokenizer splits them.
TEMPLATE_WORDS = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: ASSISTANT: "
    "human human's Human: Assistant: ###"
).split()

# Words the tests' training samples are made of (questions and answers about generated images).
DATA_WORDS = (
    "what is the colour of shape in this image ? describe it . red green blue yellow white black "
    "circle square triangle left right top bottom one two three four yes no there"
).split()


def training_words() -> List[str]:
    """Words that tokenise to themselves (never ``<unk>``): build sample text from these."""
    return list(DATA_WORDS)


def build_vocab(vocab_size: int, extra: Iterable[str] = ()) -> dict:
    words = [UNK, BOS, EOS] + TEMPLATE_WORDS + DATA_WORDS + list(extra)
    vocab: dict = {}
    for word in words:
        vocab.setdefault(word, len(vocab))
    if len(vocab) > vocab_size:
        raise ValueError(f"the tiny tokenizer needs {len(vocab)} words but the model's vocab_size is {vocab_size}")
    filler = 0
    while len(vocab) < vocab_size:  # fill up so every embedding row has a token
        vocab.setdefault(f"w{filler}", len(vocab))
        filler += 1
    return vocab


def save_tiny_tokenizer(folder: str, vocab_size: int = 256, extra_words: Iterable[str] = ()) -> str:
    """Write a word-level tokenizer (bos ``<s>`` prepended, ``<unk>`` as pad) into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from ..compat.transformers import save_tokenizer_portable

    vocab = build_vocab(vocab_size, extra_words)
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    os.makedirs(folder, exist_ok=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS,
                                        pad_token=UNK)
    # written so that a folder made by one stack loads in the others
    return save_tokenizer_portable(tokenizer, folder)


def save_tiny_llava_checkpoint(parent: str, spec: Optional[TinyLlavaSpec] = None, name: str = "tiny-llava-v1") -> str:
    """Write ``parent/name`` (a LLaVA checkpoint and its tokenizer) and the CLIP tower under
    ``parent/tower``; returns the checkpoint folder. ``name`` must keep "llava" for LLaVA's loader."""
    if "llava" not in name.lower():
        raise ValueError(f"checkpoint name {name!r} must contain 'llava': LLaVA's load_pretrained_model reads it")
    spec = spec or TinyLlavaSpec()
    model = build_tiny_llava(spec, folder=os.path.join(parent, "tower"))
    # LLaVA-1.5 checkpoints set both to False; the eval scripts and train() read them from the config.
    model.config.mm_use_im_start_end = False
    model.config.mm_use_im_patch_token = False
    folder = os.path.join(parent, name)
    model.save_pretrained(folder)
    save_tiny_tokenizer(folder, spec.vocab_size)
    return folder


def vision_tower_path(checkpoint: str) -> str:
    """The CLIP folder a tiny checkpoint's config names (what ``--vision_tower`` must be in training)."""
    with open(os.path.join(checkpoint, "config.json"), encoding="utf-8") as fh:
        return json.load(fh)["mm_vision_tower"]
