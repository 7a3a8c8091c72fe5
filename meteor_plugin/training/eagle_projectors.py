"""EAGLE's per-encoder projectors (METEOR's Stage 2) where training and conversion need them.

METEOR fuses EAGLE's encoders after projection: each encoder gets its own projector (``mm_projectors``),
split from the shared one by ``adapters.eagle.convert_to_post_projection`` and recorded in
``config.meteor_fusion``, from which the plugin rebuilds them when a checkpoint loads. Three places need
them besides inference, each registered as a hook of ``adapters.eagle.TRAINING``:

- ``convert_weights`` (``meteor-plugin convert``): the split is done on the checkpoint's tensors: only the
  shared projector is read and only the new projectors are written (``checkpoint_files.py``), so EAGLE
  need not be importable and its towers (hub downloads, a local EVA file) are never built;
- ``before_training`` (``python -m meteor_plugin.train`` from an unconverted checkpoint): the model is split
  in place before the Trainer exists. Under ZeRO-3 the shared projector is partitioned (each rank holds a
  slice, ``.data`` is empty): it is gathered for the split, and the new projectors, which ``zero.Init``
  never saw, are partitioned the way DeepSpeed converts late parameters. Their names contain
  ``mm_projector``, so upstream's projector learning rate, the LoRA exclusion and ``non_lora_trainables.bin``
  treat them as projectors. They are trained exactly when upstream trains the shared projector;
- ``projectors_on_load`` (``meteor-plugin merge-lora``): a converted checkpoint only has ``mm_projectors``
  when it is loaded with the plugin enabled.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Dict, Iterator, List, Tuple

import torch

from ..stages.fusion import empty_projectors, split_projector
from ..adapters import eagle
from ..adapters.eagle import ENCODER_CHANNELS, FUSION_KEY, KNOWN_ENCODERS, FusionConfigError
from . import checkpoint_files

# The split each model got when training started (model -> counts), kept beside the model, not on it.
SPLIT_IN_TRAINING: "weakref.WeakKeyDictionary[Any, Dict[str, int]]" = weakref.WeakKeyDictionary()

SHARED = "model.mm_projector."
PER_ENCODER = "model.mm_projectors."

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
        built = eagle.built_tower_channels(fields)
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


# meteor-plugin convert ------------------------------------------------------------------------------------
def convert_weights(job: Any) -> None:
    """``adapters.eagle.TRAINING.convert_weights``: add per-encoder projectors to the copied checkpoint."""
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
    config[FUSION_KEY] = eagle.fusion_record(names, channels, projector_type)


# python -m meteor_plugin.train ------------------------------------------------------------------------------
def _zero3_params(module: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def _gathered_copy(shared: torch.nn.Module, projector_type: str) -> torch.nn.Module:
    """A plain module with the shared projector's full weights (gathered from the ranks under ZeRO-3;
    ``copy.deepcopy`` of a partitioned module would copy its ZeRO bookkeeping too)."""
    partitioned = _zero3_params(shared)
    context = contextlib.nullcontext()
    if partitioned:
        from deepspeed import zero

        context = zero.GatheredParameters(partitioned)
    with context:
        state = {k: v.detach().clone() for k, v in shared.state_dict().items()}
        device = next(shared.parameters()).device
    first = state.get("weight", state.get("0.weight"))
    plain = shared_projector(state, projector_type, first.shape[1], first.shape[0])
    return plain.to(device)


def _trained_like_the_shared_one(llm: Any) -> None:
    """Per-encoder projectors train exactly when upstream train() trains the shared one (LoRA re-enables it,
    --tune_mm_mlp_adapter makes it the only trained module, --freeze_mm_mlp_adapter freezes it)."""
    trained = any(p.requires_grad for p in llm.mm_projector.parameters())
    for p in llm.mm_projectors.parameters():
        p.requires_grad_(trained)


def split_for_training(model: Any) -> Dict[str, int]:
    """Split ``model``'s shared projector into per-encoder ones in place; returns what was done."""
    llm = model.get_model()
    shared = llm.mm_projector
    partitioned = _zero3_params(shared)
    projector_type = getattr(model.config, "mm_projector_type", "linear")
    eagle.convert_to_post_projection(model, source=_gathered_copy(shared, projector_type))
    new = list(llm.mm_projectors.parameters())
    _trained_like_the_shared_one(llm)
    if partitioned:
        # As DeepSpeed's engine does with parameters created after zero.Init: partition them the same way
        # (rank 0's values are broadcast first; every rank computed the same split).
        partitioned[0].convert_to_zero_parameters(param_list=new)
    return {"gathered": len(partitioned), "partitioned": len(new) if partitioned else 0, "created": len(new)}


def before_training(model: Any, training_args: Any) -> None:
    """``adapters.eagle.TRAINING.before_training``: METEOR trains EAGLE with post-projection fusion."""
    from ..runtime import ACTIVE, config_for
    from .deepspeed import rank
    from .trainer import bare_model

    bare = bare_model(model)
    recorded = getattr(bare.config, FUSION_KEY, None)
    if not ACTIVE.enabled:
        if recorded:
            raise SystemExit(
                "meteor_plugin.train --meteor-off: this checkpoint was converted to per-encoder projectors, which "
                "plain EAGLE training would neither use nor save (the result would claim projectors it lacks). "
                "Train the unconverted checkpoint for a baseline, or drop --meteor-off"
            )
        return
    if eagle.is_converted(bare):
        _trained_like_the_shared_one(bare.get_model())
        return
    if recorded:
        eagle.resolve_mode(bare, config_for(bare))  # raises: recorded but not built
    if config_for(bare).fusion_mode == "training_free":
        return  # the user asked for EAGLE's channel concatenation
    done = split_for_training(bare)
    SPLIT_IN_TRAINING[bare] = done  # what the tests' probe reports
    if rank() == 0:
        zero = f", ZeRO-3: {done['gathered']} gathered, {done['partitioned']} partitioned" if done["gathered"] else ""
        print(f"meteor-plugin: the checkpoint has no per-encoder projectors: split {done['created']} tensors from "
              f"the shared projector for training (the saved model records them){zero}", flush=True)


# meteor-plugin merge-lora -----------------------------------------------------------------------------------
@contextlib.contextmanager
def projectors_on_load(model_config: Dict[str, Any]) -> Iterator[None]:
    """Load a converted checkpoint with its per-encoder projectors: the plugin builds them at load time,
    so it is enabled (with the checkpoint's own config) for the duration when it is not already."""
    from ..runtime import ACTIVE

    if not model_config.get(FUSION_KEY) or ACTIVE.enabled:
        yield
        return
    import meteor_plugin

    meteor_plugin.enable()
    try:
        yield
    finally:
        meteor_plugin.disable()
