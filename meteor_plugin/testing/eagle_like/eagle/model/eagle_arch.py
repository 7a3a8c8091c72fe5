"""EAGLE's multimodal mixins: build the vision tower and projector, encode images, splice them in.

EAGLE's ``eagle_arch.py`` is a rename-copy of LLaVA's ``llava_arch.py`` (the diff is class names, imports
and the ignored ``fpn_input_dim``). So ``EagleMetaModel`` is written here against EAGLE's builders, and
``EagleMetaForCausalLM`` takes LLaVA's splice (``prepare_inputs_labels_for_multimodal``) and
``initialize_vision_tokenizer`` as functions bound into this class: they run on EAGLE's classes, the
class owns its attributes (a patch of ``llava.*`` does not reach ``eagle.*``, as with the real copy), and an
EAGLE model is no instance of a LLaVA class.
"""

from abc import ABC, abstractmethod

import torch
import torch.nn as nn
from llava.model.llava_arch import LlavaMetaForCausalLM

from .multimodal_encoder.builder import build_vision_tower
from .multimodal_projector.builder import build_vision_projector


class EagleMetaModel:
    def __init__(self, config):
        super(EagleMetaModel, self).__init__(config)
        if hasattr(config, "mm_vision_tower"):
            # EAGLE's fusion tower loads every encoder now (delay_load is ignored), so from_pretrained
            # builds the towers from the config and then fills their weights from the checkpoint.
            self.vision_tower = build_vision_tower(config, delay_load=True)
            fpn_input_dim = getattr(self.vision_tower, "fpn_input_dim", [])
            self.mm_projector = build_vision_projector(config, fpn_input_dim=fpn_input_dim)
            if "unpad" in getattr(config, "mm_patch_merge_type", ""):
                self.image_newline = nn.Parameter(torch.empty(config.hidden_size, dtype=self.dtype))

    def get_vision_tower(self):
        vision_tower = getattr(self, "vision_tower", None)
        if type(vision_tower) is list:  # FSDP keeps it in a list
            vision_tower = vision_tower[0]
        return vision_tower

    def initialize_vision_modules(self, model_args, fsdp=None):
        """Training entry: build (or re-load) the tower and projector from ``ModelArguments``."""
        self.config.mm_vision_tower = model_args.vision_tower
        if self.get_vision_tower() is None:
            vision_tower = build_vision_tower(model_args)
            self.vision_tower = [vision_tower] if fsdp is not None and len(fsdp) > 0 else vision_tower
        else:
            vision_tower = self.get_vision_tower()
            vision_tower.load_model()
        # Stand-in: record the tiny encoder sizes so that from_pretrained rebuilds the same towers.
        self.config.eagle_like_input_image_size = vision_tower.input_image_size
        self.config.eagle_like_towers = dict(vision_tower.tower_configs)

        self.config.use_mm_proj = True
        self.config.mm_projector_type = getattr(model_args, "mm_projector_type", "linear")
        self.config.mm_hidden_size = vision_tower.hidden_size
        self.config.mm_vision_select_layer = model_args.mm_vision_select_layer
        self.config.mm_vision_select_feature = model_args.mm_vision_select_feature
        self.config.mm_patch_merge_type = model_args.mm_patch_merge_type

        if getattr(self, "mm_projector", None) is None:
            self.mm_projector = build_vision_projector(self.config, fpn_input_dim=getattr(vision_tower, "fpn_input_dim", []))
            if "unpad" in model_args.mm_patch_merge_type:
                std = 1 / torch.sqrt(torch.tensor(self.config.hidden_size, dtype=self.dtype))
                self.image_newline = nn.Parameter(torch.randn(self.config.hidden_size, dtype=self.dtype) * std)
        else:
            for p in self.mm_projector.parameters():  # in case LoRA froze it
                p.requires_grad = True

        if model_args.pretrain_mm_mlp_adapter is not None:
            weights = torch.load(model_args.pretrain_mm_mlp_adapter, map_location="cpu")
            prefix = "mm_projector."
            self.mm_projector.load_state_dict(
                {k.split(prefix, 1)[1]: v for k, v in weights.items() if prefix in k}
            )


class EagleMetaForCausalLM(ABC):
    @abstractmethod
    def get_model(self):
        pass

    def get_vision_tower(self):
        return self.get_model().get_vision_tower()

    def encode_images(self, images):
        # (B, 3, S, S) -> fused (B, 1024, sum of encoder channels) -> (B, 1024, LLM width)
        image_features = self.get_model().get_vision_tower()(images)
        return self.get_model().mm_projector(image_features)

    # The same functions as LLaVA's (see the module docstring).
    prepare_inputs_labels_for_multimodal = LlavaMetaForCausalLM.__dict__["prepare_inputs_labels_for_multimodal"]
    initialize_vision_tokenizer = LlavaMetaForCausalLM.__dict__["initialize_vision_tokenizer"]
