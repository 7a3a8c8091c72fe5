"""``build_vision_tower``: EAGLE picks the tower from ``mm_vision_tower`` (or ``vision_tower``)."""

from .multi_backbone_channel_concatenation_encoder import MultiBackboneChannelConcatenationVisionTower


def build_vision_tower(vision_tower_cfg, **kwargs):
    vision_tower = getattr(vision_tower_cfg, "mm_vision_tower", getattr(vision_tower_cfg, "vision_tower", None))
    if vision_tower is not None and ";" in vision_tower:
        # A list of encoders: the fusion tower, built now (delay_load is ignored, as in EAGLE).
        return MultiBackboneChannelConcatenationVisionTower(vision_tower, args=vision_tower_cfg)
    # EAGLE also builds LLaVA's single CLIPVisionTower for "openai/...clip..." hub names; the stand-in
    # cannot reach the hub, so it has only the multi-encoder branch.
    raise ValueError(f"Unknown vision tower: {vision_tower}")
