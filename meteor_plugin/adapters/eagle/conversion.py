"""METEOR's post-projection fusion for EAGLE: each encoder gets its own projector (``mm_projectors``), split
from the shared one by its input columns, and recorded in ``config.meteor_fusion``.

- on a loaded model (``convert_to_post_projection``; training splits it in ``training.py``);
- on a checkpoint's files (``convert_weights``: ``meteor-plugin convert``; ``checkpoint_files`` reads the shared
  projector and writes only the new ones);
- when a converted checkpoint loads: ``EagleLlamaModel.__init__`` builds empty per-encoder projectors, which
  ``from_pretrained`` fills (``wrap_llm_init``; installed by ``enable()``, or for one load by ``loading``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch

from ... import checkpoint_files
from ...registry import REGISTRY, PatchRegistry
from ...stages.fusion import empty_projectors, split_projector
from .encoders import (ENCODER_CHANNELS, FUSION_KEY, KNOWN_ENCODERS, MODEL_MODULE, FusionConfigError, encoder_names,
                       is_converted, tower_channels)

SHARED = "model.mm_projector."
PER_ENCODER = "model.mm_projectors."


def fusion_record(encoders: Sequence[str], channels: Sequence[int], projector_type: str) -> Dict[str, Any]:
    """What ``config.meteor_fusion`` holds for a converted model (``wrap_llm_init`` rebuilds from it)."""
    return {"mode": "post_projection", "encoders": list(encoders), "channels": [int(c) for c in channels],
            "projector_type": projector_type}


def convert_to_post_projection(model: Any, source: Any = None) -> None:
    """Give a loaded EAGLE model per-encoder projectors split from its shared one (in place).

    Records the conversion in ``model.config.meteor_fusion`` so that a saved checkpoint rebuilds them
    when it is loaded with the plugin enabled. ``source`` is the module to split when it is not the
    model's own ``mm_projector`` (training passes a gathered copy of a ZeRO-3-partitioned one).
    """
    llm = model.get_model()
    if is_converted(model):
        raise FusionConfigError("this model already has per-encoder projectors (mm_projectors): it was converted")
    channels = tower_channels(model)
    llm.mm_projectors = split_projector(llm.mm_projector if source is None else source, channels)
    setattr(model.config, FUSION_KEY, fusion_record(
        encoder_names(model), channels, getattr(model.config, "mm_projector_type", "linear")))


def built_tower_channels(config_fields: Dict[str, Any]) -> List[int]:
    """The channels of each tower the installed ``eagle`` package builds from a checkpoint's config
    (ImportError without one): for encoders whose sizes are not EAGLE's own."""
    from eagle.model.multimodal_encoder.builder import build_vision_tower

    config_class = getattr(importlib.import_module(MODEL_MODULE), "EagleConfig")
    tower = build_vision_tower(config_class(**config_fields))
    return [int(t.hidden_size) for t in tower.vision_towers]


def wrap_llm_init(original: Any) -> Any:
    """``EagleLlamaModel.__init__``: build the per-encoder projectors of a converted checkpoint, so that
    ``from_pretrained`` fills them from the saved weights like any other module."""
    @functools.wraps(original)
    def __init__(self, config, *args, **kwargs):
        original(self, config, *args, **kwargs)
        spec = getattr(config, FUSION_KEY, None)
        if spec and getattr(self, "mm_projector", None) is not None:
            self.mm_projectors = empty_projectors(spec["channels"], config.hidden_size, spec["projector_type"])

    return __init__


@contextlib.contextmanager
def loading(model_config: Dict[str, Any]) -> Iterator[None]:
    """``TRAINING.loading``: around loading a checkpoint (upstream's loader, or ``from_pretrained``), a converted
    one is built with its per-encoder projectors, so that the saved weights fill them. Only
    ``EagleLlamaModel.__init__`` is wrapped, for the duration (nothing is pruned); when the plugin is enabled it
    is wrapped already."""
    if not model_config.get(FUSION_KEY):
        yield
        return
    from eagle.model.language_model.eagle_llama import EagleLlamaModel

    if REGISTRY.is_patched(EagleLlamaModel, "__init__"):
        yield
        return
    local = PatchRegistry()
    local.patch(EagleLlamaModel, "__init__", wrap_llm_init(EagleLlamaModel.__init__))
    try:
        yield
    finally:
        local.restore_all()


def encoders_and_channels(model_config: Dict[str, Any], folder: str = "") -> Tuple[List[str], List[int]]:
    """The encoders a checkpoint's config builds (in fusion order) and the channels each contributes.

    EAGLE's own encoders have known widths; when they do not add up to ``mm_hidden_size`` (other sizes,
    such as the tests' tiny stand-in), the installed ``eagle`` package builds the towers to measure them.
    """
    names = [n for n in str(model_config.get("mm_vision_tower") or "").split(";") if n in KNOWN_ENCODERS]
    if not names:
        raise FusionConfigError(
            f"{folder or 'this checkpoint'}: mm_vision_tower={model_config.get('mm_vision_tower')!r} names none of "
            f"EAGLE's encoders ({', '.join(KNOWN_ENCODERS)}): not a multi-encoder EAGLE checkpoint"
        )
    hidden = int(model_config.get("mm_hidden_size") or 0)
    channels = [ENCODER_CHANNELS[n] for n in names]
    if sum(channels) == hidden:
        return names, channels
    fields = {k: v for k, v in model_config.items() if k not in ("architectures", "model_type", "transformers_version")}
    try:
        built = built_tower_channels(fields)
    except ImportError as exc:
        raise FusionConfigError(
            f"{folder or 'this checkpoint'}: its encoders {names} would give {sum(channels)} channels with EAGLE's "
            f"sizes, but mm_hidden_size is {hidden}; telling how its channels split needs the towers built: run "
            f"from the root of the EAGLE checkout that trained it ({exc})"
        ) from None
    if sum(built) != hidden or len(built) != len(names):
        raise FusionConfigError(f"{folder}: the towers built from its config give channels {built}, which do not "
                                f"match its {len(names)} encoders and mm_hidden_size {hidden}")
    return names, built


def shared_projector(state: Dict[str, torch.Tensor], projector_type: str, in_features: int,
                     hidden: int) -> torch.nn.Module:
    """The shared projector as upstream builds it, holding ``state`` (its tensors without the prefix)."""
    module = empty_projectors([in_features], hidden, projector_type)[0]  # Sequential, even for "linear"
    if projector_type == "linear":
        module = module[0]  # upstream's "linear" projector is a bare Linear
    dtype = next(iter(state.values())).dtype
    module.to(dtype)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FusionConfigError(f"the checkpoint's mm_projector does not have the shape of a {projector_type!r} "
                                f"projector: missing {missing}, unexpected {unexpected}")
    return module


def convert_weights(job: Any) -> None:
    """``TRAINING.convert_weights`` (``meteor-plugin convert``): add per-encoder projectors to the copied checkpoint.
    The split is done on the checkpoint's tensors: only the shared projector is read and only the new projectors
    are written, so EAGLE need not be importable and its towers (hub downloads, a local EVA file) are never built."""
    config = job.model_config
    if config.get(FUSION_KEY):
        raise FusionConfigError(f"{job.source} already records per-encoder projectors ({FUSION_KEY} in config.json)")
    files = checkpoint_files.weight_files(job.folder)
    if any(k.startswith(PER_ENCODER) for k in files.weight_map):
        raise FusionConfigError(f"{job.source} already holds per-encoder projector weights ({PER_ENCODER}*)")
    keys = [k for k in files.weight_map if k.startswith(SHARED)]
    if not keys:
        raise FusionConfigError(f"{job.source} has no {SHARED}* weights: not a checkpoint with EAGLE's projector")
    names, channels = encoders_and_channels(config, job.source)
    projector_type = config.get("mm_projector_type", "linear")
    state = {k[len(SHARED):]: v for k, v in checkpoint_files.read_tensors(files, keys).items()}
    shared = shared_projector(state, projector_type, int(config["mm_hidden_size"]), int(config["hidden_size"]))
    projectors = split_projector(shared, channels)
    checkpoint_files.add_tensors(files, {PER_ENCODER + k: v for k, v in projectors.state_dict().items()})
    config[FUSION_KEY] = fusion_record(names, channels, projector_type)
