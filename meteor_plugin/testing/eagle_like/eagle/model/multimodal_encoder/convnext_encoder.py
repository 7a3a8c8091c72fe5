"""``convnext-1024``: EAGLE's ConvNeXt tower, on a tiny random Hugging Face ``ConvNextModel``.

Reproduces: ``forward_features`` returns every stage map as (B, h*w, C) and ``select_layer = -1`` picks
the last one, which has exactly 32*32 = 1024 tokens, so the fusion tower appends it as is; no final norm;
``hidden_size`` is an attribute set by hand on the backbone; stages are checkpointed in training;
``config`` is None and ``num_patches`` is broken; this tower's image processor is the one the whole
fusion tower exposes.
Differs: EAGLE uses a local timm ConvNeXt-XXL (``stem`` / ``stages``; 4 stages, stride 32); timm does
not import here, so the backbone is HF's (``embeddings`` / ``encoder.stages``; 2 stages, stride 4).
"""

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from transformers import ConvNextConfig, ConvNextModel

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_style_image_processor(size, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD):
    """The CLIPImageProcessor EAGLE's towers build in code (resize, center crop to ``size``, CLIP norm)."""
    import transformers

    # 5.x without torchvision falls back to the PIL class with a warning: ask for it directly.
    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(
        do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
        crop_size={"height": size, "width": size}, do_normalize=True,
        image_mean=list(image_mean), image_std=list(image_std),
    )


class ConvNextVisionTower(nn.Module):
    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__()
        self.is_loaded = False
        self.freeze_vision = args.freeze_vision
        self.input_image_size = args.input_image_size
        self.vision_tower_name = vision_tower
        self.select_layer = -1  # hard-coded in EAGLE: the last stage
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        self.tiny_config = dict(args.tiny_config)
        self.load_model()

    def load_model(self):
        if self.is_loaded:
            return
        self.image_processor = clip_style_image_processor(self.input_image_size)
        cfg = {k: v for k, v in self.tiny_config.items() if k != "input_image_size"}
        self.vision_tower = ConvNextModel(ConvNextConfig(num_channels=3, num_stages=len(cfg["hidden_sizes"]), **cfg))
        self.vision_tower.hidden_size = cfg["hidden_sizes"][-1]  # EAGLE: setattr(..., 'hidden_size', 3072)
        if self.freeze_vision:
            self.vision_tower.requires_grad_(False)
        for stage in self.vision_tower.encoder.stages:
            stage.grad_checkpointing = True  # EAGLE sets this on every timm stage
        self.is_loaded = True

    def feature_select(self, image_forward_outs):
        return image_forward_outs[self.select_layer]

    def forward_features(self, x):
        x = self.vision_tower.embeddings(x)  # timm: stem
        stage_maps = []
        checkpointed = self.training and torch.is_grad_enabled()
        for stage in self.vision_tower.encoder.stages:
            if checkpointed and getattr(stage, "grad_checkpointing", False):
                x = checkpoint(stage, x, use_reentrant=True)
            else:
                x = stage(x)
            stage_maps.append(x.flatten(2).transpose(1, 2))  # (B, h*w, C)
        return stage_maps

    def forward(self, images):
        if self.freeze_vision:
            with torch.no_grad():
                return self._forward_images(images)
        return self._forward_images(images)

    def _forward_images(self, images):
        outs = self.forward_features(images.to(device=self.device, dtype=self.dtype))
        return self.feature_select(outs)

    @property
    def dummy_feature(self):
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self):
        return next(self.vision_tower.parameters()).dtype

    @property
    def device(self):
        return next(self.vision_tower.parameters()).device

    @property
    def config(self):
        return None  # EAGLE's property asserts a (truthy) exception class and returns None

    @property
    def num_attention_heads(self):
        return 16  # a constant in EAGLE

    @property
    def num_layers(self):
        return 4  # a constant in EAGLE

    @property
    def hidden_size(self):
        return self.vision_tower.hidden_size

    @property
    def num_patches(self):
        # Broken in EAGLE: it reads a key its processor dict does not have.
        raise KeyError("image_size")
