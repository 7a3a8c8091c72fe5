"""One record of everything meteor-plugin changed in other people's code, so it can be undone exactly.

Two kinds of change are recorded:
- class (or module) attributes replaced by ``patch``: ``restore_all`` puts the original object back,
  or deletes the attribute where the owner did not define it itself (it was inherited); ``wrap`` puts one more
  layer over an attribute (patched or not), undone before the patches under it;
- forward hooks on model instances, registered through ``add_hook``: ``restore_all`` removes them.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Tuple

_MISSING = object()


@dataclass
class _Patch:
    owner: Any
    name: str
    original: Any  # the owner's own attribute, or _MISSING if it was inherited or absent
    replacement: Any


class PatchRegistry:
    def __init__(self) -> None:
        self._patches: Dict[Tuple[int, str], _Patch] = {}
        self._order: List[Tuple[int, str]] = []
        self._layers: Dict[Tuple[int, str], _Patch] = {}  # ``wrap``: (id(owner), name) -> the layer, in order
        self._hooks: List[Any] = []  # RemovableHandle objects
        self._hooked: "weakref.WeakSet[Any]" = weakref.WeakSet()
        self._lock = threading.Lock()  # layer classes are patched at a model's first forward, maybe in threads

    # Attributes -----------------------------------------------------------------------------------
    def patch(self, owner: Any, name: str, replacement: Any) -> bool:
        """Set ``owner.name = replacement``; returns False if it was already patched by us."""
        key = (id(owner), name)
        with self._lock:
            if key in self._patches:
                return False
            original = owner.__dict__.get(name, _MISSING) if hasattr(owner, "__dict__") else getattr(owner, name)
            self._patches[key] = _Patch(owner, name, original, replacement)
            self._order.append(key)
            setattr(owner, name, replacement)
            return True

    def wrap(self, owner: Any, name: str, make: Callable[[Any], Any]) -> bool:
        """Set ``owner.name = make(owner.name)`` on top of whatever is there (another patch of ours included), once
        per attribute; returns False if it was wrapped already. ``restore_all`` removes it first."""
        key = (id(owner), name)
        with self._lock:
            if key in self._layers:
                return False
            original = owner.__dict__.get(name, _MISSING) if hasattr(owner, "__dict__") else getattr(owner, name)
            replacement = make(getattr(owner, name))
            self._layers[key] = _Patch(owner, name, original, replacement)
            setattr(owner, name, replacement)
            return True

    def is_wrapped(self, owner: Any, name: str) -> bool:
        return (id(owner), name) in self._layers

    def is_patched(self, owner: Any, name: str) -> bool:
        return (id(owner), name) in self._patches

    def original(self, owner: Any, name: str) -> Any:
        """The attribute as it was before we patched it (looked up through the MRO if inherited)."""
        rec = self._patches.get((id(owner), name))
        if rec is None:
            return getattr(owner, name)
        if rec.original is not _MISSING:
            return rec.original
        for base in owner.__mro__[1:]:
            if name in base.__dict__:
                return base.__dict__[name]
        raise AttributeError(f"{owner!r} has no original attribute {name!r}")

    def patched(self) -> List[Tuple[Any, str]]:
        return [(self._patches[k].owner, self._patches[k].name) for k in self._order]

    # Instance hooks ---------------------------------------------------------------------------------
    def add_hook(self, module: Any, handle: Any) -> None:
        self._hooks.append(handle)
        self._hooked.add(module)

    def has_hooks(self, module: Any) -> bool:
        return module in self._hooked

    # Undo ---------------------------------------------------------------------------------------------
    def restore_all(self) -> None:
        for handle in reversed(self._hooks):
            handle.remove()
        self._hooks.clear()
        self._hooked = weakref.WeakSet()
        for rec in reversed(list(self._layers.values())):
            self._put_back(rec)
        self._layers.clear()
        for key in reversed(self._order):
            self._put_back(self._patches[key])
        self._patches.clear()
        self._order.clear()

    @staticmethod
    def _put_back(rec: _Patch) -> None:
        if rec.original is _MISSING:
            if rec.name in getattr(rec.owner, "__dict__", {}):
                delattr(rec.owner, rec.name)
        else:
            setattr(rec.owner, rec.name, rec.original)


REGISTRY = PatchRegistry()  # what pruning patches (enable, scopes, attached models); patching.py undoes it
# What a training run changes in upstream's training code and its libraries (training/hooks.py's ``installed``
# undoes it, not ``meteor_plugin.disable()``).
TRAINING_REGISTRY = PatchRegistry()


def wraps_original(registry: PatchRegistry, owner: Any, name: str) -> Callable[[Callable], Callable]:
    """Decorator factory: give a replacement the original's name and docstring."""
    import functools

    def deco(fn: Callable) -> Callable:
        try:
            return functools.wraps(registry.original(owner, name))(fn)
        except AttributeError:
            return fn

    return deco
