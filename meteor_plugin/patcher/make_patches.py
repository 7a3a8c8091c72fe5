"""Maintainer script: write ``patches/*.patch`` from the real upstream trees with the current patcher.

    python -m meteor_plugin.patcher.make_patches --out patches \\
        --llava LLAVA_GIT --eagle EAGLE_GIT --llava-torch SITE_PACKAGES

``LLAVA_GIT`` / ``EAGLE_GIT``: a clone (bare or not) of haotian-liu/LLaVA / NVlabs/EAGLE holding
commits c121f04 / fef95f1; the files the patcher touches are read at that commit with ``git show``, so
the clone's checkout does not matter. ``SITE_PACKAGES``: a folder holding the ``llava`` package of
``llava-torch==1.2.2.post1`` (a venv's site-packages, or the unzipped wheel). Give any subset.

The patches are zero-context diffs (only our ``+`` lines, no upstream line): they apply with
``git apply --unidiff-zero`` to a clean tree at the named version. Nothing upstream is written to the
repository: the files are read into a temporary folder and deleted.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from typing import List, Optional

from .. import adapters
from ..adapters.family import Layout, PatcherSpec
from .recognise import layout_of
from .tree import patch_text


def header(layout: Layout) -> str:
    """The text before the first diff: git apply skips it."""
    where = layout.where
    return (
        f"METEOR patch for {layout.title}, written by `python -m meteor_plugin.patcher.make_patches`.\n"
        "It only inserts lines, each carrying a `# [METEOR]` comment, and holds no upstream line, so its hunks\n"
        f"have no context. From {where}, check and apply it with\n"
        f"    git apply --unidiff-zero --check {layout.patch_file}\n"
        f"    git apply --unidiff-zero {layout.patch_file}\n"
        "Zero-context hunks go in by line number: use it on an unmodified tree only. For a fork, run\n"
        "`meteor-plugin patch apply PATH`, which finds every edit point from the structure of the file.\n"
        "\n"
    )


def _needed_paths(codebase: PatcherSpec) -> List[str]:
    paths = [f.path for f in codebase.files]
    paths.append(f"{codebase.package}/model/builder.py")  # how a tree is recognised
    return paths + list(codebase.landmarks)  # how its layout is told


def export_from_git(git_dir: str, commit: str, codebase: PatcherSpec, dest: str) -> None:
    """Write the files the patcher reads, as they are at ``commit``, under ``dest``."""
    for path in _needed_paths(codebase):
        result = subprocess.run(["git", "-C", git_dir, "show", f"{commit}:{path}"], capture_output=True)
        if result.returncode != 0:
            continue  # a missing file is reported by the patcher (refused, or absent when optional)
        target = os.path.join(dest, *path.split("/"))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(target, "wb") as fh:
            fh.write(result.stdout)


def _write_patch(root: str, codebase: PatcherSpec, layout: Layout, out_dir: str) -> str:
    found = layout_of(root, codebase)
    if found != layout:
        raise SystemExit(f"{root} looks like {found.title if found else 'no known layout'}, not {layout.title}")
    target = os.path.join(out_dir, layout.patch_file)
    with open(target, "w", encoding="utf-8", newline="") as fh:
        fh.write(patch_text(root, header(layout)))
    return target


def _from_git(git_dir: str, codebase: PatcherSpec, layout: Layout, out_dir: str) -> str:
    tmp = tempfile.mkdtemp(prefix=f"meteor-{layout.name}-")
    try:
        export_from_git(git_dir, layout.commit, codebase, tmp)
        return _write_patch(tmp, codebase, layout, out_dir)
    finally:
        shutil.rmtree(tmp)


def _check_llava_torch_version(folder: str) -> None:
    infos = glob.glob(os.path.join(folder, "llava_torch-*.dist-info"))
    if infos and not any(os.path.basename(i).startswith("llava_torch-1.2.2") for i in infos):
        raise SystemExit(f"{folder} holds {', '.join(map(os.path.basename, infos))}, not llava-torch 1.2.2")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m meteor_plugin.patcher.make_patches", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="patches", help="folder for the .patch files (default: patches)")
    parser.add_argument("--llava", metavar="GIT_DIR", help="a clone of haotian-liu/LLaVA holding c121f04")
    parser.add_argument("--eagle", metavar="GIT_DIR", help="a clone of NVlabs/EAGLE holding fef95f1")
    parser.add_argument("--llava-torch", metavar="FOLDER", help="a folder holding llava-torch 1.2.2's llava/")
    args = parser.parse_args(argv)
    if not (args.llava or args.eagle or args.llava_torch):
        parser.error("give at least one of --llava, --eagle, --llava-torch")
    os.makedirs(args.out, exist_ok=True)
    written = []
    llava, eagle = adapters.BY_NAME["llava"].patcher, adapters.BY_NAME["eagle"].patcher
    if args.llava:
        written.append(_from_git(args.llava, llava, llava.layouts[0], args.out))
    if args.eagle:
        written.append(_from_git(args.eagle, eagle, eagle.layouts[0], args.out))
    if args.llava_torch:
        _check_llava_torch_version(args.llava_torch)
        written.append(_write_patch(args.llava_torch, llava, llava.layouts[1], args.out))
    for path in written:
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
