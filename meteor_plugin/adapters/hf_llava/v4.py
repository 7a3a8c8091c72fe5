"""transformers' LLaVA and LLaVA-NeXT on transformers 4.x (4.37's and 4.44's): the family's path there, built on
``common.py`` like 5.x's ``v5.py``.

On 4.x the model splices the images inside its ``forward``: each image is one image token in the prompt,
which ``_merge_input_ids_with_image_features`` replaces with the image's features, building the attention
mask and positions of the longer sequence itself (and, in ``generate``, guessing the mask of later steps
from which cached keys are zero). A pruned image has fewer features than that merge expects, so while
pruning the adapter does the splice itself, as the merge would:

- the images are encoded with the model's own tower and projector (Stage 1 inside the CLIP or SigLIP
  tower, ``common.stage1``, or a pre-LLM baseline on each CLIP input's projected tokens, ``common.baseline``; LLaVA-NeXT's crops packed by its own ``pack_image_features`` after
  ``common.spread_crops``, the NaN rows dropped after it);
- each image token is replaced by its image's features, rows re-padded on the side the mask pads, and the
  model gets ``inputs_embeds``, the mask and the positions (``cumsum`` of the mask, as the merge computes);
- ``generate`` is handed the spliced embeddings and mask, as the llava package's ``generate`` hands its own,
  so its cache and mask grow from the spliced prompt; the user's prompt is given back in the output;
- Stage 3 runs in the language model's decoder with ``common.build_layout``'s layout (row separators
  never pruned).

With pruning off, or with no images, the model runs as it is. A loss or training forward with pruning,
beam search with Stage 3 and a prefill given a cache are refused, as on 5.x.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
from typing import Any, Dict, List, Optional, Tuple

import torch

from ... import percall
from ...compat import transformers as compat
from ...runtime import pruning_config
from ...stages.decoder import patch_language_model
from ..family import require
from ..shared.transformers_vlm import refuse_beams, refuse_training, state
from . import common

# (module, class, spatial) of the 4.x classes; LLaVA-NeXT exists from 4.39, OneVision only where 5.x's path runs.
CLASSES = (
    ("transformers.models.llava.modeling_llava", "LlavaForConditionalGeneration", False),
    ("transformers.models.llava_next.modeling_llava_next", "LlavaNextForConditionalGeneration", True),
)


def _image_token(model: Any) -> int:
    config = model.config
    token = getattr(config, "image_token_index", None)
    return int(token if token is not None else config.image_token_id)


# Encoding ------------------------------------------------------------------------------------------------------
def encode(model: Any, cfg: Any, registry: Any, pixels: torch.Tensor, sizes: Any,
           kwargs: Dict[str, Any]) -> Tuple[List[torch.Tensor], List[int]]:
    """Each image's features as the model's forward computes them, Stage 1 included; and how many CLIP inputs
    (base image and crops) each image was."""
    config = model.config
    layer = kwargs.get("vision_feature_layer") or config.vision_feature_layer
    strategy = kwargs.get("vision_feature_select_strategy") or config.vision_feature_select_strategy
    if strategy not in ("default", "full"):
        raise ValueError(f"meteor-plugin: unknown vision_feature_select_strategy {strategy!r}")
    spatial = common.is_anyres(model)
    if spatial:
        if sizes is None:
            raise ValueError(f"meteor-plugin: {type(model).__name__} needs image_sizes with its pixel_values")
        module = importlib.import_module(type(model).__module__)
        crops = [module.image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                 for size in sizes]
        if pixels.dim() == 5:  # (images, most crops, 3, S, S): each image's own crops
            pixels = torch.cat([p[:n] for p, n in zip(pixels, crops)], dim=0)
    else:
        crops = [1] * pixels.shape[0]
    with common.stage1(model, cfg, registry) as plan, common.baseline(model, cfg) as request:
        hidden = model.vision_tower(pixels, output_hidden_states=True).hidden_states[layer]
        if strategy == "default":
            hidden = hidden[:, 1:]
        features = model.multi_modal_projector(hidden)
        positions = None
        if request is not None:  # a pre-LLM baseline: each CLIP input's kept tokens, at their patches
            features, positions = request.select(features)
    if plan is not None:
        positions = plan.positions
    if not spatial:
        return list(features), crops
    per_image = list(torch.split(features, crops, dim=0))
    if positions is not None:
        per_image = common.spread_crops(per_image, positions.tolist(), common.tower_patches(model))
    packed, lens = model.pack_image_features(per_image, sizes, image_newline=model.image_newline)
    packed = list(torch.split(packed, [int(n) for n in lens], dim=0)) if torch.is_tensor(packed) else list(packed)
    return (common.drop_pruned(packed) if positions is not None else packed), crops


# The splice ----------------------------------------------------------------------------------------------------
def splice(model: Any, ids: torch.Tensor, mask: Optional[torch.Tensor], features: List[torch.Tensor]) -> tuple:
    """Each image token replaced by its image's features (images in prompt order), rows re-padded on the side
    the mask pads. Returns (inputs_embeds, attention_mask, position_ids, expanded ids, runs), where the expanded
    ids hold one image token per visual feature and runs are each image's (sample, start, end)."""
    token = _image_token(model)
    valid = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
    found = int(((ids == token) & valid).sum())
    if found != len(features):
        raise ValueError(
            f"meteor-plugin: the prompts hold {found} image tokens for {len(features)} images; on transformers 4.x "
            f"each image is one image token (index {token}), as its processor writes it")
    left = mask is not None and bool((~valid[:, 0]).any()) and bool(valid[:, -1].all())
    rows, spans, at = [], [], 0
    for i in range(ids.shape[0]):
        row: List[int] = []
        for t in ids[i][valid[i]].tolist():
            if t == token:
                spans.append((i, len(row), len(row) + features[at].shape[0]))
                row += [token] * features[at].shape[0]
                at += 1
            else:
                row.append(t)
        rows.append(row)
    width = max(len(r) for r in rows)
    new_ids = ids.new_zeros(ids.shape[0], width)
    new_mask = torch.zeros(ids.shape[0], width, dtype=mask.dtype if mask is not None else torch.long,
                           device=ids.device)
    runs = []
    shift = [width - len(r) if left else 0 for r in rows]
    for i, r in enumerate(rows):
        new_ids[i, shift[i]:shift[i] + len(r)] = torch.tensor(r, dtype=ids.dtype, device=ids.device)
        new_mask[i, shift[i]:shift[i] + len(r)] = 1
    embeds = model.get_input_embeddings()(new_ids.masked_fill(new_ids == token, 0))
    for (i, start, end), feature in zip(spans, features):
        runs.append((i, start + shift[i], end + shift[i]))
        embeds[i, start + shift[i]:end + shift[i]] = feature.to(embeds.dtype)
    return embeds, new_mask, _positions(new_mask), new_ids, runs


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among the valid ones (1 at padding), as the model's own merge computes them."""
    return (mask.long().cumsum(-1) - 1).masked_fill_(mask == 0, 1)


def prepare(model: Any, cfg: Any, registry: Any, ids: torch.Tensor, mask: Optional[torch.Tensor],
            pixels: torch.Tensor, kwargs: Dict[str, Any]) -> tuple:
    """Encode (Stage 1), splice, and build Stage 3's layout: (inputs_embeds, attention_mask, position_ids,
    layout)."""
    features, crops = encode(model, cfg, registry, pixels, kwargs.get("image_sizes"), kwargs)
    embeds, mask, positions, spliced, runs = splice(model, ids, mask, features)
    layout = common.build_layout(model, cfg, spliced, mask, features, crops, runs)
    return embeds, mask, positions, layout


# Wrappers ------------------------------------------------------------------------------------------------------
def _decoder(model: Any, registry: Any) -> Any:
    """The language model's decoder (the module with the layers), its class made to run Stage 3."""
    decoder = model.language_model.get_decoder()
    patch_language_model(type(decoder), registry)
    return decoder


def wrap_forward(original: Any, registry: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    @percall.entry
    def forward(self, *args, **kwargs):
        cfg = pruning_config(self)
        if cfg is None:
            return original(self, *args, **kwargs)
        a = signature.bind(self, *args, **kwargs).arguments
        extra = a.pop("kwargs", {})
        call, mine = percall.current(), state()
        call.language_model, call.language_config = _decoder(self, registry), cfg
        layout, mine.layout = mine.layout, None  # generate's, for its prefill
        embeds, mine.embeds = mine.embeds, None
        if embeds is not None:  # generate's prefill: 4.44 passes the prompt's ids instead once a cache exists
            a.update(input_ids=None, inputs_embeds=embeds, pixel_values=None, position_ids=_positions(
                a["attention_mask"]))
        ids, pixels = a.get("input_ids"), a.get("pixel_values")
        if (layout is None and common.prunes(cfg) and ids is not None and pixels is not None
                and ids.shape[1] != 1 and a.get("inputs_embeds") is None):
            refuse_training(self, a.get("labels") is not None)
            if compat.past_length(a.get("past_key_values"), 0):
                raise NotImplementedError(
                    "meteor-plugin on transformers' LLaVA splices the pruned image itself: a forward with images "
                    "and a filled cache is not supported (generate runs the prefill without one)")
            embeds, mask, positions, layout = prepare(self, cfg, registry, ids, a.get("attention_mask"), pixels,
                                                      {**a, **extra})
            a.update(input_ids=None, inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                     pixel_values=None)
            if "image_sizes" in a:
                a["image_sizes"] = None
        call.layout = layout
        a.pop("self")
        return original(self, **a, **extra)

    return forward


def wrap_generate(original: Any, registry: Any) -> Any:
    signature = inspect.signature(original)

    @functools.wraps(original)
    @percall.entry
    def generate(self, *args, **kwargs):
        cfg = pruning_config(self)
        if cfg is None:
            return original(self, *args, **kwargs)
        refuse_beams(self, cfg, kwargs)
        a = signature.bind(self, *args, **kwargs).arguments
        extra = {**{k: v for k, v in a.items() if k not in ("self", "inputs", "kwargs")}, **a.get("kwargs", {})}
        prompt, pixels = a.get("inputs", extra.get("input_ids")), extra.get("pixel_values")
        if not common.prunes(cfg) or pixels is None or not torch.is_tensor(prompt):
            return original(self, *args, **kwargs)
        embeds, mask, _, layout = prepare(self, cfg, registry, prompt, extra.get("attention_mask"), pixels, extra)
        for name in ("pixel_values", "image_sizes", "position_ids"):
            extra.pop(name, None)
        # The user's prompt goes along as input_ids: the output starts with it, as unpruned generate's does, and
        # max_new_tokens counts from it; the model runs on the spliced embeddings.
        extra.update(input_ids=prompt, inputs_embeds=embeds, attention_mask=mask)
        mine = state()
        mine.layout, mine.embeds = layout, embeds
        try:
            return original(self, **extra)
        finally:
            mine.layout = mine.embeds = None

    return generate


def patch(registry: Any) -> List[type]:
    pruned = []
    for module_name, name, spatial in CLASSES:
        try:
            if importlib.util.find_spec(module_name) is None:
                continue
        except ModuleNotFoundError:  # its package is missing too (LLaVA-NeXT before 4.39)
            continue
        module = importlib.import_module(module_name)
        require(module, (name,), module_name)
        cls = getattr(module, name)
        require(cls, ("forward", "generate", "get_decoder") + (("pack_image_features",) if spatial else ()), name)
        if not registry.is_patched(cls, "generate"):
            registry.patch(cls, "forward", wrap_forward(cls.forward, registry))
            registry.patch(cls, "generate", wrap_generate(cls.generate, registry))
        pruned.append(cls)
    return pruned
