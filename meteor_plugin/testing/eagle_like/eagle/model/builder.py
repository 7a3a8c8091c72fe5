"""``load_pretrained_model``: EAGLE's loader, with its naming rules and return values.

Reproduces: the branch is chosen from ``model_name`` (the folder name, see
``mm_utils.get_model_name_from_path``): with "eagle" in it, the LoRA branch (needs "lora" and a base;
it imports ``eagleConfig``, a name EAGLE's module does not have, so it raises ImportError as upstream;
with the name provided, it loads the base with the adapter folder's config, then
``non_lora_trainables.bin`` with ``strict=False``, then the adapter, and merges it),
the projector-only branch (a base plus ``mm_projector.bin``) or the full checkpoint; without "eagle",
``EagleLlamaForCausalLM`` is still loaded but ``image_processor`` is None. ``device != "cuda"`` gives
``device_map={"": device}``; fp16 unless 8/4-bit; ``use_flash_attn`` asks for FlashAttention-2;
the tower is cast to fp16 on ``device_map`` only when ``device_map != "auto"``; ``context_len`` is
``max_sequence_length`` or 2048.
Differs: the tokenizer is loaded only when one is saved in the folder (None otherwise, and then no
tokens are added and the embeddings are not resized; EAGLE would fail); ``low_cpu_mem_usage`` is passed
only where transformers still accepts it; the LoRA branch expects the adapter run's vocabulary to be the
base's (upstream swaps in empty ``lm_head``/``embed_tokens`` of the new size first) and reads
``non_lora_trainables.bin`` from the folder only (upstream also tries the hub).
"""

import os
import warnings

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from eagle.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_PATCH_TOKEN
from eagle.model import EagleLlamaForCausalLM

_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def _saved_tokenizer(path):
    if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        return AutoTokenizer.from_pretrained(path, use_fast=False)
    return None


def _non_lora_trainables(model_path):
    """``non_lora_trainables.bin`` of a LoRA run, with the names of the bare model: ``base_model.`` is cut
    off, then one ``model.`` when the names start with ``model.model.`` (a PeftModel's names)."""
    path = os.path.join(model_path, "non_lora_trainables.bin")
    weights = torch.load(path, map_location="cpu")
    weights = {(k[len("base_model."):] if k.startswith("base_model.") else k): v for k, v in weights.items()}
    if any(k.startswith("model.model.") for k in weights):
        weights = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in weights.items()}
    return weights


def _loading_kwargs(kwargs):
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        kwargs = dict(kwargs)
        if "torch_dtype" in kwargs:  # renamed in 5.x
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        return kwargs
    return {"low_cpu_mem_usage": True, **kwargs}


def load_pretrained_model(model_path, model_base, model_name, load_8bit=False, load_4bit=False, device_map="auto",
                          device="cuda", use_flash_attn=False, **kwargs):
    kwargs = {"device_map": device_map, **kwargs}
    if device != "cuda":
        kwargs["device_map"] = {"": device}
    if load_8bit:
        kwargs["load_in_8bit"] = True
    elif load_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["load_in_4bit"] = True
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16, bnb_4bit_use_double_quant=True,
            bnb_4bit_quant_type="nf4",
        )
    else:
        kwargs["torch_dtype"] = torch.float16
    if use_flash_attn:
        kwargs["attn_implementation"] = "flash_attention_2"

    is_eagle = "eagle" in model_name.lower()
    is_lora = "lora" in model_name.lower()
    if is_eagle:
        if is_lora and model_base is None:
            warnings.warn("There is `lora` in model name but no `model_base` is provided. If you are loading a "
                          "LoRA model, please provide the `model_base` argument.")
        if is_lora and model_base is not None:
            # EAGLE's typo: ImportError unless something provides the alias (meteor-plugin's training fixes do).
            from eagle.model.language_model.eagle_llama import eagleConfig

            tokenizer = _saved_tokenizer(model_base)
            lora_cfg = eagleConfig.from_pretrained(model_path)
            model = EagleLlamaForCausalLM.from_pretrained(model_base, config=lora_cfg, **_loading_kwargs(kwargs))
            model.load_state_dict(_non_lora_trainables(model_path), strict=False)
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, model_path).merge_and_unload()
        elif model_base is not None:
            # Projector-only checkpoint over a base LLM.
            tokenizer = _saved_tokenizer(model_base)
            cfg_pretrained = AutoConfig.from_pretrained(model_path)
            model = EagleLlamaForCausalLM.from_pretrained(model_base, config=cfg_pretrained, **_loading_kwargs(kwargs))
            weights = torch.load(os.path.join(model_path, "mm_projector.bin"), map_location="cpu")
            model.load_state_dict({k: v.to(torch.float16) for k, v in weights.items()}, strict=False)
        else:
            tokenizer = _saved_tokenizer(model_path)
            model = EagleLlamaForCausalLM.from_pretrained(model_path, **_loading_kwargs(kwargs))
    else:
        if model_base is not None:
            from peft import PeftModel

            tokenizer = _saved_tokenizer(model_base)
            model = AutoModelForCausalLM.from_pretrained(model_base, **_loading_kwargs(kwargs))
            model = PeftModel.from_pretrained(model, model_path).merge_and_unload()
            model.to(torch.float16)
        else:
            tokenizer = _saved_tokenizer(model_path)
            # EAGLE loads its own class here too, but hands back no image processor below.
            model = EagleLlamaForCausalLM.from_pretrained(model_path, **_loading_kwargs(kwargs))

    image_processor = None
    if is_eagle:
        if tokenizer is not None:
            if getattr(model.config, "mm_use_im_patch_token", True):
                tokenizer.add_tokens([DEFAULT_IMAGE_PATCH_TOKEN], special_tokens=True)
            if getattr(model.config, "mm_use_im_start_end", False):
                tokenizer.add_tokens([DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN], special_tokens=True)
            model.resize_token_embeddings(len(tokenizer))
        vision_tower = model.get_vision_tower()
        if not vision_tower.is_loaded:
            vision_tower.load_model(device_map=device_map)
        if device_map != "auto":
            vision_tower.to(device=device_map, dtype=torch.float16)
        image_processor = vision_tower.image_processor

    context_len = getattr(model.config, "max_sequence_length", 2048)
    return tokenizer, model, image_processor, context_len
