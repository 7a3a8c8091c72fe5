"""The fidelity model (v2): a small EAGLE-like model with two encoders of different kinds and resolutions.

Built through the EAGLE stand-in (``testing/eagle_like``), with what the testbed issue asks of a model
on which pruning behaves as on a real EAGLE: unequal encoders, a deep language model, many tokens.

- ``clip-448``: a CLIP ViT with 6 blocks on the image downsampled to 32 px (EAGLE's fusion tower
  resizes it), patch 4, width 64, 4 heads: 8x8 = 64 tokens of 12 px, where the 10x16 px digit is a smudge;
- ``convnext-1024``: a ConvNeXt on the full 96 px image, stem 4, stages [48, 96] x [2, 2], layer scale
  off (HF's 1e-6 default makes every block start as an identity and slows learning): 12x12 = 144
  tokens of 8 px, 2.25x CLIP's;
- per-encoder ``mlp2x_gelu`` projectors (METEOR's post-projection fusion, ``mm_projectors``) into a
  Llama of width 96, 8 layers, 6 heads, MLP 256: 208 visual tokens per image.

Narrow, so that it trains on 2 CPU cores; deep, so that pruning inside the LLM (FastV, Stage 3) has
early layers to prune after, as in a 32-layer LLaVA. A converted model runs only with meteor-plugin
enabled for it (its projectors replace EAGLE's channel concatenation), so `build` and `load` attach it to the plugin
with nothing pruned (``meteor_plugin.attach``; a scope such as ``with meteor_plugin.enabled(config)`` prunes it).
"""

from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch

from . import llava_format

ENCODERS = ("clip-448", "convnext-1024")
RECORD = "fidelity.json"  # how a checkpoint was made (the recipe writes it beside the weights)
IMAGE_SIZE = 96
GRIDS = (8, 12)  # tokens per side of each encoder's map, in fusion order
VISUAL_TOKENS = sum(g * g for g in GRIDS)
TOWERS: Dict[str, Dict[str, Any]] = {
    "clip-448": {"input_image_size": 32, "patch_size": 4, "hidden_size": 64, "intermediate_size": 256,
                 "num_hidden_layers": 6, "num_attention_heads": 4},
    "convnext-1024": {"input_image_size": 96, "patch_size": 4, "hidden_sizes": [48, 96], "depths": [2, 2],
                      "layer_scale_init_value": 0.0},
}
KINDS = {"clip": "CLIP ViT", "convnext": "ConvNeXt"}


def encoder_titles() -> Dict[str, str]:
    """Each encoder as the demo's header and its map name it: ``clip-448 (CLIP ViT at 32 px, 8x8 tokens)``."""
    return {name: f"{name} ({KINDS[name.split('-')[0]]} at {TOWERS[name]['input_image_size']} px, {g}x{g} tokens)"
            for name, g in zip(ENCODERS, GRIDS)}


LLM = {"llm_hidden": 96, "llm_layers": 8, "llm_heads": 6, "llm_kv_heads": 6, "llm_intermediate": 256}
# CLIP normalisation, what the towers' image processor applies (``clip_style_image_processor``).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def spec(seed: int = 0):
    from ..testing.eagle_like import TinyEagleSpec

    return TinyEagleSpec(vision_tower=";".join(ENCODERS), image_size=IMAGE_SIZE, towers=copy.deepcopy(TOWERS),
                         projector_type="mlp2x_gelu", vocab_size=llava_format.vocab_size(), max_positions=512,
                         attn_implementation="sdpa", padding_side="right", seed=seed, **LLM)


def build(seed: int = 0):
    """A fresh fidelity model with seeded random weights, converted to per-encoder projectors."""
    from ..adapters.eagle import convert_to_post_projection
    from ..testing.eagle_like import build_tiny_eagle

    model = build_tiny_eagle(spec(seed))
    convert_to_post_projection(model)
    model.generation_config.eos_token_id = 2
    attach_unpruned(model)
    return model


def unpruned_config():
    """The plugin config that runs a converted model without pruning anything."""
    import meteor_plugin

    return meteor_plugin.MeteorConfig(encoder=False, fusion=False, llm=False)


def attach_unpruned(model) -> None:
    """Run ``model`` through the plugin with nothing pruned (its per-encoder projectors are the plugin's), until a
    scope says otherwise or ``meteor_plugin.detach(model)``."""
    import meteor_plugin

    meteor_plugin.attach(model, unpruned_config())


def pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, 96, 96) images to the normalised float input the model's image processor makes."""
    if images.dtype != torch.uint8 or images.dim() != 4 or tuple(images.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must be uint8 (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {images.dtype} {tuple(images.shape)}")
    x = images.float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def load(path: str, config: Optional[Any] = None):
    """(model, tokenizer) of a saved fidelity checkpoint, in float32 eval mode, on any supported
    transformers version.

    The model is attached to the plugin with ``config`` (default: nothing pruned; ``meteor_plugin.attach``): its
    per-encoder projectors are the plugin's, built as the checkpoint loads (the EAGLE family's ``loading``). The
    weights are read here rather than by
    ``from_pretrained`` because the CLIP tower's parameter names differ across transformers versions
    (5.x's ``CLIPVisionModel`` has no ``vision_model`` level), and a checkpoint saved by one version would
    otherwise leave another version's CLIP tower at its random initialisation, with only a warning.
    """
    import os

    from safetensors.torch import load_file

    import meteor_plugin
    from ..adapters.eagle import TRAINING as EAGLE
    from ..testing.eagle_like import install

    install()
    EagleLlamaForCausalLM, EagleConfig = EAGLE.classes()
    model_config = EagleConfig.from_pretrained(path)
    if not getattr(model_config, "meteor_fusion", None):
        raise ValueError(f"{path} is not a converted fidelity checkpoint: it has no per-encoder projectors")
    model_config._attn_implementation = "sdpa"
    with EAGLE.loading(model_config.to_dict()):
        model = EagleLlamaForCausalLM(model_config)
    state = load_file(os.path.join(path, "model.safetensors"))
    expected = model.state_dict()
    state = {_rename(k, expected): v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the fidelity model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.generation_config.eos_token_id = 2
    meteor_plugin.attach(model, config or unpruned_config())
    return model.float().eval(), llava_format.load_hf_tokenizer(path)


def _rename(key: str, expected) -> str:
    """A CLIP tower key of one transformers version's layout in the layout of the running one."""
    if key in expected:
        return key
    marker = ".vision_tower.vision_model."
    if marker in key:
        alt = key.replace(marker, ".vision_tower.", 1)
    else:
        head, sep, tail = key.partition(".vision_towers.")
        index, _, rest = tail.partition(".vision_tower.")
        alt = f"{head}{sep}{index}.vision_tower.vision_model.{rest}" if sep and rest else key
    return alt if alt in expected else key


def open_for_tools(path: str):
    """(tokenizer, model) of a fidelity checkpoint for the command-line tools (``meteor-plugin calibrate``), or None
    for any other checkpoint. Checkpoints built on the EAGLE stand-in (``eagle_like_towers`` in their config: the
    fidelity model, the tests' tiny EAGLE) get the stand-in installed as their ``eagle`` package first, so that
    EAGLE's loader finds it; a converted fidelity checkpoint (with its record) loads here, unpruned."""
    import json
    import os

    try:
        with open(os.path.join(path, "config.json")) as fh:
            config = json.load(fh)
    except (OSError, ValueError):
        return None
    if config.get("eagle_like_towers") is None:
        return None
    from ..testing.eagle_like import install

    install()
    if config.get("meteor_fusion") and os.path.isfile(os.path.join(path, RECORD)):
        model, tokenizer = load(path, unpruned_config())
        return tokenizer, model
    return None
