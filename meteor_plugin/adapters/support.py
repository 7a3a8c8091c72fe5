"""What each model runs: the one place that decides whether a config's method and stage switches can prune it.

Every family's target states, per model, a ``Support`` record: METEOR's stages that prune on that model (Stage 2
needs several encoders; unconverted EAGLE only scores in its encoders) and the methods it refuses, with the
reason. ``install`` puts ``check`` in front of the ``generate`` and ``forward`` of every class a family prunes
(``patching.py`` does it for every family, so a new family cannot skip it), so an unsupported combination
raises ``UnsupportedMethodError`` naming the method, the switches and the class before anything runs, instead of
running unpruned under a method's name.

What a config prunes (``Support.plan``):

- ``meteor``: the switched-on stages the model has. Switches on and none of them pruning (``fusion=True`` alone
  on one encoder) is refused; every switch off is the unpruned model, as asked.
- ``random``, ``avgpool``, ``visionzip``, ``drop_encoder`` (``stages/baselines.py``): the baseline replaces
  Stages 1-2 before the language model (their switches are not read), keeping ``fusion_keep`` tokens per image;
  with ``llm=True`` Stage 3 runs after it.
- ``fastv``: Stage 3's scoring replaced by FastV's; it needs ``llm=True`` (refused without it), and Stages 1-2
  run before it where switched on.

``proportional_attention='on'`` with a pre-LLM baseline asks it to place its kept tokens (``stages/proportional.py``):
refused where the family does not (``Support.placed``), never run without it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Tuple

from ..config import METHODS
from ..runtime import pruning_config
from ..stages.baselines import PRE_LLM

SWITCHES = ("encoder", "fusion", "llm")
STAGE_NAMES = {"encoder": "Stage 1 (encoder)", "fusion": "Stage 2 (fusion)", "llm": "Stage 3 (llm)"}
ONE_ENCODER = "it has one vision encoder, and drop_encoder removes one of several"
CHECKED = ("generate", "forward")  # what ``install`` puts the check in front of


class UnsupportedMethodError(NotImplementedError):
    """A config's method and stage switches that a model cannot run: raised before the model runs."""


@dataclass(frozen=True)
class Support:
    """What one model runs under the plugin.

    ``stages``: METEOR's stages that prune on it (a subset of ``SWITCHES``); a stage left out is one the model
    has nothing for (``why_not`` says what), which a config may switch on only beside one that prunes.
    ``refused``: method -> why it cannot run on this model."""

    model: str  # the class, as errors name it
    stages: FrozenSet[str]
    refused: Dict[str, str] = field(default_factory=dict)
    why_not: Dict[str, str] = field(default_factory=dict)  # stage -> why it prunes nothing here
    placed: FrozenSet[str] = frozenset()  # pre-LLM baselines that run with proportional_attention='on' here

    def plan(self, cfg: Any) -> Tuple[str, ...]:
        """What ``cfg`` prunes on this model, in order: ``"baseline"`` (a pre-LLM baseline) or the stages that run
        (``"encoder"``, ``"fusion"``, ``"llm"``); empty when every switch is off. Raises ``UnsupportedMethodError``
        for a combination the model cannot run."""
        method = cfg.method
        if method not in METHODS:
            raise self._error(cfg, f"{method!r} is not a method (allowed: {', '.join(METHODS)})")
        if method in self.refused:
            raise self._error(cfg, self.refused[method])
        asked = [s for s in SWITCHES if getattr(cfg, s)]
        runs = [s for s in asked if s in self.stages]
        if method in PRE_LLM and cfg.proportional_attention == "on" and method not in self.placed:
            why = ("its tokens are means over grid cells, and the regions it drops have no kept token standing for "
                   "them" if method == "avgpool" else
                   f"this model places the kept tokens of {', '.join(sorted(self.placed)) or 'no baseline'} only")
            raise self._error(cfg, f"proportional_attention='on' asks the baseline to keep its tokens' places and "
                                   f"sizes, and {why}; set it to 'auto' or 'off' to run the baseline as its paper does")
        if method in PRE_LLM:
            return ("baseline",) + (("llm",) if "llm" in runs else ())
        if method == "fastv":
            if "llm" not in runs:
                raise self._error(cfg, "FastV is Stage 3's scoring, and llm=False leaves Stage 3 off: set llm=True")
            return tuple(runs)
        if asked and not runs:
            why = "; ".join(f"{STAGE_NAMES[s]} {self.why_not.get(s, 'does not prune it')}" for s in asked)
            raise self._error(cfg, f"none of the stages switched on prunes it ({why}), so it would run unpruned")
        return tuple(runs)

    def _error(self, cfg: Any, why: str) -> UnsupportedMethodError:
        switches = ", ".join(f"{s}={getattr(cfg, s)}" for s in SWITCHES)
        return UnsupportedMethodError(
            f"meteor-plugin cannot run method={cfg.method!r} with {switches} on {self.model}: {why}. "
            "Running it would give unpruned (or differently pruned) results under that name, so it is refused.")


def check(model: Any, target: Any) -> None:
    """Raise ``UnsupportedMethodError`` if ``model`` prunes now with a config its family cannot run on it."""
    cfg = pruning_config(model)
    if cfg is not None:
        target.support(model).plan(cfg)


def install(registry: Any, target: Any, classes: Any) -> None:
    """Put `check` in front of ``generate`` and ``forward`` of each of ``classes`` (once; ``restore_all`` undoes
    it), over the family's own wrappers."""
    for cls in classes:
        for name in CHECKED:
            if hasattr(cls, name) and not registry.is_wrapped(cls, name):
                registry.wrap(cls, name, lambda method: _checked(method, target))


def _checked(method: Any, target: Any) -> Any:
    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        check(self, target)
        return method(self, *args, **kwargs)

    return checked
