"""transformers' own LLaVA (``LlavaForConditionalGeneration``, the llava-hf checkpoints), on transformers 5.x.

Its processor writes one image token per visual token, and ``LlavaModel.forward`` scatters the projected
CLIP features into those positions (refusing a count that differs), then runs the language model
(any decoder with Llama-style layers: Llama/Vicuna, Mistral, Qwen2). So:

- **Stage 1** keeps ``K`` of an image's ``N`` patches inside CLIP, and every image-token run of the prompt
  is shortened from ``N`` to ``K`` first (in ``generate`` before generation starts, so its own length
  bookkeeping sees the short prompt; in a direct forward before the model runs), with the attention
  mask re-padded on the prompt's side;
- **Stage 3** reads the image tokens straight from ``input_ids`` and runs in the language model as on
  the llava package's models (``stages/decoder.py``).

Wrapped: ``LlavaForConditionalGeneration.generate`` and ``LlavaModel.forward``, and at a model's first
forward the class of its language model (whose ``forward`` acts only inside a call that a LLaVA model
started, for that model: a text-only model of the same class runs as it is). Training with labels and
Stage 3 or Stage 1 is refused (the llava package's classes train pruned). transformers 4.x's LLaVA
(which splices in the model) is refused by name at its first forward, like every class not pruned.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, List, Optional

import torch

from .. import percall
from ..compat import transformers as compat
from ..core.budget import resolve_stage_budget
from ..runtime import config_for
from ..stages.decoder import wrap_model_forward
from ..stages.encoder import HF_CLIP_BLOCK, VitPruner
from ..stages.layout import VisualLayout, query_mask
from ..stats import RunStats, StageCount
from .common import require
from .vision import VisionRecord, clip_layers, selected_depth

MODULE = "transformers.models.llava.modeling_llava"
CLASSES = ("LlavaForConditionalGeneration", "LlavaModel")


def is_installed() -> bool:
    if compat.generation() != "5":
        return False
    import importlib.util

    return importlib.util.find_spec(MODULE) is not None


def _patches(model: Any) -> int:
    vision = model.config.vision_config
    return (int(vision.image_size) // int(vision.patch_size)) ** 2


def image_tokens_per_image(model: Any, cfg: Any) -> int:
    """What an image becomes with ``cfg``: K of the N patches (Stage 1), plus CLS with the 'full' strategy."""
    patches = _patches(model)
    cls = 1 if getattr(model.config, "vision_feature_select_strategy", "default") == "full" else 0
    if not cfg.encoder:
        return patches + cls
    return resolve_stage_budget("encoder_keep", cfg.encoder_keep, patches) + cls


def _check_stage1(model: Any, cfg: Any) -> None:
    if not cfg.encoder:
        return
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise NotImplementedError(
            f"meteor-plugin Stage 1 on {type(model).__name__}: vision_feature_layer={layer!r} concatenates several "
            "layers of different lengths once pruned; set encoder=False")
    if getattr(model.config.vision_config, "model_type", "") not in ("clip_vision_model", "siglip_vision_model"):
        raise NotImplementedError(
            f"meteor-plugin Stage 1 knows CLIP and SigLIP towers, not {model.config.vision_config.model_type!r}; "
            "set encoder=False")


def shorten_image_runs(ids: torch.Tensor, mask: Optional[torch.Tensor], image_token: int, full: int,
                       keep: int) -> tuple:
    """Every run of ``full`` image tokens cut to ``keep`` (the last ones dropped), rows re-padded on the side
    the mask pads; returns (ids, mask). A run of another length is an error naming it."""
    if keep == full:
        return ids, mask
    b, length = ids.shape
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    image = (ids == image_token) & valid
    drop = torch.zeros_like(image)
    for i in range(b):
        positions = torch.nonzero(image[i]).flatten().tolist()
        runs: List[List[int]] = []
        for p in positions:
            if runs and p == runs[-1][-1] + 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        for run in runs:
            if len(run) % full:
                raise ValueError(
                    f"meteor-plugin: sample {i} has a run of {len(run)} image tokens; this model turns each image "
                    f"into {full}: was the prompt built by this model's processor?")
            for start in range(0, len(run), full):
                drop[i, run[start + keep:start + full]] = True
    kept = valid & ~drop
    counts = kept.sum(dim=1)
    width = int(counts.max())
    left = mask is not None and bool((~valid[:, 0]).any()) and bool(valid[:, -1].all())
    new_ids = ids.new_zeros(b, width)
    new_mask = torch.zeros(b, width, dtype=mask.dtype if mask is not None else torch.long, device=ids.device)
    for i in range(b):
        row = ids[i][kept[i]]
        span = slice(width - row.shape[0], width) if left else slice(0, row.shape[0])
        new_ids[i, span] = row
        new_mask[i, span] = 1
    return new_ids, (new_mask if mask is not None or not bool((counts == width).all()) else None)


def _layout(model: Any, cfg: Any, ids: torch.Tensor, mask: Optional[torch.Tensor], per_image: int) -> VisualLayout:
    """Where the image tokens are (straight from the ids), with Stage 1's counts per sample when it runs."""
    visual = ids == model.config.image_token_id
    valid = mask.bool() if mask is not None else torch.ones_like(visual)
    visual = visual & valid
    stats = RunStats(ids.shape[0])
    if cfg.encoder:
        patches = _patches(model)
        for i, n in enumerate((visual.sum(dim=1) // max(1, per_image)).tolist()):
            if n:
                stats.stages[i]["encoder"] = StageCount(n * patches, int(visual[i].sum()), {"images": n})
    return VisualLayout(visual=visual, valid=valid, stats=stats, query=query_mask(visual, valid, None, cfg.text_query))


def wrap_generate(original: Any) -> Any:
    @functools.wraps(original)
    @percall.entry
    def generate(self, *args, **kwargs):
        cfg = config_for(self)
        if cfg.llm:
            beams = kwargs.get("num_beams", getattr(getattr(self, "generation_config", None), "num_beams", 1)) or 1
            if beams > 1:
                raise NotImplementedError(
                    f"meteor-plugin Stage 3 does not support beam search (num_beams={beams}); use num_beams=1 "
                    "or enable(..., llm=False)")
        ids = kwargs.get("input_ids", args[0] if args else None)
        prompt = None
        if cfg.encoder and kwargs.get("pixel_values") is not None and torch.is_tensor(ids):
            _check_stage1(self, cfg)
            full = image_tokens_per_image(self, cfg.replace(encoder=False))
            prompt = ids
            ids, mask = shorten_image_runs(ids, kwargs.get("attention_mask"), self.config.image_token_id, full,
                                           image_tokens_per_image(self, cfg))
            args = args[1:]
            kwargs["input_ids"], kwargs["attention_mask"] = ids, mask
        call = percall.current()
        call.in_generate = True
        call.hf_short = True  # the prompt is already short: the prefill forward must not cut it again
        try:
            out = original(self, *args, **kwargs)
        finally:
            call.in_generate, call.hf_short = False, False
        if prompt is None:
            return out
        # Give back the user's prompt, as unpruned generate does: callers slice the new tokens off at its length.
        sequences = out if torch.is_tensor(out) else out.sequences
        repeat = sequences.shape[0] // prompt.shape[0]
        restored = torch.cat([prompt.repeat_interleave(repeat, dim=0), sequences[:, ids.shape[1]:]], dim=1)
        if torch.is_tensor(out):
            return restored
        out.sequences = restored
        return out

    return generate


def wrap_causal_forward(original: Any) -> Any:
    """``LlavaForConditionalGeneration.forward``: notes for the inner forward whether labels were given."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    @percall.entry
    def forward(self, *args, **kwargs):
        call = percall.current()
        call.hf_labels = signature.bind(self, *args, **kwargs).arguments.get("labels") is not None
        try:
            return original(self, *args, **kwargs)
        finally:
            call.hf_labels = False

    return forward


def wrap_model_forward_hf(original: Any, registry: Any) -> Any:
    """``LlavaModel.forward``: shortens the prompt for Stage 1, prunes CLIP, hands Stage 3 its layout."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    @percall.entry
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        a = bound.arguments
        extra = a.get("kwargs", {})
        cfg = config_for(self)
        call = percall.current()
        lm = self.language_model
        _patch_language_model(type(lm), registry)
        call.hf_language_model, call.hf_config = lm, cfg
        ids = a.get("input_ids")
        encoded = (a.get("mm_encoder_outputs") or {}).get("image") is not None  # generate encodes first
        if ids is None or (a.get("pixel_values") is None and not encoded):
            call.layout = None
            return original(*bound.args, **bound.kwargs)
        if call.hf_labels or (self.training and torch.is_grad_enabled()):
            if cfg.encoder or cfg.llm:
                raise NotImplementedError(
                    f"meteor-plugin: a loss or training forward of transformers' {type(self).__name__} with pruning "
                    "is not supported (its labels would not follow the pruned sequence); the llava package's "
                    "LlavaLlamaForCausalLM trains pruned (meteor_plugin.train), or set encoder=False, llm=False")
        full = image_tokens_per_image(self, cfg.replace(encoder=False))
        per_image = image_tokens_per_image(self, cfg)
        if cfg.encoder and not call.hf_short:
            _check_stage1(self, cfg)
            ids, mask = shorten_image_runs(ids, a.get("attention_mask"), self.config.image_token_id, full, per_image)
            a["input_ids"], a["attention_mask"] = ids, mask
            if a.get("position_ids") is not None or extra.get("cache_position") is not None:
                raise NotImplementedError(
                    "meteor-plugin Stage 1 on transformers' LLaVA shortens the prompt: pass no position_ids or "
                    "cache_position to a direct prefill forward (generate handles them)")
        if not encoded:
            call.vision = None
        call.layout = layout = _layout(self, cfg, a["input_ids"], a.get("attention_mask"), per_image)
        out = original(*bound.args, **bound.kwargs)
        record = call.vision.stages.get("encoder") if call.vision is not None else None
        kept = list(record.kept) if record is not None else []
        for sample in layout.stats.stages:  # the stats object Stage 3 recorded: the kept patches per image
            count = sample.get("encoder")
            if count is not None:
                n = count.detail.pop("images")
                count.detail["kept"], kept = kept[:n], kept[n:]
        call.vision = None
        return out

    return forward


def wrap_image_features(original: Any, registry: Any) -> Any:
    """``LlavaModel.get_image_features``: Stage 1 inside the CLIP tower, the kept patches recorded in the call
    (forward calls it, and so does generate before its prefill)."""

    @functools.wraps(original)
    @percall.entry
    def get_image_features(self, pixel_values, *args, **kwargs):
        cfg = config_for(self)
        if not cfg.encoder:
            return original(self, pixel_values, *args, **kwargs)
        _check_stage1(self, cfg)
        layers = clip_layers(self.vision_tower)
        depth = selected_depth(len(layers), int(self.config.vision_feature_layer))
        patches = _patches(self)
        keep = resolve_stage_budget("encoder_keep", cfg.encoder_keep, patches)
        pruner = VitPruner.attach(layers, HF_CLIP_BLOCK, registry)
        pruner.start(patches, keep, depth, cfg.encoder_shallow_share, has_cls=True, deep_score=cfg.encoder_deep_score)
        with pruner.running() as plan:
            out = original(self, pixel_values, *args, **kwargs)
        call = percall.current()
        call.vision = VisionRecord()
        call.vision.stage("encoder").add(patches, keep, plan.positions)
        return out

    return get_image_features


def _patch_language_model(cls: type, registry: Any) -> None:
    """The language model's class runs Stage 3 only inside a LLaVA call and for that call's model."""
    if registry.is_patched(cls, "forward"):
        return
    original = cls.forward
    pruned = wrap_model_forward(original, registry, lambda lm: percall.current().hf_config)

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        call = percall.current()
        if call is None or call.hf_language_model is not self:
            return original(self, *args, **kwargs)
        return pruned(self, *args, **kwargs)

    registry.patch(cls, "forward", forward)


def patch(registry: Any) -> List[type]:
    import importlib

    module = importlib.import_module(MODULE)
    require(module, CLASSES, MODULE)
    causal, inner = module.LlavaForConditionalGeneration, module.LlavaModel
    require(inner, ("forward", "get_image_features"), "LlavaModel")
    if not registry.is_patched(causal, "generate"):
        registry.patch(causal, "generate", wrap_generate(causal.generate))
        registry.patch(causal, "forward", wrap_causal_forward(causal.forward))
    if not registry.is_patched(inner, "forward"):
        registry.patch(inner, "forward", wrap_model_forward_hf(inner.forward, registry))
        registry.patch(inner, "get_image_features", wrap_image_features(inner.get_image_features, registry))
    return [causal]


class TransformersLlavaTarget:
    """The target entry for ``targets.ALL`` (same interface as ``common.FamilyTarget``)."""

    name = "transformers-llava"
    refused = {
        "LlavaForConditionalGeneration": "transformers' LLaVA is pruned on transformers 5.x only (4.x splices "
                                         "images inside the model)",
        "LlavaNextForConditionalGeneration": "transformers' LLaVA-NeXT has no adapter yet (the llava package's "
                                             "LLaVA-1.6 classes are pruned)",
        "LlavaOnevisionForConditionalGeneration": "LLaVA-OneVision has no adapter yet",
    }

    def is_installed(self) -> bool:
        return is_installed()

    def patch(self, registry: Any) -> List[type]:
        return patch(registry)


TARGET = TransformersLlavaTarget()
