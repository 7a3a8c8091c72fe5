"""transformers' own LLaVA, LLaVA-NeXT and LLaVA-OneVision (the llava-hf checkpoints) on transformers 5.x (4.x's
path is ``v4.py``; both are built on ``common.py``).

Their processors write one image token per visual token (LLaVA-NeXT's count includes its row
separators and depends on the image size), and the model scatters the projected features into those
positions, refusing a count that differs; the language model is any decoder with Llama-style layers
(Llama/Vicuna, Mistral, Qwen2: OneVision's). The adapter therefore encodes the images itself before the model runs:

- **Stage 1** keeps ``K`` of every input's patches inside the CLIP or SigLIP tower (``get_image_features``;
  CLIP's CLS scores the deep boundary, SigLIP, which has none, by the attention each patch receives). For
  LLaVA-NeXT the kept tokens go back to their patch positions (NaN rows elsewhere) so that its own
  ``pack_image_features`` (crop grid, unpad, row separators) runs unchanged, and the NaN rows are
  dropped after it (``anyres.spread_to_grid``);
- each image's run of image tokens in the prompt is then cut to the features it really has, and the
  model gets the features (``mm_encoder_outputs``) instead of the pixels: in ``generate`` before
  generation starts, so its own bookkeeping sees the short prompt (and the user's prompt is given back
  in the output), in a direct forward before the model runs;
- **Stage 3** runs in the language model as on the llava package's models (``stages/decoder.py``): the
  visual tokens are the image-token positions, less LLaVA-NeXT's and OneVision's row separators (structure,
  never pruned);
- **the pre-LLM baselines** (``random``, ``avgpool``, ``visionzip``) keep ``fusion_keep`` of each CLIP input's
  projected tokens instead of Stage 1 (``common.Baseline``): on the flat LLaVA after ``get_image_features``, on the
  packing classes inside ``pack_image_features``, spread to their patches like Stage 1's tokens;
- **proportional attention**: on the flat LLaVA, Stage 1's kept patches keep their unpruned places and sizes
  (``common._unpruned_geometry``); with Stage 3 alone every token starts at its own place with size 1 (packed crops
  too); Stage 1 on packed crops runs without it (``stage1`` warns or refuses).

LLaVA-OneVision packs like LLaVA-NeXT (SigLIP tower: Stage 1 as above), but its ``anyres_max`` step
interpolates a crop grid that holds more than its budget of patches down: pruned patches cannot be put back
in a grid it resamples, so Stage 1 refuses such an image by name before the tower runs (``_refuse_resampled``;
grids within the budget, and images that share a sample, are pruned), and Stage 3 runs on any. Its video
inputs are not pruned: a pruning call with ``pixel_values_videos`` is refused.

Wrapped: each class's ``generate`` and inner ``forward``/``get_image_features`` (and LLaVA-NeXT's
``pack_image_features``), and at a model's first forward the class of its language model, whose
``forward`` acts only inside a call that a LLaVA model started, for that model (a text-only model of the
same class runs as it is). A loss or training forward with pruning is refused (the llava package's
classes train pruned).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from ... import percall
from ...runtime import pruning_config
from ...stages.baselines import PRE_LLM
from ...stages.decoder import patch_language_model
from ..family import require
from ..shared.transformers_vlm import (fit_prompt, refuse_beams, refuse_training, state, with_users_prompt,
                                      wrap_causal_forward)
from .common import (baseline, build_layout, check_stage1, drop_pruned, is_anyres, prunes, spread_crops, stage1,
                     tower_patches)


@dataclass(frozen=True)
class ModelClasses:
    module: str
    causal: str
    inner: str
    spatial: bool  # LLaVA-NeXT, OneVision: crops packed with unpad and row separators


CLASSES = (
    ModelClasses("transformers.models.llava.modeling_llava", "LlavaForConditionalGeneration", "LlavaModel", False),
    ModelClasses("transformers.models.llava_next.modeling_llava_next", "LlavaNextForConditionalGeneration",
                 "LlavaNextModel", True),
    ModelClasses("transformers.models.llava_onevision.modeling_llava_onevision",
                 "LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel", True),
)
INNER = {c.inner: c for c in CLASSES}


def wrap_image_features(original: Any, registry: Any) -> Any:
    """The inner model's ``get_image_features``: Stage 1 inside the vision tower; the kept patches of every CLIP
    input are put in the call (LLaVA-NeXT's ``pack_image_features`` reads them)."""

    signature = inspect.signature(original)

    @functools.wraps(original)
    @percall.entry
    def get_image_features(self, pixel_values, *args, **kwargs):
        cfg = pruning_config(self)
        if cfg is None:
            return original(self, pixel_values, *args, **kwargs)
        vision_side = cfg.method in PRE_LLM or cfg.encoder
        if vision_side and hasattr(self.config, "vision_aspect_ratio"):
            a = signature.bind(self, pixel_values, *args, **kwargs).arguments
            what = f"the {cfg.method!r} baseline" if cfg.method in PRE_LLM else "Stage 1"
            _refuse_resampled(self, a.get("image_sizes"), a.get("vision_aspect_ratio"), a.get("batch_num_images"),
                              what)
        if cfg.method not in PRE_LLM:
            with stage1(self, cfg, registry):
                return original(self, pixel_values, *args, **kwargs)
        with baseline(self, cfg) as request:
            out = original(self, pixel_values, *args, **kwargs)
            if not is_anyres(self):  # the flat LLaVA: each image's tokens as they are (the packing ones select there)
                features = list(out.pooler_output)
                kept, _ = request.select(torch.stack(features))
                out.pooler_output = list(kept)
        return out

    return get_image_features


def _refuse_resampled(model: Any, sizes: Any, aspect: Optional[str], per_sample: Any, what: str = "Stage 1") -> None:
    """OneVision's ``anyres_max_N`` step interpolates an image's unpadded crop grid down when it holds more than
    about N crops' patches (by 10%, as upstream's ``pack_image_features`` decides): pruned patches cannot be
    placed back in a resampled grid, so Stage 1 refuses such an image by name (smaller grids are pruned)."""
    aspect = aspect or model.config.vision_aspect_ratio
    most = re.search(r"(\d+)$", str(aspect))
    if sizes is None or most is None:
        return
    module = importlib.import_module(INNER[type(model).__name__].module)
    vision = model.config.vision_config
    side = int(vision.image_size) // int(vision.patch_size)
    alone = [True] * len(sizes) if per_sample is None else [int(n) == 1 for n in per_sample for _ in range(int(n))]
    for k, (size, cropped) in enumerate(zip(sizes, alone)):
        if not cropped:  # an image that shares its sample is not cropped
            continue
        rows, cols = module.get_anyres_image_grid_shape(size, model.config.image_grid_pinpoints, vision.image_size)
        _, height, width = module.unpad_image(torch.empty(0, rows * side, cols * side), size).shape
        if math.sqrt(height * width / (int(most.group(1)) * side ** 2)) > 1.1:
            raise NotImplementedError(
                f"meteor-plugin {what} on {INNER[type(model).__name__].causal}: image {k} "
                f"({int(size[0])}x{int(size[1])}) makes a {rows}x{cols} crop grid that its {aspect} step interpolates "
                f"down, so pruned patches cannot be placed back in it ({what} prunes images whose unpadded grid fits "
                "the budget); for such inputs set encoder=False with method='meteor' or 'fastv' (Stage 3 runs)")


def wrap_pack(original: Any) -> Any:
    """LLaVA-NeXT's ``pack_image_features`` on Stage 1's tokens (or a baseline's, selected here): spread to full
    grids, packed, NaN rows dropped."""

    @functools.wraps(original)
    def pack_image_features(self, image_features, *args, **kwargs):
        mine = state() if percall.current() is not None else None
        if mine is None or (mine.plan is None and mine.baseline is None):
            return original(self, image_features, *args, **kwargs)
        if mine.baseline is not None:  # a pre-LLM baseline keeps its tokens of every crop here
            crops = [f.shape[0] for f in image_features]
            kept, positions = mine.baseline.select(torch.cat(list(image_features)))
            image_features = list(torch.split(kept, crops))
        else:
            positions = mine.plan.positions
        spread = spread_crops(image_features, positions.tolist(), tower_patches(self))
        packed, _ = original(self, spread, *args, **kwargs)
        packed = drop_pruned(packed)
        lens = torch.tensor([p.shape[0] for p in packed], dtype=torch.long, device=packed[0].device)
        return packed, lens

    return pack_image_features


def encode(inner: Any, pixel_values: Any, kwargs: Dict[str, Any]) -> Any:
    """The images' features as the model would compute them (Stage 1 included), to hand it ready-made."""
    names = inspect.signature(inner.get_image_features).parameters
    given = {k: kwargs[k] for k in ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy",
                                    "vision_aspect_ratio", "batch_num_images")
             if k in names and kwargs.get(k) is not None}
    return inner.get_image_features(pixel_values, return_dict=True, **given)


# The prompt and the layout ------------------------------------------------------------------------------------
def prepare(model: Any, inner: Any, cfg: Any, ids: torch.Tensor, mask: Optional[torch.Tensor], pixels: Any,
            kwargs: Dict[str, Any]) -> tuple:
    """Encode the images (Stage 1), fit the prompt to them, and build Stage 3's layout.

    Returns (ids, mask, encoder outputs, layout)."""
    check_stage1(inner, cfg)
    out = encode(inner, pixels, kwargs)
    features = list(out.pooler_output)
    ids, mask, runs = fit_prompt(ids, mask, inner.config.image_token_id, [f.shape[0] for f in features])
    crops = _crops_per_image(inner, pixels, kwargs, len(features))
    return ids, mask, out, build_layout(inner, cfg, ids, mask, features, crops, runs)


def _crops_per_image(inner: Any, pixels: Any, kwargs: Dict[str, Any], images: int) -> List[int]:
    if not is_anyres(inner):
        return [1] * images
    module = importlib.import_module(INNER[type(inner).__name__].module)
    crops = [module.image_size_to_num_patches(size, inner.config.image_grid_pinpoints,
                                              inner.config.vision_config.image_size)
             for size in kwargs["image_sizes"]]
    per_sample = kwargs.get("batch_num_images")
    if per_sample is not None:  # OneVision: an image that shares its sample with others is not cropped
        alone = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        crops = [c if a else 1 for c, a in zip(crops, alone)]
    return crops


def _refuse_video(cfg: Any, videos: Any) -> None:
    if videos is not None and prunes(cfg):
        raise NotImplementedError(
            "meteor-plugin does not prune video inputs (pixel_values_videos): their tokens would be treated as "
            "text; run videos with meteor_plugin.disable() or enable(..., encoder=False, llm=False)")


# Wrappers ------------------------------------------------------------------------------------------------------
def wrap_generate(original: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    @percall.entry
    def generate(self, *args, **kwargs):
        cfg = pruning_config(self)
        if cfg is None:
            return original(self, *args, **kwargs)
        refuse_beams(self, cfg, kwargs)
        named = dict(signature.bind(self, *args, **kwargs).arguments)
        extra = dict(named.pop("kwargs", {}))
        named.pop("self")
        prompt = named.pop("inputs", None)
        prompt = prompt if prompt is not None else extra.get("input_ids")
        pixels = extra.get("pixel_values")
        _refuse_video(cfg, extra.get("pixel_values_videos"))
        if not prunes(cfg) or pixels is None or not torch.is_tensor(prompt):
            return original(self, *args, **kwargs)
        ids, mask, encoded, layout = prepare(self, self.model, cfg, prompt, extra.get("attention_mask"), pixels, extra)
        extra.pop("pixel_values")
        extra.update(input_ids=ids, attention_mask=mask, mm_encoder_outputs={"image": encoded})
        if mask is None:
            extra.pop("attention_mask")
        call, mine = percall.current(), state()
        call.in_generate, mine.layout = True, layout
        try:  # generate's own named arguments (generation_config, logits_processor...) go on as given
            out = original(self, **named, **extra)
        finally:
            call.in_generate, mine.layout = False, None
        return with_users_prompt(out, prompt, ids)

    return generate


def wrap_inner_forward(original: Any, registry: Any) -> Any:
    """The inner model's ``forward``: images encoded and the prompt fitted first, Stage 3's layout handed on."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    @percall.entry
    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        a = bound.arguments
        extra = a.get("kwargs", {})
        cfg = pruning_config(self)
        if cfg is None:
            return original(self, *args, **kwargs)
        call, mine = percall.current(), state()
        lm = self.language_model
        patch_language_model(type(lm), registry)
        call.language_model, call.language_config = lm, cfg
        layout, mine.layout = mine.layout, None  # generate's, for its prefill
        ids, pixels = a.get("input_ids"), a.get("pixel_values")
        _refuse_video(cfg, a.get("pixel_values_videos", extra.get("pixel_values_videos")))
        if layout is None and prunes(cfg) and ids is not None and pixels is not None:
            refuse_training(self, mine.labels)
            if a.get("position_ids") is not None or extra.get("cache_position") is not None:
                raise NotImplementedError(
                    "meteor-plugin on transformers' LLaVA fits the prompt to the pruned image: pass no position_ids "
                    "or cache_position to a direct prefill forward (generate handles them)")
            ids, mask, encoded, layout = prepare(self, self, cfg, ids, a.get("attention_mask"), pixels, {**a, **extra})
            a["input_ids"], a["attention_mask"], a["pixel_values"] = ids, mask, None
            a["mm_encoder_outputs"] = {"image": encoded}
        call.layout = layout
        # By keyword: the class's decorators fill some arguments from its config by name.
        given = {k: v for k, v in a.items() if k not in ("self", "kwargs")}
        return original(self, **given, **extra)

    return forward


def patch(registry: Any) -> List[type]:
    pruned = []
    for classes in CLASSES:
        if importlib.util.find_spec(classes.module) is None:
            continue
        module = importlib.import_module(classes.module)
        require(module, (classes.causal, classes.inner), classes.module)
        causal, inner = getattr(module, classes.causal), getattr(module, classes.inner)
        require(inner, ("forward", "get_image_features"), classes.inner)
        if not registry.is_patched(causal, "generate"):
            registry.patch(causal, "generate", wrap_generate(causal.generate))
            registry.patch(causal, "forward", wrap_causal_forward(causal.forward))
        if not registry.is_patched(inner, "forward"):
            registry.patch(inner, "forward", wrap_inner_forward(inner.forward, registry))
            registry.patch(inner, "get_image_features", wrap_image_features(inner.get_image_features, registry))
            if classes.spatial:
                require(inner, ("pack_image_features",), classes.inner)
                registry.patch(inner, "pack_image_features", wrap_pack(inner.pack_image_features))
        pruned.append(causal)
    return pruned
