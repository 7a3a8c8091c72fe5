"""``clip-448``: EAGLE's high-resolution CLIP tower (from LLaVA-HR), on a tiny random CLIP ViT.

Reproduces: the CLS token is dropped before ``pre_layrnorm``; every block runs in the tower's own loop
(``mm_vision_select_layer`` is stored but ignored; no post-LN); blocks are checkpointed in training;
``embeddings.forward`` is replaced *on the instance* by one that resamples the position table when the
grid differs, which shadows any class-level patch of ``CLIPVisionEmbeddings.forward``.
Differs: the weights are random from a tiny config instead of ``openai/clip-vit-large-patch14-336``, and
both CLIP layouts are handled (transformers 5.x ``CLIPVisionModel`` has no ``vision_model``; EAGLE
itself fails there).
"""

import inspect
import math
import types

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from .convnext_encoder import clip_style_image_processor

# transformers 4.x blocks take (hidden, attention_mask, causal_attention_mask) and return a tuple;
# 5.x blocks take (hidden, attention_mask) and return the tensor.
_BLOCK_TAKES_CAUSAL_MASK = "causal_attention_mask" in inspect.signature(CLIPEncoderLayer.forward).parameters


def clip_body(model):
    """The module holding embeddings/pre_layrnorm/encoder: ``model.vision_model`` in 4.x, ``model`` in 5.x."""
    return getattr(model, "vision_model", model)


def run_clip_block(block, hidden):
    out = block(hidden, None, None) if _BLOCK_TAKES_CAUSAL_MASK else block(hidden, None)
    return out[0] if isinstance(out, tuple) else out


def resample_position_table(table, n_patches):
    """Bicubic resize of the patch part of a (1, 1 + g*g, C) position table to n_patches; CLS row kept."""
    cls_row, grid = table[:, :1], table[:, 1:]
    old, new = int(math.isqrt(grid.shape[1])), int(math.isqrt(n_patches))
    grid = grid.float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(table.dtype)
    return torch.cat([cls_row, grid], dim=1)


def embeddings_with_any_grid(self, pixel_values, interpolate_pos_encoding=False):
    """Bound onto the CLIP embeddings instance, as EAGLE does: patches + CLS + (resampled) positions."""
    patches = self.patch_embedding(pixel_values.to(dtype=self.patch_embedding.weight.dtype))
    patches = patches.flatten(2).transpose(1, 2)
    tokens = torch.cat([self.class_embedding.expand(patches.shape[0], 1, -1), patches], dim=1)
    table = self.position_embedding.weight.unsqueeze(0)
    if table.shape[1] != tokens.shape[1]:
        table = resample_position_table(table, tokens.shape[1] - 1)
    return tokens + table


class HRCLIPVisionTower(nn.Module):
    def __init__(self, vision_tower, args, delay_load=False):
        super().__init__()
        self.is_loaded = False
        self.freeze_vision = args.freeze_vision
        self.input_image_size = args.input_image_size
        self.vision_tower_name = vision_tower
        self.select_layer = getattr(args, "mm_vision_select_layer", -2)  # stored, never used (as EAGLE)
        self.select_feature = getattr(args, "mm_vision_select_feature", "patch")
        self.tiny_config = dict(args.tiny_config)  # stand-in: the sizes that replace the hub weights
        if not delay_load:
            self.load_model()
        else:
            self.cfg_only = self._clip_config()

    def _clip_config(self):
        cfg = dict(self.tiny_config)
        image_size = cfg.pop("input_image_size")
        return CLIPVisionConfig(image_size=image_size, projection_dim=cfg["hidden_size"], **cfg)

    def load_model(self):
        if self.is_loaded:
            return
        self.image_processor = clip_style_image_processor(self.input_image_size)
        self.vision_tower = CLIPVisionModel(self._clip_config())
        body = clip_body(self.vision_tower)
        body.encoder.gradient_checkpointing = True  # EAGLE sets it; its own loop checkpoints in training
        if self.freeze_vision:
            self.vision_tower.requires_grad_(False)
        body.embeddings.forward = types.MethodType(embeddings_with_any_grid, body.embeddings)
        self.is_loaded = True

    def forward(self, x):
        body = clip_body(self.vision_tower)
        x = body.embeddings(x)
        x = body.pre_layrnorm(x[:, 1:])  # CLS dropped before the blocks
        checkpointed = self.training and torch.is_grad_enabled()  # (recomputing saves nothing without grad)
        for block in body.encoder.layers:
            if checkpointed:
                x = checkpoint(run_clip_block, block, x, use_reentrant=True)
            else:
                x = run_clip_block(block, x)
        return x  # (B, g*g, C), no post_layernorm

    @property
    def dummy_feature(self):
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self):
        return self.vision_tower.dtype

    @property
    def device(self):
        return self.vision_tower.device

    @property
    def num_attention_heads(self):
        return self.config.num_attention_heads

    @property
    def num_layers(self):
        return self.config.num_hidden_layers

    @property
    def config(self):
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self):
        return self.config.hidden_size

    @property
    def num_patches(self):
        return (self.config.image_size // self.config.patch_size) ** 2
