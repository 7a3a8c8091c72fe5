"""EAGLE's fusion tower: every encoder brought to one 32x32 grid, features joined along channels.

Reproduces: sub-towers built immediately (``delay_load`` ignored) in string order into the
``vision_towers`` ModuleList, each from a deep copy of the args with ``freeze_vision=False`` (all encoders
trainable); unknown names skipped silently; the exposed ``image_processor`` is always ConvNeXt's
(NameError without ``convnext-1024``); in ``forward``, a bilinear resize (align_corners) when a tower's
``input_image_size`` differs from the fusion input, the ``n == num_tokens`` shortcut, the sqrt(n) reshape
of any other (B, n, C), interpolation of any grid other than 32, flatten and ``torch.cat(dim=-1)``;
``hidden_size`` = sum of the towers'; and the fragile spots: ``dtype``/``device``/``dummy_feature`` raise
AttributeError (they read a ``clip_vision_tower`` that does not exist), ``config`` is None, and there
is no ``num_patches_per_side``.
Differs: the fusion input size comes from the config (``eagle_like_input_image_size``, default 128)
instead of the hard-coded 1024; ``det-1024`` (EVA-02) is not provided and raises instead of loading.
"""

from copy import deepcopy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .convnext_encoder import ConvNextVisionTower
from .hr_clip_encoder import HRCLIPVisionTower
from .pix2struct_encoder import Pix2StructLargeVisionTower
from .sam_encoder import SAMVisionTower
from .tiny_configs import tiny_settings


def _sub_args(args, tiny_config, **settings):
    sub = deepcopy(args)
    for key, value in settings.items():
        setattr(sub, key, value)
    sub.freeze_vision = False  # hard-coded by EAGLE for every encoder
    sub.tiny_config = tiny_config
    return sub


class MultiBackboneChannelConcatenationVisionTower(nn.Module):
    def __init__(self, vision_tower, args, grid_size=32):
        super().__init__()
        self.is_loaded = False
        self.grid_size = grid_size
        self.num_tokens = self.grid_size ** 2
        names = vision_tower.split(";")
        # Stand-in: EAGLE hard-codes 1024 here; the tiny sizes come with the config.
        self.input_image_size, self.tower_configs = tiny_settings(args)
        self.load_vision_towers(names, args)

    def load_vision_towers(self, vision_tower_name_list, args):
        self.vision_towers = nn.ModuleList()
        for name in vision_tower_name_list:
            tiny = self.tower_configs.get(name)
            if name == "det-1024":
                raise NotImplementedError(
                    "the EAGLE stand-in has no EVA-02 'det-1024' tower; use 'sam-1024' as the windowed ViT"
                )
            elif name == "convnext-1024":
                convnext_args = _sub_args(args, tiny, input_image_size=tiny["input_image_size"])
                convnext_vision_tower = ConvNextVisionTower("convnext_xxlarge.clip_laion2b_soup", convnext_args)
                convnext_vision_tower.load_model()
                self.vision_towers.append(convnext_vision_tower)
            elif name == "sam-1024":
                sam_args = _sub_args(args, tiny, input_image_size=tiny["input_image_size"], add_pixel_shuffle=True)
                sam_vision_tower = SAMVisionTower("SAM-L", sam_args)
                sam_vision_tower.load_model()
                self.vision_towers.append(sam_vision_tower)
            elif name == "pix2struct-1024":
                pix_args = _sub_args(args, tiny, input_image_size=tiny["input_image_size"], do_resize=True,
                                     de_normalize=True)
                pix_vision_tower = Pix2StructLargeVisionTower("pix2struct-large", pix_args)
                pix_vision_tower.load_model()
                self.vision_towers.append(pix_vision_tower)
            elif name == "clip-448":
                clip_args = _sub_args(args, tiny, input_image_size=tiny["input_image_size"])
                clip_vision_tower = HRCLIPVisionTower("openai/clip-vit-large-patch14-336", clip_args)
                clip_vision_tower.load_model()
                self.vision_towers.append(clip_vision_tower)
            # any other name: skipped without a word, as in EAGLE
        try:
            self.image_processor = convnext_vision_tower.image_processor
        except NameError as err:  # EAGLE fails here the same way (UnboundLocalError is a NameError)
            raise NameError(
                "EAGLE's fusion tower always takes ConvNeXt's image processor: 'convnext-1024' must be in "
                f"the encoder list, got {';'.join(vision_tower_name_list)!r}"
            ) from err
        self.is_loaded = True

    def load_model(self):
        assert self.is_loaded, "All the vision encoders should be loaded during initialization!"

    def forward(self, x):
        features = []
        for tower in self.vision_towers:
            if tower.input_image_size != self.input_image_size:
                size = (tower.input_image_size, tower.input_image_size)
                tower_x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=True).to(dtype=x.dtype)
            else:
                tower_x = x
            feature = tower(tower_x)
            if feature.dim() == 3:  # (b, n, c)
                b, n, c = feature.shape
                if n == self.num_tokens:
                    features.append(feature)
                    continue
                w = h = int(n ** 0.5)  # any other count is read as a square grid
                feature = feature.transpose(1, 2).reshape(b, c, h, w)
            else:
                b, c, h, w = feature.shape
            if w != self.grid_size:
                grid = (self.grid_size, self.grid_size)
                feature = F.interpolate(feature.float(), size=grid, mode="bilinear", align_corners=True).to(dtype=x.dtype)
            features.append(feature.flatten(2, 3).transpose(1, 2))
        return torch.cat(features, dim=-1)

    @property
    def dummy_feature(self):
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def dtype(self):
        return next(self.clip_vision_tower.parameters()).dtype  # no such attribute: AttributeError, as EAGLE

    @property
    def device(self):
        return next(self.clip_vision_tower.parameters()).device  # idem

    @property
    def config(self):
        return None

    @property
    def hidden_size(self):
        return sum(tower.hidden_size for tower in self.vision_towers)

    @property
    def num_patches(self):
        return self.num_tokens
