"""The fidelity task in LLaVA's ``v1`` conversation format, which LLaVA's and EAGLE's ``train()`` read.

- `save_hf_tokenizer`: the task's words as a Hugging Face word-level tokenizer that ``AutoTokenizer
  .from_pretrained(folder, use_fast=False)`` loads on transformers 4.37, 4.44 and 5.x (the loaders and
  ``train()`` call exactly that). Ids: ``<unk>`` 0 (LLaVA's v1 pad), ``<s>`` 1, ``</s>`` 2, the template
  words, the system prompt's words, then `questions.vocabulary()`. The v1 system prompt is kept as its
  22 words, as real checkpoints see it: those tokens before the image are where a trained LLaVA parks
  much of its attention (the sink), which Stage 3's budget signal must cope with.
- `conversation_record`: one image's packed turns as a LLaVA data record (``{"id", "image",
  "conversations"}``), what ``--data_path`` holds.
- `prompt_ids`: the ids of a v1 prompt ending in ``ASSISTANT:``, where the answer word is read.

The tokenizer is concatenative (the ids of "a b" are those of "a" then "b"; ``</s>`` splits off
"answer</s>"), which ``preprocess_v1``'s instruction masking relies on.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from ..adapters.family import IMAGE_TOKEN_INDEX
from .questions import Question, vocabulary

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
# LLaVA's conv_vicuna_v1 (the "v1" template) system prompt, roles and separators.
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = ("USER", "ASSISTANT")
VERSION = "v1"


def hf_vocab() -> Dict[str, int]:
    words = [UNK, BOS, EOS, ROLES[0] + ":", ROLES[1] + ":"]
    for w in SYSTEM.split() + list(vocabulary()):
        if w not in words:
            words.append(w)
    return {w: i for i, w in enumerate(words)}


def vocab_size() -> int:
    """Ids the model's embedding needs."""
    return len(hf_vocab())


def build_hf_tokenizer():
    """The task's ``PreTrainedTokenizerFast`` (see the module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = hf_vocab()
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=UNK, bos_token=BOS, eos_token=EOS, pad_token=UNK)
    if len(out) != vocab_size():
        raise RuntimeError(f"the fidelity tokenizer has {len(out)} ids, expected {vocab_size()}")
    return out


def save_hf_tokenizer(folder: str) -> str:
    """Write the tokenizer into ``folder`` so every supported transformers version loads it."""
    from ..compat.transformers import save_tokenizer_portable

    return save_tokenizer_portable(build_hf_tokenizer(), folder)


def load_hf_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, use_fast=False)


def conversation_record(sample_id: str, image: str, turns: Sequence[Question]) -> dict:
    """A LLaVA data record: the image and the packed questions as human/gpt turns."""
    conversations: List[dict] = []
    for i, q in enumerate(turns):
        conversations.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + q.text})
        conversations.append({"from": "gpt", "value": q.answer})
    return {"id": sample_id, "image": image, "conversations": conversations}


def prompt_text(question: str) -> str:
    """The v1 prompt for one question about the image, ready for the answer."""
    return f"{SYSTEM} {ROLES[0]}: <image>\n{question} {ROLES[1]}:"


def prompt_ids(tokenizer, question: str) -> List[int]:
    """Ids of `prompt_text` with LLaVA's image placeholder (-200), as ``tokenizer_image_token`` makes them."""
    before, after = prompt_text(question).split("<image>")
    head = tokenizer(before).input_ids
    tail = tokenizer(after, add_special_tokens=False).input_ids
    return head + [IMAGE_TOKEN_INDEX] + tail


def export_questions(folder: str, per_kind: int, split: str = "val", seed: int = 0, start: int = 0) -> str:
    """``per_kind`` primary questions of every kind of ``split`` (samples ``start`` on) as LLaVA's question format
    (``questions.jsonl`` of ``{"image", "question", "answer"}`` with PNG images beside it): what ``meteor-plugin
    calibrate --questions`` reads. Returns the file's path."""
    import json
    import os

    from PIL import Image

    from .datasets import make_sample
    from .questions import KINDS

    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "questions.jsonl")
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(start, start + per_kind * len(KINDS)):
            sample = make_sample(split, i, seed=seed, max_turns=1)
            name = f"{split}-{seed}-{i}.png"
            Image.fromarray(sample.image.permute(1, 2, 0).numpy()).save(os.path.join(folder, name))
            fh.write(json.dumps({"image": name, "question": sample.question.text, "answer": sample.question.answer,
                                 "kind": sample.kind}) + "\n")
    return path
