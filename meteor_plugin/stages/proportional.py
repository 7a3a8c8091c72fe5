"""Where ``MeteorConfig.proportional_attention`` runs, and what each setting does where it cannot.

It runs where the plugin sees each encoder's kept tokens (the llava package's models and transformers'
``LlavaForConditionalGeneration``, one image or a flat merge; EAGLE with post-projection fusion; Stage 3 alone on
packed crops): on transformers 5 with SDPA or FlashAttention-2 (the sizes ride in a key column, ``attention_bias``)
or eager (a float mask), on 4.37 and 4.44 with eager or SDPA (a float mask).
Elsewhere ``"on"`` refuses by name and ``"auto"`` (the default) runs without it, with a warning once per
model and reason, so a user knows which numbers they get.

The baselines run as their papers do unless ``"on"`` asks for it: FastV then runs it as Stage 3 does, and the
pre-LLM baselines that keep tokens of the image (``stages.baselines.PLACED``) place them where the family can
(``adapters.support.Support.placed``; elsewhere ``"on"`` is refused), so that methods compare at equal cost with
it on both sides.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from .baselines import PLACED

_WARNED: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()


def wanted(cfg: Any) -> bool:
    """Whether this config's stages run with it: METEOR's unless ``"off"``; FastV's (Stage 3 with FastV's scoring,
    and Stages 1-2 before it where switched on) only when ``"on"`` asks."""
    if cfg.method == "meteor":
        return cfg.proportional_attention != "off"
    return cfg.method == "fastv" and cfg.proportional_attention == "on"


def placed(cfg: Any) -> bool:
    """Whether a pre-LLM baseline places its kept tokens and gives their sizes (``stages.baselines.placed``)."""
    return cfg.method in PLACED and cfg.proportional_attention == "on"


def unavailable(cfg: Any, model: Any, why: str) -> None:
    """Where proportional attention cannot run: ``"on"`` raises, ``"auto"`` warns once per model and reason
    (the caller then runs without it)."""
    if cfg.proportional_attention == "on":
        raise NotImplementedError(
            f"meteor-plugin: MeteorConfig.proportional_attention='on' {why}: set it to 'auto' (off where it "
            "cannot run) or 'off'"
        )
    if cfg.proportional_attention != "auto":
        return
    try:
        seen = _WARNED.setdefault(model, set())
    except TypeError:  # not weak-referenceable: warn every time rather than never
        seen = set()
    if why not in seen:
        seen.add(why)
        warnings.warn(f"meteor-plugin: proportional attention is off for this model: it {why}", stacklevel=3)
