"""A tiny LLaVA checkpoint on disk that LLaVA's own ``load_pretrained_model`` loads without the hub.

The folder name contains "llava" and "v1" (LLaVA's loader and its conversation-mode guess read the
name). The tokenizer is a word-level ``tokenizers`` tokenizer saved through ``PreTrainedTokenizerFast``,
which ``AutoTokenizer.from_pretrained(path, use_fast=False)`` loads as it is, since no slow class exists.
"""

import os

from meteor_plugin.testing.llava import TinyLlavaSpec, build_tiny_llava

WORDS = (
    "a chat between curious human and an artificial intelligence assistant . the gives helpful , detailed "
    "polite answers to questions USER: ASSISTANT: what is in this image ? describe colour shape red blue"
).split()


def save_tokenizer(folder: str, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {}
    for word in ["<unk>", "<s>", "</s>"] + WORDS + [f"w{i}" for i in range(vocab_size)]:
        if len(vocab) < vocab_size:
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>"
    ).save_pretrained(folder)


def save_tiny_llava_checkpoint(parent: str) -> str:
    """Writes ``parent/tiny-llava-v1`` (and its CLIP tower beside it); returns the checkpoint folder."""
    spec = TinyLlavaSpec()
    model = build_tiny_llava(spec, folder=os.path.join(parent, "tower"))
    # The eval scripts read these two from the config; LLaVA v1.5 checkpoints set both to False.
    model.config.mm_use_im_start_end = False
    model.config.mm_use_im_patch_token = False
    folder = os.path.join(parent, "tiny-llava-v1")
    model.save_pretrained(folder)
    save_tokenizer(folder, spec.vocab_size)
    return folder
