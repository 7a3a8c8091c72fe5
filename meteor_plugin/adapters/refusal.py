"""Loud refusal: while the plugin is enabled, a vision-language model it does not prune raises at its first
forward instead of running unpruned as if it had been.

Which models that is, is decided from the class and its config at each call, not remembered: a model
that can generate, whose config describes an image input (``vision_config``, ``mm_vision_tower``,
``image_token_index``...), and no class in whose MRO an adapter patched. Text-only models, vision
towers and contrastive models (CLIP: it cannot generate) are left alone. The check wraps
``PreTrainedModel.__call__`` (in the patch registry, so ``disable()`` removes it): a few attribute
lookups on the few model-level calls of a forward, none on the layers.
"""

from __future__ import annotations

from typing import Any, Dict, List

from ..runtime import pruning_on

# Config attributes by which a generative model takes images (the llava and EAGLE codebases write
# mm_vision_tower; transformers' own VLMs vision_config and an image token).
VISION_SIGNALS = ("vision_config", "mm_vision_tower", "vision_tower", "image_token_index", "image_token_id")
# The method every adapter wraps on the causal class it prunes: its being patched marks a pruned class.
PRUNED_MARK = "generate"


class UnsupportedModelError(RuntimeError):
    """A vision-language model class that meteor-plugin, while enabled, does not prune."""


def takes_images(model: Any) -> bool:
    config = getattr(model, "config", None)
    return config is not None and any(getattr(config, name, None) is not None for name in VISION_SIGNALS)


def is_pruned_class(cls: type, registry: Any) -> bool:
    return any(registry.is_patched(base, PRUNED_MARK) for base in cls.__mro__)


def pruned_classes(registry: Any) -> List[str]:
    return sorted({owner.__name__ for owner, name in registry.patched() if name == PRUNED_MARK})


def check(model: Any, registry: Any, reasons: Dict[str, str]) -> None:
    """Raise UnsupportedModelError if pruning is on here and ``model`` is a vision-language model no adapter
    prunes."""
    if not pruning_on():
        return
    cls = type(model)
    can_generate = getattr(cls, "can_generate", None)
    if can_generate is None or not can_generate() or not takes_images(model) or is_pruned_class(cls, registry):
        return
    why = reasons.get(cls.__name__, "no adapter covers its family")
    supported = ", ".join(pruned_classes(registry)) or "none (no adapter is patched)"
    raise UnsupportedModelError(
        f"meteor-plugin is enabled but cannot prune {cls.__module__}.{cls.__name__}: {why}. "
        f"Running it would give unpruned results that look pruned, so it is refused. Pruned now: {supported}. "
        "Run it inside `with meteor_plugin.disabled():` (or call meteor_plugin.disable()) to run it without pruning."
    )


def install(registry: Any, reasons: Dict[str, str]) -> None:
    """Wrap ``PreTrainedModel.__call__`` with `check` (once; ``registry.restore_all`` undoes it)."""
    from transformers import PreTrainedModel

    if registry.is_patched(PreTrainedModel, "__call__"):
        return
    call = PreTrainedModel.__call__  # nn.Module's, inherited

    def __call__(self, *args, **kwargs):
        check(self, registry, reasons)
        return call(self, *args, **kwargs)

    registry.patch(PreTrainedModel, "__call__", __call__)
