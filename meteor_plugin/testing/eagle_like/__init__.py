"""A tiny stand-in for EAGLE (NVlabs/EAGLE at fef95f1), laid out like EAGLE's ``eagle`` package.

EAGLE is not on PyPI (PyPI's ``eagle`` is an unrelated GUI library) and its encoders come from the
model hub and timm, neither of which works on the test machines. This directory holds a package named
``eagle`` with EAGLE's module paths, class names and attributes, built from tiny Hugging Face encoders
with random weights, so the plugin (which finds EAGLE by ``eagle/model/language_model/eagle_llama.py``)
and its tests treat it exactly like EAGLE. It was written from the interfaces documented in
``notes/llava-eagle-anatomy.md``; no EAGLE source is copied.

It is not importable as ``eagle`` (nor its ``train.py`` as ``train``) until ``install()`` puts this directory
on ``sys.path``; in another process, put ``ROOT`` on ``PYTHONPATH``.

What it reproduces (per module, see their docstrings):
- ``eagle.model.language_model.eagle_llama``: ``EagleConfig`` (``model_type="eagle_llama"``, registered with
  the Auto classes), ``EagleLlamaModel`` without a forward of its own, ``EagleLlamaForCausalLM`` whose
  ``forward`` swallows extra kwargs, embeds-only ``generate`` and ``prepare_inputs_for_generation``.
- ``eagle.model.multimodal_encoder``: the fusion tower ``MultiBackboneChannelConcatenationVisionTower``
  (``vision_towers`` in string order, 32x32 = 1024 grid positions, channel concatenation, its fragile
  spots) over the encoders of ``clip-448;convnext-1024;sam-1024;pix2struct-1024`` (EAGLE-X5 without EVA),
  each reaching the grid as the real one does.
- ``eagle.model.builder.load_pretrained_model`` with EAGLE's naming rules (and its LoRA branch, which
  imports the misspelt ``eagleConfig``); ``eagle.mm_utils``; ``eagle.constants``; ``eagle.conversation``;
  ``eagle.model.multimodal_projector.builder``.
- ``train.py`` next to the package, as at the root of an EAGLE checkout: EAGLE's training script
  (``ModelArguments``, ``TrainingArguments`` with ``vision_tower_lr``, ``EagleTrainer``, ``train()``), built
  at import time from LLaVA's ``llava.train.train`` (see its docstring). ``meteor_plugin.train`` finds
  and drives it as it would EAGLE's.
- Checkpoints: the towers are built from the config and their weights saved in and loaded from the
  checkpoint (keys ``model.vision_tower.vision_towers.{i}.…``, ``model.mm_projector.{0,2}.…``).

Where it deviates from real EAGLE:
- Tiny sizes (``multimodal_encoder/tiny_configs.py``): a 128-pixel fusion input stands for EAGLE's
  hard-coded 1024 and is configurable; the 32x32 grid is kept. The sizes are stored in the model
  config (``eagle_like_input_image_size``, ``eagle_like_towers``), fields real EAGLE does not have.
- SAM is the windowed ViT; EVA-02 (``det-1024``) is not provided and raises. ConvNeXt is Hugging Face's
  ``ConvNextModel`` (``embeddings`` / ``encoder.stages``) instead of timm's (``stem`` / ``stages``).
- Pix2Struct's flattened patches are computed in torch instead of by the HF processor (numpy).
- LLaVA's ``prepare_inputs_labels_for_multimodal``, ``initialize_vision_tokenizer`` and ``mm_utils``
  functions are reused (EAGLE's are rename-copies of them), bound into the EAGLE classes and module.
- Works on transformers 4.37, 4.44 and 5.x (real EAGLE's CLIP tower fails on 5.x); the loader returns a
  None tokenizer when no tokenizer is saved with the checkpoint.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import runpy
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from ..llm import TinyLlm, llm_config_kwargs

ROOT = os.path.dirname(os.path.abspath(__file__))
_EAGLE_DIR = os.path.join(ROOT, "eagle")
_TINY_CONFIGS = os.path.join(_EAGLE_DIR, "model", "multimodal_encoder", "tiny_configs.py")

EAGLE_X5_LIKE = "clip-448;convnext-1024;sam-1024;pix2struct-1024"
GRID_TOKENS = 32 * 32  # EAGLE's fusion grid


class EagleConflictError(ImportError):
    """Another package named ``eagle`` is importable, so the stand-in cannot take the name."""


def _same_dir(a: str, b: str) -> bool:
    return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def _check_no_other_eagle() -> None:
    loaded = sys.modules.get("eagle")
    if loaded is not None:
        locations = list(getattr(loaded, "__path__", []) or [os.path.dirname(getattr(loaded, "__file__", "") or "")])
        if not any(_same_dir(p, _EAGLE_DIR) for p in locations):
            raise EagleConflictError(
                f"a different 'eagle' package is already imported (from {locations}); the EAGLE stand-in "
                "cannot be installed in this process"
            )
        return
    spec = importlib.util.find_spec("eagle")
    if spec is None:
        return
    locations = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    if not any(_same_dir(p, _EAGLE_DIR) for p in locations):
        raise EagleConflictError(
            f"a different 'eagle' package is importable (from {locations}), e.g. the real EAGLE or PyPI's "
            "unrelated 'eagle' GUI library; uninstall it or use a separate environment for the stand-in"
        )


def install() -> str:
    """Make the stand-in importable as ``eagle`` (idempotent); returns the directory put on ``sys.path``.

    Raises ``EagleConflictError`` if a different ``eagle`` package is importable or already imported.
    """
    _check_no_other_eagle()
    if not any(_same_dir(p, ROOT) for p in sys.path if p):
        sys.path.insert(0, ROOT)
        importlib.invalidate_caches()
    return ROOT


def default_tower_configs() -> Dict[str, Dict[str, Any]]:
    """EAGLE's encoder names mapped to the stand-in's tiny encoder sizes (a fresh copy)."""
    return copy.deepcopy(runpy.run_path(_TINY_CONFIGS)["DEFAULT_TOWERS"])


def default_input_image_size() -> int:
    return int(runpy.run_path(_TINY_CONFIGS)["DEFAULT_INPUT_IMAGE_SIZE"])


@dataclass
class TinyEagleSpec(TinyLlm):
    vision_tower: str = EAGLE_X5_LIKE  # EAGLE's encoder list, fused in this order
    image_size: int = field(default_factory=default_input_image_size)  # stands for EAGLE's 1024
    towers: Dict[str, Dict[str, Any]] = field(default_factory=default_tower_configs)  # per encoder name
    projector_type: str = "mlp2x_gelu"

    @property
    def visual_tokens(self) -> int:
        """Tokens each image becomes in the LLM: the 32x32 fusion grid, whatever the encoders."""
        return GRID_TOKENS

    @property
    def encoder_names(self):
        return [n for n in self.vision_tower.split(";") if n in self.towers]

    @property
    def tower_channels(self) -> Dict[str, int]:
        """Channels each encoder contributes to the fused features, in fusion order."""
        out = {}
        for name in self.encoder_names:
            t = self.towers[name]
            if name == "convnext-1024":
                out[name] = t["hidden_sizes"][-1]
            elif name == "sam-1024":
                out[name] = 4 * t["output_channels"]  # pixel_unshuffle(2)
            else:
                out[name] = t["hidden_size"]
        return out

    @property
    def mm_hidden_size(self) -> int:
        return sum(self.tower_channels.values())


def tiny_eagle_config(spec: Optional[TinyEagleSpec] = None):
    """An ``EagleConfig`` with the fields EAGLE's SFT scripts set, plus the stand-in's tiny sizes."""
    spec = spec or TinyEagleSpec()
    install()
    from eagle.model.language_model.eagle_llama import EagleConfig

    config = EagleConfig(
        **llm_config_kwargs(spec),
        mm_vision_tower=spec.vision_tower, mm_hidden_size=spec.mm_hidden_size,
        mm_projector_type=spec.projector_type, mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_patch_merge_type="flat", mm_use_im_start_end=False, mm_use_im_patch_token=False,
        image_aspect_ratio="pad", use_mm_proj=True,
        eagle_like_input_image_size=spec.image_size, eagle_like_towers=copy.deepcopy(spec.towers),
    )
    config._attn_implementation = spec.attn_implementation
    return config


def build_tiny_eagle(spec: Optional[TinyEagleSpec] = None):
    """An ``EagleLlamaForCausalLM`` in eval mode with seeded random weights (calls ``install()``)."""
    spec = spec or TinyEagleSpec()
    config = tiny_eagle_config(spec)
    import torch
    from eagle.model.language_model.eagle_llama import EagleLlamaForCausalLM

    torch.manual_seed(spec.seed)
    model = EagleLlamaForCausalLM(config)
    built = model.get_vision_tower().hidden_size
    if built != config.mm_hidden_size:
        raise ValueError(f"the towers give {built} channels but the spec expects {config.mm_hidden_size}")
    model.generation_config.pad_token_id = 0
    return model.eval()


def build_tiny_tokenizer(vocab_size: int = 256):
    """A word-level fast tokenizer (no download): <pad>=0, <s>=1, </s>=2, <unk>=3, words "w4".."w{V-1}".

    It prepends <s> like Llama's. Its length equals the model's vocabulary, and the tiny config says
    ``mm_use_im_patch_token=False`` as EAGLE's scripts do, so ``load_pretrained_model`` resizes nothing.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )


def save_tiny_eagle(folder: str, spec: Optional[TinyEagleSpec] = None, tokenizer: bool = True) -> str:
    """Save a tiny EAGLE checkpoint (and a tiny tokenizer) to ``folder``; returns ``folder``.

    Name the folder with "eagle" in it if ``load_pretrained_model`` should treat it as EAGLE does.
    """
    spec = spec or TinyEagleSpec()
    model = build_tiny_eagle(spec)
    model.save_pretrained(folder)
    if tokenizer:
        build_tiny_tokenizer(spec.vocab_size).save_pretrained(folder)
    return folder
