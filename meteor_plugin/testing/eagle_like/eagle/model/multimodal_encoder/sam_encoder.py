"""``sam-1024``: EAGLE's SAM tower (the windowed ViT of the X5 mix), on a tiny random HF SAM encoder.

Reproduces: Hugging Face's SAM vision encoder (windowed attention with a few global blocks and
decomposed relative positions over the full patch grid), its neck replaced by a 1x1 conv to
``output_channels`` + channels-first LayerNorm (``ShortSamVisionNeck``); the (B, H, W, C) output is
flattened to (B, H*W, C), reshaped to a map and ``pixel_unshuffle(2)``-ed to the 32x32 grid, returning a
4-D (B, 4*C, 32, 32); ``hidden_size`` is the constant 4 * neck channels; the input gets the CLIP-normalised
pixels of the fusion tower, not SAM's normalisation.
Differs: random tiny weights instead of ``facebook/sam-vit-large``; no SamProcessor is built (EAGLE's is
never used: the fusion tower exposes ConvNeXt's); the list-of-images path is not reproduced.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionEncoder


class ShortSamVisionNeck(nn.Module):
    """(B, H, W, C) -> 1x1 conv -> LayerNorm over channels -> (B, H, W, output_channels)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv1 = nn.Conv2d(config.hidden_size, config.output_channels, kernel_size=1, bias=False)
        self.layer_norm1 = nn.LayerNorm(config.output_channels, eps=1e-6)

    def forward(self, hidden_states):
        maps = self.conv1(hidden_states.permute(0, 3, 1, 2))
        return self.layer_norm1(maps.permute(0, 2, 3, 1))


class SAMVisionTower(nn.Module):
    def __init__(self, vision_tower, args):
        super().__init__()
        self.args = args
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.input_image_size = args.input_image_size
        self.pixel_shuffle = getattr(args, "add_pixel_shuffle", False)
        self.freeze = args.freeze_vision
        self.tiny_config = dict(args.tiny_config)
        self.load_model()

    def load_model(self):
        if self.is_loaded:
            return
        cfg = {k: v for k, v in self.tiny_config.items() if k != "input_image_size"}
        config = SamVisionConfig(image_size=self.input_image_size, initializer_range=0.02, **cfg)
        encoder = SamVisionEncoder(config)
        encoder.neck = ShortSamVisionNeck(config)
        self.sam_model_config = config
        self.image_processor = None
        self.vision_tower = encoder
        if self.freeze:
            self.vision_tower.requires_grad_(False)
        self.is_loaded = True

    def forward(self, images):
        out = self.vision_tower(images.to(device=self.device))
        features = out.last_hidden_state.flatten(start_dim=1, end_dim=2)  # (B, H*W, C)
        if self.pixel_shuffle:
            b, n, c = features.shape
            side = int(n ** 0.5)
            features = features.transpose(1, 2).reshape(b, c, side, side)
            features = F.pixel_unshuffle(features, 2)  # (B, 4C, H/2, W/2)
        return features

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
        return self.sam_model_config

    @property
    def hidden_size(self):
        # A constant in EAGLE (256 * 4); here 4 * the tiny neck's channels.
        return self.tiny_config["output_channels"] * (4 if self.pixel_shuffle else 1)

    @property
    def num_patches(self):
        return self.config.num_patches
