"""The registry of model families: the one module that imports them all.

    llava/      the llava package: LLaVA-1.5 and 1.6 (anyres), Vicuna and Mistral
    eagle/      EAGLE: its multi-encoder tower (Stages 1 and 2), its per-encoder projectors, training, patcher edits
    hf_llava/   transformers' LlavaForConditionalGeneration, LlavaNextForConditionalGeneration and
                LlavaOnevisionForConditionalGeneration
    qwen_vl/    transformers' Qwen2VLForConditionalGeneration, Qwen2_5_VLForConditionalGeneration and
                Qwen3VLForConditionalGeneration
Each folder defines ``FAMILY`` (``family.Family``); ``shared/`` holds what several families share; ``refusal.py``
the error for a vision-language model no family prunes.

To add a family: write its folder with a ``FAMILY`` (``family.missing_parts`` says what the record needs) and add
it to ``FAMILIES`` below. Inference (``patching.py``), training, calibration and the patcher read the families
through this module's lookups and the records' fields, never by importing a family or testing its name.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from . import eagle, hf_llava, llava, qwen_vl
from .family import Family, PatcherSpec, TrainingSpec

FAMILIES: Tuple[Family, ...] = (llava.FAMILY, eagle.FAMILY, hf_llava.FAMILY, qwen_vl.FAMILY)
BY_NAME = {f.name: f for f in FAMILIES}


# Training and loading -----------------------------------------------------------------------------------------
def training_specs() -> Dict[str, TrainingSpec]:
    """Every family's training spec, by name."""
    return {f.training.name: f.training for f in FAMILIES if f.training is not None}


def training_spec(name: str) -> TrainingSpec:
    try:
        return training_specs()[name]
    except KeyError:
        raise ValueError(f"unknown codebase {name!r}: choose from {', '.join(sorted(training_specs()))}") from None


def spec_for_checkpoint(config: Dict[str, Any], path: str = "") -> TrainingSpec:
    """The training spec of the family a checkpoint's config.json belongs to (by ``model_type``, then
    ``architectures``)."""
    model_type = config.get("model_type")
    specs = list(training_specs().values())
    for spec in specs:
        if model_type in spec.model_types:
            return spec
    archs = config.get("architectures") or []
    for spec in specs:
        if spec.causal_lm in archs:
            return spec
    names = ", ".join(f"{s.name} ({'/'.join(s.model_types)})" for s in specs)
    raise ValueError(
        f"{path or 'this checkpoint'} has model_type={model_type!r} and architectures={archs}: not a checkpoint of "
        f"a codebase meteor-plugin knows ({names})"
    )


def spec_for_training(choice: str = "auto") -> TrainingSpec:
    """The codebase whose ``train()`` to wrap: one trained from a checkout on the path (EAGLE) before an
    installed package (LLaVA)."""
    if choice != "auto":
        spec = training_spec(choice)
        if not spec.available():
            raise RuntimeError(f"--meteor-codebase {choice}: {spec.notes.get('unavailable', 'not installed')}")
        return spec
    for spec in sorted(training_specs().values(), key=lambda s: not s.from_checkout):
        if spec.available():
            return spec
    raise RuntimeError(
        "meteor_plugin.train found no training code: install LLaVA (pip install --no-deps llava-torch==1.2.2.post1) "
        "or run from the root of an EAGLE checkout (where train.py and the eagle package are)"
    )


# The patcher -------------------------------------------------------------------------------------------------
def patcher_specs() -> Tuple[PatcherSpec, ...]:
    """Every family's patcher spec, in registry order."""
    return tuple(f.patcher for f in FAMILIES if f.patcher is not None)


# Calibration --------------------------------------------------------------------------------------------------
def encoders_of(model: Any) -> Optional[List[Any]]:
    """``model``'s vision encoders (``stages.vision.EncoderParts``) as its family states them, or None when no
    family knows the model."""
    for family in FAMILIES:
        if family.is_installed():
            found = family.target.encoders(model)
            if found is not None:
                return found
    return None


def family_of(model: Any) -> Optional[Family]:
    """The family that prunes ``model`` (the one whose target knows its encoders), or None."""
    for family in FAMILIES:
        if family.is_installed() and family.target.encoders(model) is not None:
            return family
    return None


def open_checkpoint(path: str, config: Dict[str, Any]) -> Optional[tuple]:
    """(processor, model) of a checkpoint a family opens itself (transformers' classes), or None."""
    for family in FAMILIES:
        if family.is_installed():
            opened = family.target.open(path, config)
            if opened is not None:
                return opened
    return None


__all__ = ["FAMILIES", "BY_NAME", "Family", "training_specs", "training_spec", "spec_for_checkpoint",
           "spec_for_training", "patcher_specs", "encoders_of", "family_of", "open_checkpoint"]
