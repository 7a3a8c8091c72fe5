"""Where ``MeteorConfig.proportional_attention`` runs, and what each setting does where it cannot.

It runs where the plugin sees each encoder's kept tokens (the llava package's models and transformers'
``LlavaForConditionalGeneration``, one image or a flat merge; EAGLE with post-projection fusion; Stage 3 alone on
packed crops): on transformers 5 with SDPA or FlashAttention-2 (the sizes ride in a key column, ``attention_bias``)
or eager (a float mask), on 4.37 and 4.44 with eager or SDPA (a float mask).
Elsewhere ``"on"`` refuses by name and ``"auto"`` (the default) runs without it, with a warning once per
model and reason, so a user knows which numbers they get.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

_WARNED: "weakref.WeakKeyDictionary[Any, set]" = weakref.WeakKeyDictionary()


def wanted(cfg: Any) -> bool:
    """Whether this config asks for it: METEOR's stages only; the baselines (FastV included) run as their
    papers do."""
    return cfg.proportional_attention != "off" and cfg.method == "meteor"


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
