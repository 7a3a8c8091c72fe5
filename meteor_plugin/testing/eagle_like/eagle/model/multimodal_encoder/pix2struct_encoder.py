"""``pix2struct-1024``: EAGLE's Pix2Struct tower, on a tiny random HF ``Pix2StructVisionModel``.

Reproduces: the input is de-normalised (CLIP mean/std) to 0..255 and turned into Pix2Struct's
variable-resolution flattened patches (per-image standardisation, aspect-preserving resize to at most
``max_patches`` patches, each patch prefixed by its 1-based row and column id, zero padding to
``max_patches``); the encoder output is sliced to the square grid with a constant fixed at load time
(EAGLE: ``[:, :2025]``, 45x45), reshaped and bilinearly interpolated to 32x32 *inside the tower*, which
returns a 4-D (B, C, 32, 32); ``hidden_size`` is a constant; ``mm_vision_select_layer`` has no effect.
Differs: the patches are computed in torch on the input's device (EAGLE round-trips through the HF
processor, numpy, each forward) and the attention mask marks the real patches (HF's marks patches whose
values do not sum to 0); random tiny weights instead of ``google/pix2struct-large``.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import Pix2StructVisionConfig, Pix2StructVisionModel

from .convnext_encoder import clip_style_image_processor


def patch_grid(height, width, patch_size, max_patches):
    """Rows and columns of patches Pix2Struct resizes an image to (the most that fit in max_patches)."""
    scale = math.sqrt(max_patches * (patch_size / height) * (patch_size / width))
    rows = max(min(math.floor(scale * height / patch_size), max_patches), 1)
    cols = max(min(math.floor(scale * width / patch_size), max_patches), 1)
    return rows, cols


class TorchPix2StructPatcher:
    """Callable like EAGLE's ``pix2struct_processor(images=x, return_tensors='pt')`` on (B, 3, H, W) 0..255."""

    def __init__(self, patch_size, max_patches):
        self.patch_size = patch_size
        self.max_patches = max_patches

    def __call__(self, images, return_tensors="pt"):
        b, c, h, w = images.shape
        p = self.patch_size
        flat = images.float().reshape(b, -1)
        mean = flat.mean(dim=1).view(b, 1, 1, 1)
        std = flat.std(dim=1, unbiased=False).clamp_min(1.0 / math.sqrt(flat.shape[1])).view(b, 1, 1, 1)
        x = (images.float() - mean) / std  # TF per_image_standardization, as Pix2Struct's processor
        rows, cols = patch_grid(h, w, p, self.max_patches)
        x = F.interpolate(x, size=(rows * p, cols * p), mode="bilinear", align_corners=False, antialias=True)
        # Each patch flattened as (patch row, patch col, channel).
        patches = x.reshape(b, c, rows, p, cols, p).permute(0, 2, 4, 3, 5, 1).reshape(b, rows * cols, p * p * c)
        row_ids = torch.arange(1, rows + 1, device=x.device).repeat_interleave(cols).float()
        col_ids = torch.arange(1, cols + 1, device=x.device).repeat(rows).float()
        ids = torch.stack([row_ids, col_ids], dim=-1).expand(b, -1, -1)
        real = torch.cat([ids, patches], dim=-1)
        flattened = real.new_zeros(b, self.max_patches, real.shape[-1])
        flattened[:, : rows * cols] = real
        mask = torch.zeros(b, self.max_patches, device=x.device)
        mask[:, : rows * cols] = 1.0
        return {"flattened_patches": flattened, "attention_mask": mask}


class Pix2StructLargeVisionTower(nn.Module):
    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__()
        self.is_loaded = False
        self.vision_tower_name = vision_tower
        self.do_resize = args.do_resize
        self.de_normalize = args.de_normalize
        self.select_layer = getattr(args, "mm_vision_select_layer", -2)  # no effect, as in EAGLE
        self.input_image_size = args.input_image_size
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        self.freeze_vision = args.freeze_vision
        self.tiny_config = dict(args.tiny_config)
        self.args = args
        if not self.is_loaded:
            self.load_model()

    def load_model(self):
        if self.is_loaded:
            return
        cfg = dict(self.tiny_config)
        size, patch, max_patches = cfg.pop("input_image_size"), cfg.pop("patch_size"), cfg.pop("max_patches")
        rows, cols = patch_grid(size, size, patch, max_patches)
        self.vision_tower = Pix2StructVisionModel(Pix2StructVisionConfig(
            patch_embed_hidden_size=patch * patch * 3, seq_len=max(rows, cols) + 1, initializer_range=0.02, **cfg
        ))
        self.pix2struct_processor = TorchPix2StructPatcher(patch, max_patches)
        self.image_processor = clip_style_image_processor(self.input_image_size)
        if self.freeze_vision:
            self.vision_tower.requires_grad_(False)
        # Plain lists, turned into tensors on the input's device in forward (EAGLE keeps CPU tensors).
        self.image_mean = list(self.image_processor.image_mean)
        self.image_std = list(self.image_processor.image_std)
        self.square_grid = rows  # EAGLE hard-codes 45 (and 2025 = 45 * 45) for its 1024 input
        self.output_hidden_size = cfg["hidden_size"]  # EAGLE hard-codes 1536
        self.is_loaded = True

    def forward(self, images):
        if not self.de_normalize:
            # EAGLE only defines the encoder input in the de-normalise branch.
            raise NotImplementedError("Pix2StructLargeVisionTower needs de_normalize=True, as in EAGLE")
        mean = torch.tensor(self.image_mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
        x = self.pix2struct_processor(images=(images * std + mean) * 255.0, return_tensors="pt")
        x = {k: v.to(device=self.device, dtype=self.dtype) for k, v in x.items()}
        features = self.vision_tower(**x).last_hidden_state
        bs, n, c = features.shape
        g = self.square_grid
        features = features[:, : g * g, :]
        if self.do_resize:
            features = features.transpose(1, 2).reshape(bs, c, g, g)
            features = F.interpolate(features.float(), size=(32, 32), mode="bilinear", align_corners=True)
            return features.to(dtype=self.dtype)
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
        return self.vision_tower.config

    @property
    def hidden_size(self):
        return self.output_hidden_size

    @property
    def num_patches(self):
        return self.config["num_patches"]  # broken in EAGLE too: a config is not subscriptable
