"""The record of one model family, and the structural check every adapter uses.

A ``Family`` is all the plugin knows about one family of models, held in the family's own module
(``adapters/llava.py``, ``adapters/eagle.py``, ``adapters/hf_llava.py``):

- ``target``: what ``enable()`` patches (``is_installed()``, ``patch(registry)`` returning the causal
  classes now pruned, and ``refused``: class name -> why a forward of it raises while enabled);
- ``training``: what ``meteor_plugin.train``, ``convert``, ``merge-lora`` and ``calibrate`` need
  (a ``training.codebases.Codebase``), or None where the family is not trained through upstream code;
- ``patcher``: the edits ``meteor-plugin patch`` makes to a checkout of it (a
  ``patcher.codebases.Codebase``), or None where there is no checkout to patch.

``adapters/__init__.py`` lists the families; inference, training and the patcher all read that list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence

IMAGE_TOKEN_INDEX = -200  # the llava and EAGLE codebases' placeholder id for an image in input_ids


class StructureError(RuntimeError):
    """The model does not look like the codebase the adapter was written for."""


def require(obj: Any, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise StructureError(
            f"meteor-plugin: {what} has no {', '.join(missing)}; this version of the code is not one the "
            "plugin recognises, so it cannot prune it (nothing was patched)"
        )


@dataclass(frozen=True)
class Family:
    name: str  # what enable(targets=[...]) takes
    target: Any
    training: Optional[Any] = None
    patcher: Optional[Any] = None

    def is_installed(self) -> bool:
        return self.target.is_installed()

    def patch(self, registry: Any) -> list:
        return self.target.patch(registry)

    @property
    def refused(self) -> Dict[str, str]:
        return dict(getattr(self.target, "refused", {}))
