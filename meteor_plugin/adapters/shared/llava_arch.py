"""The wrappers the llava package's and EAGLE's adapters share (their ``*_arch.py`` is one design).

EAGLE's ``eagle_arch.py`` / ``eagle_llama.py`` are line-for-line copies of LLaVA's ``llava_arch.py`` /
``llava_llama.py`` with other class names, so one set of wrappers serves both; each adapter module only
says which classes to wrap. The wrappers:

- ``encode_images``: records how many tokens each image became;
- ``prepare_inputs_labels_for_multimodal``: after upstream splices the image features into the text,
  works out where they landed (a ``VisualLayout``) and hands it to the language model's next forward
  (through the call, or, when the caller called it directly, with the ``inputs_embeds`` it returns);
- ``forward``: in training, computes the loss on labels compacted like the hidden states;
- ``generate``: marks the generate call, refuses beam search with Stage 3;
- the inner ``LlamaModel.forward``: runs Stage 3 (``stages/decoder.py``).
All of them keep what they pass on in the call's ``percall.MeteorCall``, never on the model.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ... import percall
from ...compat import transformers as compat
from ...runtime import pruning_config
from ...stages import proportional
from ...stages.decoder import wrap_model_forward
from ...stages.layout import IGNORE_INDEX, VisualLayout, identity_geometry, query_mask, unpruned_geometry
from ...stages.vision import VisionRecord
from ...stats import RunStats, StageCount
from ..family import IMAGE_TOKEN_INDEX, StructureError, require
from . import anyres

_DROPPABLE_KWARGS = ("cache_position", "logits_to_keep", "num_logits_to_keep")
# Vision tower class -> encode_images(model, images, config, record, original) running Stages 1 and 2: filled by
# each family's vision patch (``ArchTarget.vision``), read by the ``encode_images`` wrapper.
VISION_HANDLERS: Dict[type, Any] = {}


# Where the image tokens landed ---------------------------------------------------------------------------
def _image_token_counts(model: Any, images: Any, n_features: Optional[int]) -> Optional[List[int]]:
    """Tokens each image became in the spliced sequence, in the order upstream consumes them."""
    if n_features is None:
        return None
    merge = getattr(model.config, "mm_patch_merge_type", "flat")
    if torch.is_tensor(images) and images.dim() == 4:
        return [n_features] * images.shape[0]
    if torch.is_tensor(images) and images.dim() == 5:
        crops = [images.shape[1]] * images.shape[0]
    elif isinstance(images, (list, tuple)):
        crops = [1 if x.dim() == 3 else x.shape[0] for x in images]
    else:
        return None
    if merge != "flat":
        return None  # spatial merges add newline tokens and unpad: derive lengths from the output instead
    return [c * n_features for c in crops]


def locate_visual_tokens(model: Any, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                         images: Any, n_features: Optional[int], out_embeds: torch.Tensor,
                         out_mask: Optional[torch.Tensor]) -> tuple:
    """(visual, valid, owners): masks of shape (B, L), and the sample that used each image (None for the
    dummy image a text-only sample consumes) for the sequence ``prepare_inputs_labels_for_multimodal`` built.

    Follows upstream's documented splice: padding removed, each ``IMAGE_TOKEN_INDEX`` replaced by that
    image's tokens (a sample without one still consumes an image), truncation at
    ``tokenizer_model_max_length``, re-padding on ``tokenizer_padding_side``. The result is checked
    against the lengths upstream produced; a mismatch is an error, never a guess.
    """
    b, length = out_embeds.shape[:2]
    device = out_embeds.device
    counts = _image_token_counts(model, images, n_features)
    max_len = getattr(model.config, "tokenizer_model_max_length", None)
    left = getattr(model.config, "tokenizer_padding_side", "right") == "left"
    in_mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
    visual = torch.zeros(b, length, dtype=torch.bool, device=device)
    valid = torch.zeros(b, length, dtype=torch.bool, device=device)
    image_idx = 0
    owners: List[Optional[int]] = []
    for i in range(b):
        ids = input_ids[i][in_mask[i]]
        marks = torch.nonzero(ids == IMAGE_TOKEN_INDEX).flatten().tolist()
        if not marks:
            image_idx += 1
            owners.append(None)
            spans, total = [], ids.shape[0]
        else:
            if counts is not None:
                sizes = counts[image_idx:image_idx + len(marks)]
            elif len(marks) == 1 and (out_mask is not None or b == 1):
                produced = int(out_mask[i].sum()) if out_mask is not None else length
                sizes = [produced - (ids.shape[0] - 1)]
            else:
                raise StructureError(
                    "meteor-plugin cannot tell how many tokens each image became with "
                    f"mm_patch_merge_type={getattr(model.config, 'mm_patch_merge_type', None)!r} and several "
                    "images per sample; use one image per sample or the 'flat' merge"
                )
            image_idx += len(marks)
            owners.extend([i] * len(marks))
            spans, shift = [], 0
            for pos, size in zip(marks, sizes):
                start = pos + shift
                spans.append((start, start + size))
                shift += size - 1
            total = ids.shape[0] + shift
        if max_len is not None:
            total = min(total, int(max_len))
        offset = length - total if left else 0
        valid[i, offset:offset + total] = True
        for start, end in spans:
            end = min(end, total)
            if end > start:
                visual[i, offset + start:offset + end] = True
    expected = valid.sum(dim=1)
    produced = out_mask.bool().sum(dim=1) if out_mask is not None else None
    if (produced is not None and not torch.equal(expected.to(produced.device), produced)) or int(expected.max()) != length:
        raise StructureError(
            "meteor-plugin could not locate the image tokens: it expected sequence lengths "
            f"{expected.tolist()} but the model built {produced.tolist() if produced is not None else length}. "
            "prepare_inputs_labels_for_multimodal does not splice images the way LLaVA/EAGLE do"
        )
    return visual, valid, owners


def vision_stats(record: Optional[VisionRecord], owners: List[Optional[int]], batch: int) -> RunStats:
    """Per-sample stats from the per-image records of Stages 1 and 2 (summed over a sample's images)."""
    stats = RunStats(batch)
    if record is None:
        return stats
    for name, rec in record.stages.items():
        for image, owner in enumerate(owners[:len(rec.entered)]):
            if owner is None:
                continue  # the dummy image a text-only sample consumes
            count = stats.stages[owner].get(name)
            if count is None:
                stats.stages[owner][name] = StageCount(rec.entered[image], rec.left[image],
                                                       {"kept": rec.kept[image], **rec.detail[image]})
            else:
                count.entered += rec.entered[image]
                count.left += rec.left[image]
                count.detail.setdefault("more_images", []).append({"kept": rec.kept[image], **rec.detail[image]})
    return stats


def spatial_stats(model: Any, stats: RunStats, record: Optional[VisionRecord], owners: List[Optional[int]],
                  visual: torch.Tensor, newlines: Optional[torch.Tensor]) -> None:
    """Per sample of a spatial merge: the visual tokens from the base image and from the crops (after
    Stage 1 and upstream's unpad), and the row separators, as the ``anyres`` entry of its stats."""
    tower = model.get_model().get_vision_tower()
    stages = record.stages if record is not None else {}
    encoder = stages.get("encoder") or stages.get("baseline")  # what each CLIP input kept before the merge
    for i in range(visual.shape[0]):
        first = next((j for j, owner in enumerate(owners) if owner == i), None)
        if first is None:
            continue
        base = encoder.left[first] if encoder is not None else int(tower.num_patches)
        total = int(visual[i].sum())
        rows = int(newlines[i].sum()) if newlines is not None else 0
        made = sum(1 for owner in owners if owner == i) * int(tower.num_patches)
        stats.stages[i]["anyres"] = StageCount(made, total, {"base": base, "crops": total - base, "newlines": rows})


# Wrappers ----------------------------------------------------------------------------------------------------
def wrap_encode_images(original: Any) -> Any:
    @functools.wraps(original)
    @percall.entry
    def encode_images(self, images, *args, **kwargs):
        cfg = pruning_config(self)
        if cfg is None:
            return original(self, images, *args, **kwargs)
        call = percall.current()
        record = VisionRecord()
        call.vision = record
        tower = self.get_model().get_vision_tower()
        handler = VISION_HANDLERS.get(type(tower))
        if handler is not None:
            features = handler(self, images, cfg, record, original)
        elif cfg.encoder or (cfg.fusion and _multi_encoder(tower)):
            raise NotImplementedError(
                f"meteor-plugin Stages 1-2 do not know the vision tower {type(tower).__name__}; "
                "set encoder=False (and fusion=False) to run without them"
            )
        else:
            features = original(self, images, *args, **kwargs)
        call.features = features.shape[1] if torch.is_tensor(features) and features.dim() == 3 else None
        return features

    return encode_images


def _multi_encoder(tower: Any) -> bool:
    return hasattr(tower, "vision_towers")


def wrap_prepare(original: Any) -> Any:
    signature = inspect.signature(original)

    def splice(call: percall.MeteorCall, self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        a = bound.arguments
        call.features = call.vision = None
        out = original(self, *args, **kwargs)
        call.layout = None
        if out[4] is None:  # decoding step or no images: nothing spliced
            return out
        spatial = anyres.is_spatial(self)
        if spatial:  # Stage 1's pruned patches went through upstream's grid merge as NaN rows
            out, _ = anyres.drop_pruned_rows(self, out)
        embeds = out[4]
        cfg = pruning_config(self)
        visual, valid, owners = locate_visual_tokens(
            self, a["input_ids"], a.get("attention_mask"), a.get("images"), call.features, embeds, out[2],
        )
        labels = out[5]
        check_supervised(self, a.get("labels"), labels, embeds)
        newlines = anyres.newline_rows(self, embeds) if spatial else None
        image = visual
        if newlines is not None:  # row separators: structure that Stage 3 keeps, not content it scores
            newlines = newlines & visual
            visual = visual & ~newlines
        crops = anyres.crops_per_image(a.get("images")) if spatial else None
        if crops is not None:  # the vision records are per CLIP input: base image and crops
            owners = [owner for owner, n in zip(owners, crops) for _ in range(n)]
        stats = vision_stats(call.vision, owners, visual.shape[0])
        if crops is not None:
            spatial_stats(self, stats, call.vision, owners, visual, newlines)
        layout = VisualLayout(
            visual=visual, valid=valid, stats=stats, query=query_mask(image, valid, labels, cfg.text_query),
        )
        if call.vision is not None and call.vision.tokens:  # recorded under proportional attention
            layout.positions, layout.key_bias = unpruned_geometry(visual, valid, owners, call.vision.tokens)
        elif cfg.llm and proportional.wanted(cfg) and not _pruned_before_llm(call.vision):
            # Stage 3 alone: every token (row separators too) at its own place, with size 1
            layout.positions, layout.key_bias = identity_geometry(valid)
        call.features = call.vision = None
        if call.defer_labels and labels is not None:
            layout.labels = labels
            out = tuple(out[:5]) + (None,)
        call.layout = layout
        return out

    @functools.wraps(original)
    def prepare(self, *args, **kwargs):
        if pruning_config(self) is None:
            return original(self, *args, **kwargs)
        call = percall.current()
        if call is not None:
            return splice(call, self, *args, **kwargs)
        # Called directly: the caller's forward(inputs_embeds=...) is a call of its own; the layout goes
        # with the embeddings it returns.
        with percall.new_call() as call:
            out = splice(call, self, *args, **kwargs)
        if call.layout is not None:
            percall.hand_over(out[4], call.layout)
        return out

    return prepare


def _pruned_before_llm(record: Optional[VisionRecord]) -> bool:
    """Whether any vision-side stage dropped tokens in this call (then only what it recorded can place them)."""
    if record is None:
        return False
    return any(left < entered for rec in record.stages.values() for left, entered in zip(rec.left, rec.entered))


class AllLabelsMaskedError(RuntimeError):
    """A training batch reaches the language model with every label masked: it would learn nothing."""


def check_supervised(model: Any, given: Any, spliced: Any, embeds: torch.Tensor) -> None:
    """Refuse a training batch whose labels are all ``IGNORE_INDEX`` once the image features are spliced in: the
    loss would be 0 with a zero gradient at every step, and the run would end "successfully" having learned
    nothing. The usual cause is ``--model_max_length`` below the visual tokens plus the text: upstream cuts
    every sequence to it after the splice, answers first."""
    if not (getattr(model, "training", False) and torch.is_grad_enabled()):
        return  # labels in an evaluation forward also mark answer tokens (Stage 3's query skips them)
    if given is None or spliced is None or bool((spliced != IGNORE_INDEX).any()):
        return
    limit = getattr(getattr(model, "config", None), "tokenizer_model_max_length", None)
    before = "had answer tokens before the image features were spliced in" if bool((given != IGNORE_INDEX).any()) \
        else "has no answer tokens at all"
    raise AllLabelsMaskedError(
        f"meteor-plugin: every label of this batch is masked (IGNORE_INDEX): it {before}, and reaches the model "
        f"as {embeds.shape[1]} positions (tokenizer_model_max_length={limit}). Training on it learns nothing "
        "(loss 0, zero gradient). Raise --model_max_length above the visual tokens per image plus the text, "
        "or check the data's conversations."
    )


def wrap_causal_forward(original: Any) -> Any:
    signature = inspect.signature(original)
    accepted = compat.accepted_kwargs(original)

    @functools.wraps(original)
    @percall.entry
    def forward(self, *args, **kwargs):
        if accepted is not None:  # LLaVA's forward has no **kwargs: newer generate passes these
            for name in _DROPPABLE_KWARGS:
                if name not in accepted:
                    kwargs.pop(name, None)
        cfg = pruning_config(self)
        if cfg is None:
            return original(self, *args, **kwargs)
        call = percall.current()
        bound = signature.bind(self, *args, **kwargs)
        embeds = bound.arguments.get("inputs_embeds")
        call.embeds_from_elsewhere = False
        if not call.in_generate:
            call.layout = None
            if embeds is not None:  # spliced by a direct call of prepare_inputs_labels_for_multimodal?
                call.layout = percall.handed_over(embeds)
                call.embeds_from_elsewhere = call.layout is None
        labels = bound.arguments.get("labels")
        if not cfg.llm or labels is None:
            return original(self, *args, **kwargs)
        # Stage 3 shortens the sequence inside the model: take the loss here, on compacted labels.
        # With images, prepare_inputs_labels_for_multimodal expands the labels and (deferred) hands them
        # to the layout instead of the model; with ready-made embeddings the labels are held back here.
        direct = embeds is not None
        if direct:
            bound.arguments["labels"] = None
        call.defer_labels = True
        try:
            out = original(*bound.args, **bound.kwargs)
        finally:
            call.defer_labels = False
        pruner = call.decoder
        plan = pruner.plan if pruner is not None else None
        if direct:
            full = labels
        elif plan is not None and plan.layout is not None and plan.layout.labels is not None:
            full = plan.layout.labels
        else:
            return out  # no images were spliced: upstream computed the loss on the uncompacted sequence
        as_tuple = isinstance(out, tuple)
        logits = out[0] if as_tuple else out.logits
        compacted = pruner.compact_labels(full) if pruner is not None else full
        if compacted.shape[1] != logits.shape[1]:
            raise RuntimeError(
                f"meteor-plugin: labels of length {compacted.shape[1]} do not match logits of length {logits.shape[1]}"
            )
        loss = compat.causal_lm_loss(self, logits, compacted)
        if as_tuple:
            return (loss,) + tuple(out)
        return type(out)(loss=loss, **{k: v for k, v in out.items() if k != "loss"})

    return forward


def wrap_generate(original: Any) -> Any:
    @functools.wraps(original)
    @percall.entry
    def generate(self, *args, **kwargs):
        cfg = pruning_config(self)
        if cfg is None:
            return original(self, *args, **kwargs)
        if cfg.llm:
            gen_cfg = kwargs.get("generation_config") or getattr(self, "generation_config", None)
            beams = kwargs.get("num_beams", getattr(gen_cfg, "num_beams", 1)) or 1
            if beams > 1:
                raise NotImplementedError(
                    f"meteor-plugin Stage 3 does not support beam search (num_beams={beams}); "
                    "use num_beams=1 or enable(..., llm=False)"
                )
        mask = kwargs.get("attention_mask")
        if (mask is not None and mask.shape[0] > 1 and not bool(mask.bool().all())
                and getattr(self.config, "tokenizer_padding_side", "right") != "left"):
            warnings.warn(
                "batched generate with padding needs config.tokenizer_padding_side='left': LLaVA/EAGLE re-pad "
                "the spliced sequence on that side, and right padding makes generate read logits of padding",
                stacklevel=2,
            )
        call = percall.current()
        call.layout, call.in_generate = None, True
        try:
            return original(self, *args, **kwargs)
        finally:
            call.layout, call.in_generate = None, False

    return generate


def patch_family(registry: Any, causal_cls: type, llm_cls: type) -> None:
    """Wrap the methods of one LLaVA-family model (its CausalLM class and inner LlamaModel class)."""
    require(causal_cls, ("get_model", "encode_images", "prepare_inputs_labels_for_multimodal", "forward", "generate"),
            causal_cls.__name__)
    require(llm_cls, ("forward",), llm_cls.__name__)
    wrappers = (
        (causal_cls, "encode_images", wrap_encode_images),
        (causal_cls, "prepare_inputs_labels_for_multimodal", wrap_prepare),
        (causal_cls, "forward", wrap_causal_forward),
        (causal_cls, "generate", wrap_generate),
    )
    for owner, name, make in wrappers:
        if not registry.is_patched(owner, name):
            registry.patch(owner, name, make(getattr(owner, name)))
    if not registry.is_patched(llm_cls, "forward"):
        registry.patch(llm_cls, "forward", wrap_model_forward(llm_cls.forward, registry, pruning_config))


class ArchTarget:
    """What ``enable()`` patches in a codebase built on LLaVA's ``*_arch.py``: its model module and classes.

    ``variants`` are the codebase's other (module, causal class, inner model class) triples built on the
    same ``*_arch.py`` with another language model (LLaVA's Mistral one): patched alike when their module
    is there. Its ``refused`` classes are named in the error a forward of theirs raises while enabled.
    """

    def __init__(self, name: str, module: str, causal: str, llm: str, vision: Sequence[Any] = (),
                 variants: Sequence[tuple] = (), refused: Optional[dict] = None,
                 encoders: Optional[Callable[[Any], list]] = None, support: Optional[Callable[[Any], Any]] = None):
        self.name = name
        self.module = module
        self.causal = causal
        self.llm = llm
        self.vision = tuple(vision)  # functions(registry) that patch this codebase's vision towers
        self.variants = tuple(variants)
        self.refused = dict(refused or {})  # class name -> why it is not pruned
        self._encoders = encoders  # model -> its vision encoders as stages.vision.EncoderParts
        self._support = support  # model -> what it runs (adapters.support.Support)

    @staticmethod
    def _has_file(module: str) -> bool:
        import importlib.util
        import os

        package = module.split(".")[0]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            return False
        relative = os.path.join(*module.split(".")[1:]) + ".py"
        return any(os.path.isfile(os.path.join(p, relative)) for p in spec.submodule_search_locations)

    def is_installed(self) -> bool:
        """True if the package holds this codebase's model file (found without importing it)."""
        return self._has_file(self.module)

    @staticmethod
    def _load(module_name: str, causal: str, llm: str) -> tuple:
        import importlib

        # Import the model module itself: LLaVA's model/__init__.py hides import errors behind a bare except.
        module = importlib.import_module(module_name)
        require(module, (causal, llm), module_name)
        return getattr(module, causal), getattr(module, llm)

    def classes(self) -> tuple:
        """(causal class, inner model class) of the codebase's main model file."""
        return self._load(self.module, self.causal, self.llm)

    def all_classes(self) -> List[tuple]:
        """Every (causal, inner) pair this target prunes that is installed: the main one, then the variants."""
        pairs = [self.classes()]
        pairs += [self._load(*variant) for variant in self.variants if self._has_file(variant[0])]
        return pairs

    def encoders(self, model: Any) -> Optional[list]:
        """``model``'s vision encoders (``stages.vision.EncoderParts``), or None if it is not of this codebase."""
        if self._encoders is None or not self.is_installed():
            return None
        if not any(isinstance(model, causal) for causal, _ in self.all_classes()):
            return None
        return self._encoders(model)

    def open(self, path: str, config: dict) -> Optional[tuple]:
        """Its checkpoints load through the codebase's own loader (the family's ``TrainingSpec``): not here."""
        return None

    def prompt(self, model: Any, tokenizer: Any, image: Any, question: str, conv_mode: str = "llava_v1") -> dict:
        """The inputs of ``model.generate`` (and ``model``) asking ``question`` about the PIL ``image``, as the
        codebase's own eval scripts build them: its conversation template ``conv_mode`` with ``<image>`` before the
        question, and its ``process_images`` (pad, anyres) on the image."""
        import importlib

        package = self.module.split(".")[0]
        conversation = importlib.import_module(f"{package}.conversation")
        utils = importlib.import_module(f"{package}.mm_utils")
        if conv_mode not in conversation.conv_templates:
            raise ValueError(f"conv_mode={conv_mode!r} is not one of {package}'s conversation templates: "
                             f"{', '.join(sorted(conversation.conv_templates))}")
        conv = conversation.conv_templates[conv_mode].copy()
        conv.append_message(conv.roles[0], "<image>\n" + question)
        conv.append_message(conv.roles[1], None)
        before, after = conv.get_prompt().split("<image>")
        ids = tokenizer(before).input_ids + [IMAGE_TOKEN_INDEX] + tokenizer(after, add_special_tokens=False).input_ids
        tower = model.get_model().get_vision_tower()
        param = next(model.parameters())
        pixels = utils.process_images([image], tower.image_processor, model.config)
        pixels = pixels.to(device=param.device, dtype=param.dtype) if torch.is_tensor(pixels) else \
            [p.to(device=param.device, dtype=param.dtype) for p in pixels]
        inputs = {"input_ids": torch.tensor([ids], device=param.device), "images": pixels}
        if str(getattr(model.config, "image_aspect_ratio", "")).startswith("anyres"):
            inputs["image_sizes"] = [image.size]
        return inputs

    def support(self, model: Any) -> Any:
        """What ``model`` runs: its methods and stages (``adapters.support.Support``)."""
        return self._support(model)

    def patch(self, registry: Any) -> List[type]:
        """Patch every installed class pair and the vision towers; returns the causal classes now pruned."""
        pairs = self.all_classes()
        for causal, llm in pairs:
            patch_family(registry, causal, llm)
        for patch_vision in self.vision:
            patch_vision(registry)
        return [causal for causal, _ in pairs]
