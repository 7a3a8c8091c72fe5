"""transformers' Qwen2-VL, Qwen2.5-VL and Qwen3-VL at inference: the wrappers ``enable()`` installs.

As on transformers' LLaVA (``hf_llava/``; the pieces both use are ``shared/transformers_vlm.py``), the plugin prepares a pruning call
before the model runs: it encodes the images itself (Stage 1 inside the tower, or a pre-LLM baseline: ``vision.py``),
cuts each image's run of placeholders to the tokens kept, gives every token its unpruned position
(``positions.py``), and hands the model the features (``mm_encoder_outputs``) and the positions
(``position_ids``); in ``generate`` before generation starts (the user's prompt is given back in the output), in
a direct forward before the model runs. Stage 3 then runs in the language model (``stages/decoder.py``) on the
``VisualLayout`` built here: the visual tokens are the image and video placeholders.

Wrapped: each class's ``generate`` and ``forward`` and its inner model's ``forward``; at a model's first forward
the class of its language model (its ``forward``, and Qwen3-VL's ``_deepstack_process``), acting only inside a call
that a Qwen-VL model started, for that model; Qwen2.5-VL's patch merger class while Stage 1 runs.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from ... import percall
from ...core.select import gather_tokens
from ...runtime import pruning_config
from ...stages import baselines, proportional
from ...stages.layout import VisualLayout, query_mask
from ...stats import RunStats, StageCount
from ...stages.decoder import patch_language_model
from ..shared.transformers_vlm import refuse_beams, refuse_training, state, with_users_prompt
from . import positions as pos
from .vision import Encoded, encode_baseline, encode_stage1, wrap_merger_forward


def prunes(cfg: Any) -> bool:
    """Whether ``cfg`` removes tokens at all: a stage that runs on one tower, or a pre-LLM baseline."""
    return bool(cfg.encoder or cfg.llm or cfg.method in baselines.PRE_LLM)


def _vision_side(cfg: Any) -> bool:
    """Whether the call's images are pruned before the language model (Stage 1, or a pre-LLM baseline)."""
    return cfg.method in baselines.PRE_LLM or cfg.encoder


def _refuse(inner: Any, cfg: Any, kwargs: Dict[str, Any]) -> None:
    name = type(inner).__name__
    if kwargs.get("pixel_values_videos") is not None and _vision_side(cfg):
        what = f"the {cfg.method!r} baseline" if cfg.method in baselines.PRE_LLM else "Stage 1"
        raise NotImplementedError(
            f"meteor-plugin: {what} does not prune the video inputs (pixel_values_videos) of {name} (a video's frames "
            "share their tokens' places across time, which it does not handle); Stage 3 prunes video tokens: set "
            "encoder=False (and method='meteor' or 'fastv'), or run videos with meteor_plugin.disable()")
    if cfg.proportional_attention == "on" and cfg.method != "meteor":
        raise NotImplementedError(
            f"meteor-plugin: MeteorConfig.proportional_attention='on' applies to METEOR's stages, not the "
            f"{cfg.method!r} baseline; set it to 'auto' or 'off'")


@dataclass
class Prepared:
    prompt: pos.Prompt
    encoded: Optional[Encoded]
    layout: VisualLayout

    def model_kwargs(self) -> Dict[str, Any]:
        """What the model takes instead of the user's inputs."""
        out: Dict[str, Any] = {"input_ids": self.prompt.ids, "attention_mask": self.prompt.mask,
                               "mm_token_type_ids": self.prompt.types, "position_ids": self.prompt.positions}
        if self.encoded is not None:
            out.update(pixel_values=None, mm_encoder_outputs={"image": self.encoded.output})
        return out


def prepare(inner: Any, cfg: Any, ids: torch.Tensor, mask: Optional[torch.Tensor], kwargs: Dict[str, Any],
            registry: Any) -> Prepared:
    """Encode the images (Stage 1 or a baseline), fit the prompt to them with its positions, build Stage 3's
    layout."""
    _refuse(inner, cfg, kwargs)
    config = inner.config
    types = pos.token_types(config, ids, kwargs.get("mm_token_type_ids"))
    rope = pos.unpruned(inner, ids, mask, types, kwargs)
    pixels, grid = kwargs.get("pixel_values"), kwargs.get("image_grid_thw")
    encoded = None
    if pixels is not None and _vision_side(cfg):
        if cfg.method in baselines.PRE_LLM:
            encoded = encode_baseline(inner, cfg, pixels, grid)
        else:
            merger = type(inner.visual.merger)
            if getattr(inner.visual, "fullatt_block_indexes", None) is not None and not registry.is_patched(
                    merger, "forward"):
                registry.patch(merger, "forward", wrap_merger_forward(merger.forward))
            encoded = encode_stage1(inner, cfg, pixels, grid, registry, track_sizes=proportional.wanted(cfg))
        prompt = pos.fitted(ids, mask, types, rope, config.image_token_id, encoded.kept, encoded.sizes)
    else:
        prompt = pos.as_given(ids, mask, types, rope, config.image_token_id)
    return Prepared(prompt, encoded, build_layout(config, cfg, prompt, encoded))


def build_layout(config: Any, cfg: Any, prompt: pos.Prompt, encoded: Optional[Encoded]) -> VisualLayout:
    """Visual tokens: the image and video placeholders; stats of what the vision side kept, per sample."""
    valid = prompt.valid
    ids = prompt.ids
    visual = ((ids == config.image_token_id) | (ids == config.video_token_id)) & valid
    stats = RunStats(ids.shape[0])
    if encoded is not None:
        for (i, _, _), entered, kept in zip(prompt.runs, encoded.entered, encoded.kept):
            count = stats.stages[i].setdefault(encoded.stage, StageCount(0, 0, {"kept": []}))
            count.entered += entered
            count.left += int(kept.shape[0])
            count.detail["kept"].append(kept.tolist())
    layout = VisualLayout(visual=visual, query=query_mask(visual, valid, None, cfg.text_query), valid=valid,
                          stats=stats)
    if proportional.wanted(cfg):
        layout.positions, layout.key_bias = prompt.positions, prompt.bias
    return layout


# Wrappers ------------------------------------------------------------------------------------------------------
def _has_visual(kwargs: Dict[str, Any]) -> bool:
    return kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None


def wrap_generate(original: Any, registry: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    @percall.entry
    def generate(self, *args, **kwargs):
        cfg = pruning_config(self)
        if cfg is None:
            return original(self, *args, **kwargs)
        refuse_beams(self, cfg, kwargs)
        a = dict(signature.bind(self, *args, **kwargs).arguments)
        extra = dict(a.pop("kwargs", {}))
        a.pop("self")
        prompt = a.pop("inputs", None)
        prompt = prompt if prompt is not None else extra.pop("input_ids", None)
        if not prunes(cfg) or not _has_visual(extra) or not torch.is_tensor(prompt):
            return original(self, *args, **kwargs)
        config = a.get("generation_config") or getattr(self, "generation_config", None)
        if cfg.llm and extra.get("use_cache", getattr(config, "use_cache", True)) is False:
            raise NotImplementedError(
                f"meteor-plugin Stage 3 prunes {type(self).__name__}'s prefill and its KV cache: generate without a "
                "cache runs a full forward per token, which Stage 3 would prune afresh; use the cache, or llm=False")
        if extra.get("position_ids") is not None:
            raise NotImplementedError(f"meteor-plugin gives {type(self).__name__}'s pruned prompt its positions "
                                      "itself: call generate without position_ids")
        prep = prepare(self.model, cfg, prompt, extra.get("attention_mask"), extra, registry)
        extra.update(prep.model_kwargs())
        for name in ("attention_mask", "pixel_values"):
            if extra.get(name, 0) is None:
                extra.pop(name)
        call, mine = percall.current(), state()
        call.in_generate, mine.layout = True, prep.layout
        try:
            out = original(self, **a, **extra)
        finally:
            call.in_generate, mine.layout = False, None
        self.model.rope_deltas = prep.prompt.deltas  # what the model holds after a prefill of this prompt
        ids = prep.prompt.ids
        return with_users_prompt(out, prompt, ids)

    return generate


def wrap_inner_forward(original: Any, registry: Any) -> Any:
    """The inner model's ``forward``: images encoded and the prompt fitted first, Stage 3's layout handed on."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    @percall.entry
    def forward(self, *args, **kwargs):
        cfg = pruning_config(self)
        if cfg is None:
            return original(self, *args, **kwargs)
        a = signature.bind(self, *args, **kwargs).arguments
        extra = a.get("kwargs", {})
        call, mine = percall.current(), state()
        lm = self.language_model
        patch_language_model(type(lm), registry)
        patch_deepstack(type(lm), registry)
        call.language_model, call.language_config = lm, cfg
        layout, mine.layout = mine.layout, None  # generate's, for its prefill
        merged = {**a, **extra}
        given = merged.get("mm_encoder_outputs") or {}  # generate passes {} when there is nothing to encode
        if layout is None and prunes(cfg) and any(v is not None for v in given.values()):
            raise NotImplementedError(
                f"meteor-plugin encodes {type(self).__name__}'s images itself to prune them: pass pixel_values, not "
                "mm_encoder_outputs, while it is enabled")
        if layout is None and prunes(cfg) and _has_visual(merged):
            refuse_training(self, mine.labels)
            ids = a.get("input_ids")
            if ids is None:
                raise NotImplementedError(
                    f"meteor-plugin prunes {type(self).__name__} from input_ids (the placeholders say where each "
                    "image goes): pass input_ids, not inputs_embeds, with the images")
            if a.get("position_ids") is not None or _cached(a.get("past_key_values")):
                raise NotImplementedError(
                    f"meteor-plugin fits {type(self).__name__}'s prompt to the pruned image: pass no position_ids or "
                    "KV cache to a direct prefill forward (generate handles them)")
            prep = prepare(self, cfg, ids, a.get("attention_mask"), merged, registry)
            a.update(prep.model_kwargs())
            self.rope_deltas = prep.prompt.deltas  # what the model holds after a prefill of this prompt
            layout = prep.layout
        call.layout = layout
        # By keyword: the class's decorators fill some arguments from its config by name.
        given = {k: v for k, v in a.items() if k not in ("self", "kwargs")}
        return original(self, **given, **extra)

    return forward


def _cached(past: Any) -> bool:
    from ...compat.transformers import past_length

    return past is not None and past_length(past, 0) > 0


def patch_deepstack(cls: type, registry: Any) -> None:
    """Qwen3-VL adds each DeepStack feature to the visual tokens of the first decoder layers' outputs: once Stage 3
    has compacted the sequence, to the kept ones only (the features of the dropped tokens go with them)."""
    if not hasattr(cls, "_deepstack_process") or registry.is_patched(cls, "_deepstack_process"):
        return
    original = cls._deepstack_process

    @functools.wraps(original)
    def _deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds):
        call = percall.current()
        pruner = call.decoder if call is not None else None
        plan = pruner.plan if pruner is not None and pruner.model is self else None
        if plan is None or plan.mode != "prefill" or plan.index is None:
            return original(self, hidden_states, visual_pos_masks, visual_embeds)
        index, kept_valid = plan.index.to(visual_pos_masks.device), plan.kept_valid.to(visual_pos_masks.device)
        kept = torch.zeros_like(visual_pos_masks)
        rows = torch.arange(index.shape[0], device=index.device)[:, None].expand_as(index)
        kept[rows[kept_valid], index[kept_valid]] = True
        embeds = visual_embeds[kept[visual_pos_masks].to(visual_embeds.device)]
        mask = gather_tokens(visual_pos_masks, index) & kept_valid
        return original(self, hidden_states, mask, embeds)

    registry.patch(cls, "_deepstack_process", _deepstack_process)
