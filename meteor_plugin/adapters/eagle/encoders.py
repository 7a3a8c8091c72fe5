"""EAGLE's vision encoders, as the rest of the family reads them: their names and widths, whether a model was
converted to METEOR's post-projection fusion, and each encoder as the stages run it (``parts``).

Which EAGLE encoder is pruned where, and why: ``clip-448`` (HRCLIP) between its blocks, by received attention at
the deep boundary since EAGLE drops its CLS before the blocks; ``convnext-1024`` (a CNN: dropping tokens saves
nothing), ``sam-1024`` and ``det-1024`` (windowed attention and full-grid relative positions / RoPE) and
``pix2struct-1024`` (its post-processing hard-codes its grid) at their output.
"""

from __future__ import annotations

from typing import Any, List

import torch
import torch.nn.functional as F

from ...compat.transformers import clip_layers
from ...stages.vision import EncoderParts, VitParts

MODEL_MODULE = "eagle.model.language_model.eagle_llama"
CAUSAL = "EagleLlamaForCausalLM"

KNOWN_ENCODERS = ("clip-448", "convnext-1024", "sam-1024", "det-1024", "pix2struct-1024")
# Channels each encoder adds to the fused features (NVlabs/EAGLE fef95f1): CLIP-L, ConvNeXt-XXL's last
# stage, SAM-L after pixel_unshuffle, EVA-02-L, Pix2Struct-large.
ENCODER_CHANNELS = {"clip-448": 1024, "convnext-1024": 3072, "sam-1024": 1024, "det-1024": 1024,
                    "pix2struct-1024": 1536}
PRUNED_INSIDE = ("HRCLIPVisionTower",)  # ViT towers whose block loop runs Stage 1 between blocks
FUSION_KEY = "meteor_fusion"  # model config entry written by the conversion


class FusionConfigError(ValueError):
    pass


def encoder_names(model: Any) -> List[str]:
    """Encoder names in tower order (EAGLE skips unknown names when it builds the towers)."""
    towers = model.get_model().get_vision_tower().vision_towers
    names = [n for n in str(getattr(model.config, "mm_vision_tower", "")).split(";") if n in KNOWN_ENCODERS]
    return names if len(names) == len(towers) else [type(t).__name__ for t in towers]


def is_converted(model: Any) -> bool:
    return getattr(model.get_model(), "mm_projectors", None) is not None


def tower_channels(model: Any) -> List[int]:
    return [int(t.hidden_size) for t in model.get_model().get_vision_tower().vision_towers]


def tower_input(mbcc: Any, tower: Any, images: torch.Tensor) -> torch.Tensor:
    """The resize EAGLE's tower applies when an encoder's input size differs from the fused input."""
    size = getattr(tower, "input_image_size", None)
    if size is None or size == images.shape[-1]:
        return images
    return F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=True).to(images.dtype)


def as_tokens(feature: torch.Tensor) -> torch.Tensor:
    """An encoder output as (B, N, C): maps (B, C, H, W) are flattened row by row."""
    return feature if feature.dim() == 3 else feature.flatten(2).transpose(1, 2)


def project(projector: Any, tokens: torch.Tensor) -> torch.Tensor:
    """An encoder's tokens through its projector, in the projector's dtype: upstream training casts the
    towers to float16 without --bf16 while the projectors stay float32 (EAGLE's channel concatenation
    promotes the dtypes; one encoder's output alone is not promoted)."""
    dtype = next(projector.parameters()).dtype
    return projector(tokens if tokens.dtype == dtype else tokens.to(dtype))


def parts(model: Any) -> List[EncoderParts]:
    """Each encoder of an EAGLE model as the stages run it: pruned inside (the CLIP ViT) or at its output, and
    through its own projector when the model was converted."""
    llm = model.get_model()
    mbcc = llm.get_vision_tower()
    out = []
    for i, (name, tower) in enumerate(zip(encoder_names(model), mbcc.vision_towers)):
        run = (lambda images, tower=tower: as_tokens(tower(tower_input(mbcc, tower, images))))
        vit = None
        if type(tower).__name__ in PRUNED_INSIDE:
            layers = clip_layers(tower.vision_tower)
            vit = VitParts(layers, int(tower.num_patches), len(layers), has_cls=False)
        projector = (lambda tokens, i=i: project(llm.mm_projectors[i], tokens)) if is_converted(model) else None
        out.append(EncoderParts(name, run, projector, vit))
    return out
