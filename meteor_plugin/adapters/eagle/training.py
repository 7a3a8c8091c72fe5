"""What training, conversion, merging and calibration need of EAGLE (``TRAINING``): its root ``train.py`` and
Trainer, the ``eagleConfig`` alias its LoRA loader imports, and Stage 2's per-encoder projectors made before
training when the checkpoint has none.

``python -m meteor_plugin.train`` from an unconverted checkpoint splits the model's shared projector in place
before the Trainer exists (``before_training``). Under ZeRO-3 the shared projector is partitioned (each rank holds
a slice, ``.data`` is empty): it is gathered for the split, and the new projectors, which ``zero.Init`` never saw,
are partitioned the way DeepSpeed converts late parameters. Their names contain ``mm_projector``, so upstream's
projector learning rate, the LoRA exclusion and ``non_lora_trainables.bin`` treat them as projectors. They are
trained exactly when upstream trains the shared projector.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import weakref
from typing import Any, Dict, Optional

import torch

from ...distributed import gathered, partition_like, rank, zero3_params
from ...registry import TRAINING_REGISTRY
from ...runtime import pruning_config, pruning_on
from ..family import TrainingSpec
from .conversion import FUSION_KEY, convert_to_post_projection, convert_weights, loading, shared_projector
from .encoders import CAUSAL, MODEL_MODULE, is_converted
from .inference import TARGET, resolve_mode

_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # meteor_plugin/
# The split each model got when training started (model -> counts), kept beside the model, not on it.
SPLIT_IN_TRAINING: "weakref.WeakKeyDictionary[Any, Dict[str, int]]" = weakref.WeakKeyDictionary()


def _gathered_copy(shared: torch.nn.Module, projector_type: str) -> torch.nn.Module:
    """A plain module with the shared projector's full weights (gathered from the ranks under ZeRO-3;
    ``copy.deepcopy`` of a partitioned module would copy its ZeRO bookkeeping too)."""
    with gathered(list(shared.parameters())):
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
    partitioned = zero3_params(shared)
    projector_type = getattr(model.config, "mm_projector_type", "linear")
    convert_to_post_projection(model, source=_gathered_copy(shared, projector_type))
    new = list(llm.mm_projectors.parameters())
    _trained_like_the_shared_one(llm)
    partition_like(partitioned, new)  # every rank computed the same split
    return {"gathered": len(partitioned), "partitioned": len(new) if partitioned else 0, "created": len(new)}


def before_training(model: Any, training_args: Any) -> None:
    """``TRAINING.before_training``: METEOR trains EAGLE with post-projection fusion (``model`` is the bare model,
    unwrapped of DeepSpeed and peft by the caller)."""
    bare = model
    recorded = getattr(bare.config, FUSION_KEY, None)
    if not pruning_on():
        if recorded:
            raise SystemExit(
                "meteor_plugin.train --meteor-off: this checkpoint was converted to per-encoder projectors, which "
                "plain EAGLE training would neither use nor save (the result would claim projectors it lacks). "
                "Train the unconverted checkpoint for a baseline, or drop --meteor-off"
            )
        return
    if is_converted(bare):
        _trained_like_the_shared_one(bare.get_model())
        return
    if recorded:
        resolve_mode(bare, pruning_config(bare))  # raises: recorded but not built
    if pruning_config(bare).fusion_mode == "training_free":
        return  # the user asked for EAGLE's channel concatenation
    done = split_for_training(bare)
    SPLIT_IN_TRAINING[bare] = done  # what the tests' probe reports
    if rank() == 0:
        zero = f", ZeRO-3: {done['gathered']} gathered, {done['partitioned']} partitioned" if done["gathered"] else ""
        print(f"meteor-plugin: the checkpoint has no per-encoder projectors: split {done['created']} tensors from "
              f"the shared projector for training (the saved model records them){zero}", flush=True)


def alias_eagle_config(train_module: Any = None, llama_module: Optional[Any] = None) -> bool:
    """Give ``eagle_llama`` the ``eagleConfig`` name its LoRA loader imports; True if it was missing.

    ``eagle/model/builder.py``'s LoRA branch does ``from eagle.model.language_model.eagle_llama import
    eagleConfig``; the class is ``EagleConfig`` (ImportError). ``train_module`` is unused (the signature of
    a codebase runtime fix); ``llama_module`` defaults to the installed ``eagle_llama``. Recorded in the
    training's patch registry, so the end of training's scope (``training.hooks.installed``) removes it again. The patched tree carries it as a
    source edit too (``EAGLE_CONFIG_ALIAS``); both together are harmless.
    """
    module = llama_module if llama_module is not None else importlib.import_module(MODEL_MODULE)
    if not hasattr(module, "EagleConfig"):
        raise AttributeError(f"{module.__name__} has no EagleConfig: not EAGLE's eagle_llama.py")
    if hasattr(module, "eagleConfig"):
        return False
    TRAINING_REGISTRY.patch(module, "eagleConfig", module.EagleConfig)
    return True


def eagle_train_script() -> Optional[str]:
    """The path of an importable root ``train.py`` with EAGLE's structure, or None.

    Read as text, not imported (importing it builds nothing but pulls in all of EAGLE). Our own
    ``meteor_plugin/train.py`` never counts, in case it was run as a script from its folder.
    """
    spec = importlib.util.find_spec("train") if importlib.util.find_spec("eagle") is not None else None
    origin = getattr(spec, "origin", None)
    if not origin or not os.path.isfile(origin):
        return None
    if os.path.dirname(os.path.abspath(origin)) == _PACKAGE_ROOT:
        return None
    with open(origin, encoding="utf-8", errors="replace") as fh:
        text = fh.read()
    needed = ("def train(", "EagleTrainer", "class ModelArguments", "safe_save_model_for_hf_trainer")
    return origin if all(n in text for n in needed) else None


def _trainable() -> bool:
    return TARGET.is_installed() and eagle_train_script() is not None


TRAINING = TrainingSpec(
    name="eagle", keyword="eagle",
    model_module=MODEL_MODULE, causal_lm=CAUSAL,
    config_class="EagleConfig", model_types=("eagle_llama",),
    train_module="train", trainer_class="EagleTrainer", model_global=CAUSAL,
    available=_trainable, runtime_fixes=(alias_eagle_config,),
    # Stage 2's per-encoder projectors (conversion.py): added by convert, or split before training.
    convert_weights=convert_weights, loading=loading,
    weights_required=True,
    weights_missing_reason="converting an EAGLE checkpoint needs the per-encoder projectors of METEOR's Stage 2",
    before_training=before_training,
    # EAGLE trains every encoder (freeze_vision=False) and the projector: so do its LoRA runs, beside the adapters.
    fully_trained=("mm_projector", "vision_tower"),
    # transformers 4.44 skips a module only if "<name>." is in its path: "mm_projector" misses mm_projectors.N.
    keep_unquantised=("mm_projectors",),
    builder_module="eagle.model.builder", utils_module="eagle.mm_utils",
    entry_modules={"train_mem": "flash_attention_2", "train": "sdpa"},
    from_checkout=True,
    title="EAGLE",
    notes={"unavailable": "run from the root of an EAGLE checkout: its train.py and eagle/ must be importable",
           "install": "put an NVlabs/EAGLE checkout on PYTHONPATH"},
)
