"""meteor-plugin merge-lora: a LoRA run's output becomes a standalone checkpoint.

    meteor-plugin merge-lora --model-path LORA_DIR --out MERGED [--model-base BASE] [--dtype auto]

LORA_DIR is what a LoRA run saved (``config.json``, the adapter, ``non_lora_trainables.bin``), or one of
its ``checkpoint-N`` folders. BASE is the model the run started from (default: the one peft recorded in
``adapter_config.json``). The merged folder opens with ``LlavaLlamaForCausalLM.from_pretrained`` and with
LLaVA's ``load_pretrained_model`` (no ``--model-base``), or EAGLE's, and keeps the METEOR config of the run.
A converted EAGLE model is loaded with the plugin enabled (it builds the per-encoder projectors), and its
merged folder keeps them.

This is our own loader rather than LLaVA's ``load_pretrained_model(lora_dir, base, ...)`` because EAGLE's
copy of it cannot run (it imports ``eagleConfig``), it loads ``non_lora_trainables.bin`` with
``strict=False`` (a misnamed projector weight would be dropped without a word; here it is an error), and
it always loads in float16.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Any, Optional

import torch

from ..compat import training as compat_training
from ..compat.transformers import quiet_loading
from .. import adapters
from . import lora, save
from .convert import ConversionError, check_destination, check_model_name, read_model_config

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _dtype_kwargs(dtype: Any) -> dict:
    return {compat_training.dtype_keyword(): dtype}


def config_folder(lora_dir: str) -> str:
    """Where the run's ``config.json`` is: the folder itself, or for a ``checkpoint-N`` saved before they held
    one, the run's output folder above it."""
    if os.path.isfile(os.path.join(lora_dir, "config.json")):
        return lora_dir
    parent = os.path.dirname(os.path.abspath(lora_dir))
    if re.fullmatch(r"checkpoint-\d+", os.path.basename(os.path.abspath(lora_dir))):
        if os.path.isfile(os.path.join(parent, "config.json")):
            return parent
        raise ConversionError(f"{lora_dir} has no config.json, nor has its run folder {parent} (the run has not "
                              "finished): merge a checkpoint saved by this version, which keeps its config")
    raise ConversionError(f"{lora_dir} has no config.json: not the output of a LoRA run")


def check_adapter_folder(lora_dir: str) -> None:
    if not os.path.isdir(lora_dir):
        raise ConversionError(f"--model-path {lora_dir} is not a folder")
    save.require_loadable(lora_dir, "--model-path")
    if not os.path.isfile(os.path.join(lora_dir, "adapter_config.json")):
        raise ConversionError(f"{lora_dir} has no adapter_config.json: not the output of a LoRA run")
    config_folder(lora_dir)
    if not os.path.isfile(os.path.join(lora_dir, lora.NON_LORA_FILE)):
        raise ConversionError(
            f"{lora_dir} has no {lora.NON_LORA_FILE}: the projectors and other fully trained weights of this run were "
            "not saved, so a merge would silently put back the base model's (EAGLE's train.py drops them; runs "
            "through python -m meteor_plugin.train keep them)"
        )
    if os.path.getsize(os.path.join(lora_dir, lora.NON_LORA_FILE)) == 0:  # checked before the base model loads
        raise ConversionError(f"{os.path.join(lora_dir, lora.NON_LORA_FILE)} is empty: the save that wrote it did "
                              "not finish; save the run's weights again")


def resolve_base(lora_dir: str, model_base: Optional[str]) -> str:
    base = model_base or lora.adapter_base(lora_dir)
    if not base:
        raise ConversionError(f"{lora_dir}/adapter_config.json names no base model: pass --model-base")
    if not os.path.isdir(base):
        raise ConversionError(f"the base model {base} is not a local folder: pass --model-base with the checkpoint "
                              "the LoRA run started from")
    if os.path.isfile(os.path.join(base, "adapter_config.json")):
        raise ConversionError(f"--model-base {base} is itself a LoRA adapter: give the model the run started from")
    save.require_loadable(base, "--model-base")
    return base


def load_adapted(lora_dir: str, model_base: Optional[str] = None, dtype: Any = torch.float32) -> Any:
    """The trained model of a LoRA run, unmerged: base + ``non_lora_trainables.bin`` + adapter (a PeftModel)."""
    check_adapter_folder(lora_dir)
    base = resolve_base(lora_dir, model_base)
    trained_config = read_model_config(config_folder(lora_dir))
    cb = adapters.spec_for_checkpoint(trained_config, lora_dir)
    causal_lm, config_class = cb.classes()
    config = config_class.from_pretrained(config_folder(lora_dir))
    base_vocab = read_model_config(base).get("vocab_size", config.vocab_size)
    vocab = config.vocab_size
    config.vocab_size = base_vocab  # load the base as it is, then grow to the run's vocabulary
    # quiet: the weights the base lacks are the run's, which load_non_lora loads strictly just below
    with cb.loading(trained_config), quiet_loading():  # e.g. a converted EAGLE model's per-encoder projectors
        model = causal_lm.from_pretrained(base, config=config, **_dtype_kwargs(dtype))
    if vocab != base_vocab:
        model.resize_token_embeddings(vocab)
    cb.after_load(model)
    lora.load_non_lora(model, lora_dir)
    return lora.attach_adapter(model, lora_dir)


def merge_lora(lora_dir: str, out: str, model_base: Optional[str] = None, dtype: str = "auto") -> str:
    """Write the merged model of a LoRA run to ``out``; returns ``out``."""
    lora_dir, out = os.path.abspath(lora_dir), os.path.abspath(out)
    check_adapter_folder(lora_dir)
    base = resolve_base(lora_dir, model_base)
    check_destination(out, lora_dir)
    cb = adapters.spec_for_checkpoint(read_model_config(config_folder(lora_dir)), lora_dir)
    check_model_name(out, cb.keyword, "--out")
    if dtype == "auto":
        torch_dtype = DTYPES.get(str(read_model_config(base).get("torch_dtype") or read_model_config(base).get("dtype")),
                                 torch.float32)
    else:
        if dtype not in DTYPES:
            raise ConversionError(f"--dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
        torch_dtype = DTYPES[dtype]
    model = lora.merged(load_adapted(lora_dir, base, torch_dtype))
    model.config.use_cache = True

    staging = save.staging_folder(out)
    try:
        model.save_pretrained(staging)
        source = lora_dir if os.path.isfile(os.path.join(lora_dir, "tokenizer_config.json")) else base
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(source, name)):
                shutil.copy2(os.path.join(source, name), os.path.join(staging, name))
        save.finish(staging)
        if os.path.isdir(out):
            os.rmdir(out)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _run(args: argparse.Namespace) -> int:
    try:
        out = merge_lora(args.model_path, args.out, args.model_base, args.dtype)
    except (ConversionError, save.IncompleteCheckpointError, KeyError, ValueError, FileNotFoundError) as exc:
        print(f"meteor-plugin merge-lora: error: {exc}", file=sys.stderr)
        return 2
    meteor = read_model_config(out).get("meteor")
    print(f"merged {args.model_path} -> {out}")
    print("METEOR config kept: " + (json.dumps(meteor, sort_keys=True) if meteor else "none (the run had none)"))
    return 0


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "merge-lora", help="merge a LoRA run (adapter + non_lora_trainables.bin) into a standalone checkpoint",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="the LoRA run's output folder (or a checkpoint-N in it)")
    parser.add_argument("--out", required=True, help="the merged model's folder; its name must keep 'llava' (or 'eagle')")
    parser.add_argument("--model-base", help="the model the run started from (default: from adapter_config.json)")
    parser.add_argument("--dtype", default="auto", help="auto (the base's dtype), float32, float16 or bfloat16")
    parser.set_defaults(func=_run)
    return parser
