"""One progress bar for every long-running command (fidelity bench and its calibration, speed bench, calibrate,
convert).

tqdm, which transformers already depends on, on stderr, so that a command's report on stdout stays clean
and ``--json`` output stays parseable. A bar is cleared when its work is done. Every phase that can take more than
a few seconds shows one: a loop (`bar`, `counted`, `steps`) or one step of work (`phase`). ``--no-progress``
(anywhere on a ``meteor-plugin`` command line) turns every bar off, in whatever module draws it (`silenced`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
_SHOWN: contextvars.ContextVar[bool] = contextvars.ContextVar("meteor_progress", default=True)


def shown() -> bool:
    """Whether bars are drawn here (no `silenced` around)."""
    return _SHOWN.get()


@contextlib.contextmanager
def silenced(off: bool = True) -> Iterator[None]:
    """No bar inside the block (with ``off``), whichever module draws it: what ``--no-progress`` does."""
    token = _SHOWN.set(_SHOWN.get() and not off)
    try:
        yield
    finally:
        _SHOWN.reset(token)


def bar(total: Optional[int], desc: str, unit: str = "step", enabled: bool = True) -> Any:
    """A progress bar of ``total`` units (a context manager; ``.update(n)`` advances it); drawn when ``enabled`` and
    not `silenced`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not (enabled and shown()), leave=False,
                dynamic_ncols=True)


def counted(n: int, desc: str, unit: str = "step") -> Iterator[int]:
    """``range(n)``, advancing a bar as each item is done."""
    with bar(n, desc, unit) as progress:
        for i in range(n):
            yield i
            progress.update(1)


def steps(items: Iterable[T], desc: str, unit: str = "step") -> Iterator[T]:
    """The items, advancing a bar as each is done (its total: how many there are)."""
    items = list(items)
    with bar(len(items), desc, unit) as progress:
        for item in items:
            yield item
            progress.update(1)


@contextlib.contextmanager
def phase(desc: str) -> Iterator[None]:
    """One step of work that has no count of its own (loading a checkpoint, building a question set): a bar of one
    step named ``desc`` while it runs."""
    with bar(1, desc, "step") as progress:
        yield
        progress.update(1)
