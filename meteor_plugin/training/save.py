"""Checkpoints that are either whole or recognisably not.

A save can die half-way (a node lost, a job killed at its time limit, a full disk). Two mechanisms make
sure such a folder is never taken for a whole checkpoint:

- **Marker.** Every save made under ``marked_save`` first writes ``meteor-saving`` into the folder and
  removes any old ``meteor-complete.json``; when every rank has written its part, the main process writes
  ``meteor-complete.json`` (every file with its size) and removes ``meteor-saving``. Resuming picks the
  newest *complete* ``checkpoint-*``; ``merge-lora`` and ``convert`` refuse an incomplete folder. A folder
  with neither file was not written by us (plain upstream training): it is trusted, with a warning.
- **Staging.** The final model of a run is written into ``OUTPUT/.meteor-final/`` and then moved into
  ``OUTPUT`` file by file with ``os.replace`` (atomic on one filesystem), ``config.json`` last and the
  marker after it: upstream loaders (``from_pretrained``, LLaVA's ``load_pretrained_model``) cannot open
  a folder without ``config.json``, so a crash while moving leaves a folder that fails to load loudly.

``convert`` and ``merge-lora`` assemble their output in a hidden sibling named after the host and pid
(``staging_folder``); one left by a killed run (its process gone) is removed by the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import time
import warnings
from typing import Callable, Dict, Iterator, List, Optional

COMPLETE = "meteor-complete.json"
SAVING = "meteor-saving"
STAGING = ".meteor-final"
LOAD_FIRST = ("config.json",)  # moved last: without them no loader opens the folder
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class IncompleteCheckpointError(RuntimeError):
    """A folder whose save did not finish."""


def _listing(folder: str, only: Optional[List[str]] = None) -> Dict[str, int]:
    """Relative path -> size of every file under ``folder`` (or under its entries named in ``only``)."""
    files: Dict[str, int] = {}
    for root, dirs, names in os.walk(folder):
        if root == folder:
            dirs[:] = [d for d in dirs if d != STAGING and (only is None or d in only)]
            names = [n for n in names if only is None or n in only]
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel in (COMPLETE, SAVING):
                continue
            files[rel] = os.path.getsize(path)
    return files


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def staging_folder(out: str) -> str:
    """A fresh hidden sibling of ``out`` to assemble it in, after removing those of dead runs.

    Only folders of this host whose process is gone are removed (another host may share the filesystem,
    and a run still going must keep its own). ``.NAME.meteor-tmp-PID`` is the name used before the host
    was part of it.
    """
    parent, name = os.path.split(os.path.abspath(out))
    host = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())
    stale = re.compile(r"^\." + re.escape(name) + r"\.meteor-tmp-(?:" + re.escape(host) + r"-)?(\d+)$")
    for entry in os.listdir(parent) if os.path.isdir(parent) else []:
        found = stale.match(entry)
        if found and int(found.group(1)) != os.getpid() and not _alive(int(found.group(1))):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    staging = os.path.join(parent, f".{name}.meteor-tmp-{host}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def begin(folder: str) -> None:
    """Mark ``folder`` as being written (main process only)."""
    os.makedirs(folder, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, COMPLETE))
    with open(os.path.join(folder, SAVING), "w", encoding="utf-8") as fh:
        fh.write(f"save started {time.strftime('%Y-%m-%d %H:%M:%S')} by pid {os.getpid()}\n")


def finish(folder: str, only: Optional[List[str]] = None) -> None:
    """Record ``folder`` as whole: every file and its size (main process only, after all ranks wrote).

    ``only`` restricts the record to some top-level entries (a final save shares its folder with the
    run's ``checkpoint-*`` folders, which are not part of it)."""
    _write_json_atomic(os.path.join(folder, COMPLETE), {"files": _listing(folder, only), "time": time.time()})
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, SAVING))


def _size_differs(path: str, size: int) -> bool:
    """Whether a listed file no longer has the size that was written. A JSON file that still parses was edited
    by someone (users change config.json and generation_config.json), not cut short by a crash: that is fine."""
    if os.path.getsize(path) == size:
        return False
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as fh:
                json.load(fh)
            return False
        except (OSError, ValueError):
            return True
    return True


def status(folder: str) -> str:
    """``"complete"``, ``"incomplete"`` (a save of ours that did not finish, or files cut or lost since; a JSON
    file edited since, and still valid, does not count), or
    ``"unknown"`` (no marker of ours: not written through meteor-plugin)."""
    if os.path.exists(os.path.join(folder, SAVING)):
        return "incomplete"
    marker = os.path.join(folder, COMPLETE)
    if not os.path.exists(marker):
        return "unknown"
    try:
        with open(marker, encoding="utf-8") as fh:
            listed = json.load(fh)["files"]
    except (OSError, ValueError, KeyError):
        return "incomplete"
    for rel, size in listed.items():
        path = os.path.join(folder, rel)
        if not os.path.isfile(path) or _size_differs(path, size):
            return "incomplete"
    return "complete"


def problems(folder: str) -> List[str]:
    """What is wrong with a folder whose status is incomplete (for error messages)."""
    if os.path.exists(os.path.join(folder, SAVING)):
        return [f"{SAVING} is present: the save started and never finished"]
    out = []
    try:
        with open(os.path.join(folder, COMPLETE), encoding="utf-8") as fh:
            listed = json.load(fh)["files"]
    except (OSError, ValueError, KeyError) as exc:
        return [f"{COMPLETE} is unreadable ({exc})"]
    for rel, size in sorted(listed.items()):
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            out.append(f"{rel} is missing")
        elif _size_differs(path, size):
            out.append(f"{rel} has {os.path.getsize(path)} bytes, {size} were written")
    return out


def require_loadable(folder: str, what: str = "checkpoint") -> None:
    """Raise if ``folder`` is a save of ours that did not finish; warn-free for complete or foreign ones."""
    if status(folder) == "incomplete":
        raise IncompleteCheckpointError(
            f"{what} {folder} is incomplete: " + "; ".join(problems(folder)) +
            ". Its save was interrupted, so it must not be loaded: use an earlier checkpoint or save again."
        )


def checkpoints(output_dir: str) -> List[str]:
    """``checkpoint-N`` folders of a run, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CHECKPOINT.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def last_resumable(output_dir: str) -> Optional[str]:
    """The newest checkpoint that is whole (or foreign, with a warning); None if there is none.

    Incomplete ones are skipped with a warning naming them, so a crash during the save of step N resumes
    from the checkpoint before it instead of failing (or, worse, loading half a state).
    """
    skipped = []
    for path in reversed(checkpoints(output_dir)):
        state = status(path)
        if state == "incomplete":
            skipped.append(os.path.basename(path))
            continue
        if skipped:
            warnings.warn(f"meteor-plugin: skipping incomplete checkpoint(s) {', '.join(skipped)} in {output_dir} "
                          f"(their save was interrupted); resuming from {os.path.basename(path)}", stacklevel=2)
        if state == "unknown":
            warnings.warn(f"meteor-plugin: {path} was not saved through meteor-plugin, so it cannot be checked "
                          "for completeness; resuming from it as upstream would", stacklevel=2)
        return path
    if skipped:
        warnings.warn(f"meteor-plugin: every checkpoint in {output_dir} is incomplete ({', '.join(skipped)}); "
                      "training starts from the beginning", stacklevel=2)
    return None


@contextlib.contextmanager
def marked_save(folder: str, is_main: bool, barrier: Callable[[], None]) -> Iterator[None]:
    """Bracket a save that every rank takes part in (ZeRO shards are written per rank)."""
    if is_main:
        begin(folder)
    barrier()
    yield
    barrier()  # every rank has written its files
    if is_main:
        finish(folder)
    barrier()


def publish(staging: str, target: str) -> None:
    """Move a staged save into ``target`` (main process only): loader-critical files last, then the marker.

    ``target`` may hold other things (``checkpoint-*`` folders, ``trainer_state.json``): only the files the
    staged save has are replaced.
    """
    if not os.path.isdir(staging):
        raise FileNotFoundError(f"nothing staged in {staging}")
    os.makedirs(target, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(target, COMPLETE))
    for name in LOAD_FIRST:  # an old config.json would make a half-replaced folder look loadable
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(target, name))
    names = sorted(os.listdir(staging), key=lambda n: (n in LOAD_FIRST, n))
    for name in names:
        src, dst = os.path.join(staging, name), os.path.join(target, name)
        if os.path.isdir(dst) and not os.path.islink(dst):
            shutil.rmtree(dst)
        os.replace(src, dst)
    os.rmdir(staging)
    finish(target, only=names)


def staging_dir(output_dir: str) -> str:
    return os.path.join(output_dir, STAGING)
