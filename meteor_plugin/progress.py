"""One progress bar for every long-running command (fidelity bench, speed bench, calibrate, convert).

tqdm, which transformers already depends on, on stderr, so that a command's report on stdout stays clean
and ``--json`` output stays parseable. A bar is cleared when its work is done.
"""

from __future__ import annotations

from typing import Any


def bar(total: int, desc: str, unit: str = "step", enabled: bool = True) -> Any:
    """A progress bar of ``total`` units (a context manager; ``.update(n)`` advances it)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=False, dynamic_ncols=True)
