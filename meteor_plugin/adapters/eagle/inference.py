"""EAGLE's models at inference (NVlabs/EAGLE at fef95f1): the ``*_arch.py`` wrappers (EAGLE's ``eagle_arch.py`` is
LLaVA's with other names) and Stages 1 and 2 for its multi-encoder tower
(``MultiBackboneChannelConcatenationVisionTower``).

Two ways to run, chosen by ``fusion_mode`` (``auto`` picks by whether the model has been converted):

- ``post_projection`` (converted checkpoints, METEOR's architecture): the stages run the encoders
  (``stages.vision.encode_and_fuse`` on ``encoders.parts``): Stage 1 keeps a rank-guided budget of each encoder's
  tokens (inside the CLIP ViT between blocks; at the output of the others), each encoder's own projector maps
  them to the LLM width, the tokens are joined along the sequence and Stage 2 keeps the ``fusion_keep`` least
  redundant across encoders. EAGLE's channel concatenation is bypassed.
- ``training_free`` (unconverted checkpoints): EAGLE's tower runs as is (channel concatenation on the 32x32
  grid); the fusion stage keeps the ``fusion_keep`` grid positions with the best rank-weighted sum of each
  encoder's score, then the shared projector runs on them. Nothing is dropped inside an encoder here (all
  encoders must describe the same positions), so the encoder stage only scores.
"""

from __future__ import annotations

from typing import Any

import torch

from ...core.budget import resolve_stage_budget
from ...core.select import gather_tokens
from ...registry import REGISTRY
from ...stages import baselines, proportional
from ...stages.encoder import attention_importance
from ...stages.fusion import rank_weighted_positions
from ...stages.vision import ImageTokens, VisionRecord, encode_and_fuse, ranks_for
from ..family import require
from ..shared.llava_arch import VISION_HANDLERS, ArchTarget
from ..support import ONE_ENCODER, Support
from .conversion import wrap_llm_init
from .encoders import CAUSAL, FUSION_KEY, MODEL_MODULE, FusionConfigError, encoder_names, is_converted, parts


def resolve_mode(model: Any, cfg: Any) -> str:
    converted = is_converted(model)
    if getattr(model.config, FUSION_KEY, None) and not converted:
        raise FusionConfigError(
            "this checkpoint was converted to METEOR's post-projection fusion, but its per-encoder projectors "
            "(mm_projectors) were not built: enable meteor-plugin before loading the model"
        )
    if cfg.fusion_mode == "auto":
        return _check_similarity("post_projection" if converted else "training_free", cfg)
    if cfg.fusion_mode == "post_projection" and not converted:
        raise FusionConfigError(
            "MeteorConfig.fusion_mode='post_projection' needs per-encoder projectors: convert the checkpoint "
            "(meteor-plugin convert) or call meteor_plugin.adapters.eagle.conversion"
            ".convert_to_post_projection(model); "
            "allowed for an unconverted model: 'training_free' or 'auto'"
        )
    if cfg.fusion_mode == "training_free" and converted:
        raise FusionConfigError(
            "MeteorConfig.fusion_mode='training_free' keeps EAGLE's channel concatenation, but this model was "
            "converted to per-encoder projectors: allowed here 'post_projection' or 'auto'"
        )
    return _check_similarity(cfg.fusion_mode, cfg)


def _check_similarity(mode: str, cfg: Any) -> str:
    default = cfg.default_of("fusion_similarity")
    if mode == "training_free" and cfg.fusion and cfg.fusion_similarity != default:
        raise FusionConfigError(
            f"MeteorConfig.fusion_similarity={cfg.fusion_similarity!r} applies to post-projection fusion, but this "
            "model fuses EAGLE's way (training-free mode scores grid positions, not cross-encoder similarity): "
            f"convert it (meteor-plugin convert) or leave fusion_similarity at its default {default!r}"
        )
    if mode == "training_free" and cfg.fusion and cfg.fusion_quota != "none":
        raise FusionConfigError(
            f"MeteorConfig.fusion_quota={cfg.fusion_quota!r} applies to post-projection fusion, but this model fuses "
            "EAGLE's way (training-free mode keeps grid positions that every encoder shares, so there are no "
            "per-encoder shares): convert it (meteor-plugin convert) or leave fusion_quota at 'none'"
        )
    return mode


def encode_training_free(model: Any, images: torch.Tensor, cfg: Any, record: VisionRecord) -> torch.Tensor:
    llm = model.get_model()
    mbcc = llm.get_vision_tower()
    fused = mbcc(images)  # (B, 1024, sum of channels): EAGLE's own fusion, untouched
    b, n, _ = fused.shape
    names = encoder_names(model)
    record.stage("encoder").add(n, n, None, images=b, mode="training_free: encoders score, the fusion stage selects")
    if cfg.fusion:
        keep = resolve_stage_budget("fusion_keep", cfg.fusion_keep, n)
        slices, start = [], 0
        for tower in mbcc.vision_towers:
            slices.append(fused[..., start:start + tower.hidden_size])
            start += tower.hidden_size
        index = rank_weighted_positions(slices, ranks_for(cfg, names, model), keep, cfg.spread_floor)
        fused = gather_tokens(fused, index)
        record.stage("fusion").add(n, keep, index)
    return llm.mm_projector(fused)


def encode_baseline(model: Any, images: torch.Tensor, cfg: Any, record: VisionRecord, mode: str) -> torch.Tensor:
    """A pre-LLM baseline: every encoder unpruned, then ``fusion_keep`` of the projected tokens."""
    llm = model.get_model()
    mbcc = llm.get_vision_tower()
    if mode == "post_projection":
        encoders = []
        for part in parts(model):
            importance = None
            if part.vit is not None:
                tokens, importance = attention_importance(part.vit.layers, part.vit.block, part.vit.depth - 1,
                                                          lambda part=part: part.run(images), has_cls=False)
            else:
                tokens = part.run(images)
            encoders.append(baselines.EncoderTokens(part.project(tokens), grid=int(tokens.shape[1] ** 0.5),
                                                    importance=importance))
    else:
        if cfg.method == "drop_encoder":
            raise FusionConfigError("method='drop_encoder' needs per-encoder projectors: convert the checkpoint first")
        fused = llm.mm_projector(mbcc(images))
        encoders = [baselines.EncoderTokens(fused, grid=int(fused.shape[1] ** 0.5))]
    total = sum(e.tokens.shape[1] for e in encoders)
    keep = resolve_stage_budget("fusion_keep", cfg.fusion_keep, total)
    if proportional.placed(cfg):  # the kept tokens' places among all the encoders' tokens, and their sizes
        kept, where, sizes = baselines.placed(cfg.method, encoders, keep, cfg.seed, cfg.drop_encoder)
        record.tokens.extend(ImageTokens.batch(where, sizes, total))
    else:
        kept = baselines.select(cfg.method, encoders, keep, cfg.seed, cfg.drop_encoder)
    record.stage("baseline").add(total, kept.shape[1], None, images=images.shape[0], method=cfg.method)
    return kept


def encode_images(model: Any, images: Any, cfg: Any, record: VisionRecord, original: Any) -> torch.Tensor:
    """``encode_images`` of an EAGLE model while the plugin is enabled."""
    mode = resolve_mode(model, cfg)
    if not torch.is_tensor(images) or images.dim() != 4:
        raise NotImplementedError("meteor-plugin's EAGLE stages take a (B, 3, H, W) image batch")
    if cfg.method in baselines.PRE_LLM:
        return encode_baseline(model, images, cfg, record, mode)
    if mode == "post_projection":
        return encode_and_fuse(parts(model), images, cfg, record, REGISTRY, model)
    if cfg.encoder or cfg.fusion:
        if proportional.wanted(cfg):
            proportional.unavailable(cfg, model, "needs the tokens each encoder keeps, and this model fuses EAGLE's "
                                     "way (shared grid positions): convert it with meteor-plugin convert")
        return encode_training_free(model, images, cfg, record)
    return original(model, images)


def patch_eagle_vision(registry: Any) -> None:
    from eagle.model.language_model.eagle_llama import EagleLlamaModel
    from eagle.model.multimodal_encoder.multi_backbone_channel_concatenation_encoder import (
        MultiBackboneChannelConcatenationVisionTower,
    )

    require(MultiBackboneChannelConcatenationVisionTower, ("forward",), "EAGLE's MultiBackboneChannelConcatenationVisionTower")
    if not registry.is_patched(EagleLlamaModel, "__init__"):
        registry.patch(EagleLlamaModel, "__init__", wrap_llm_init(EagleLlamaModel.__init__))
    VISION_HANDLERS[MultiBackboneChannelConcatenationVisionTower] = encode_images


def support(model: Any) -> Support:
    """A converted model (per-encoder projectors) runs every stage and method; an unconverted one fuses EAGLE's
    way, where the encoders only score the shared grid (Stage 1 prunes nothing) and no encoder can be dropped."""
    several = len(encoder_names(model)) > 1
    stages = {"encoder", "llm"} | ({"fusion"} if several else set())
    refused, why_not = {}, {} if several else {"fusion": "has nothing to fuse: this model has one vision encoder"}
    if not several:
        refused["drop_encoder"] = ONE_ENCODER
    if not is_converted(model):
        stages.discard("encoder")
        why_not["encoder"] = ("only scores on an unconverted EAGLE model (its encoders describe one shared grid): "
                              "convert it (meteor-plugin convert) to prune inside each encoder")
        refused.setdefault("drop_encoder", "it needs per-encoder projectors: convert the checkpoint first "
                                           "(meteor-plugin convert)")
    return Support(type(model).__name__, frozenset(stages), refused, why_not, frozenset(baselines.PLACED))


TARGET = ArchTarget(name="eagle", module=MODEL_MODULE, causal=CAUSAL, llm="EagleLlamaModel",
                    vision=(patch_eagle_vision,), encoders=parts, support=support)
