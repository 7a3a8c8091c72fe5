"""The patch files in patches/: what they hold, that the current patcher makes them, that git applies them."""

import os
import re
import shutil
import subprocess

import pytest
from patcher_fixtures import LAYOUTS, build_tree, snapshot

from meteor_plugin import patcher
from meteor_plugin.patcher import make_patches
from meteor_plugin.adapters.eagle import PATCHER as EAGLE
from meteor_plugin.adapters.llava import PATCHER as LLAVA

PATCHES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "patches")
HUNK = re.compile(r"^@@ -(\d+),0 \+(\d+)(?:,(\d+))? @@$")
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def _layout(name):
    return next(layout for codebase in (LLAVA, EAGLE) for layout in codebase.layouts if layout.name == name)


def _committed(name):
    with open(os.path.join(PATCHES, _layout(name).patch_file), encoding="utf-8", newline="") as fh:
        return fh.read()


def _positions(text):
    """path -> the lines after which each hunk inserts (the landmarks' upstream lines)."""
    positions, path = {}, None
    for line in text.splitlines():
        if line.startswith("diff --git a/"):
            path = line.split(" b/", 1)[1]
            positions[path] = []
        elif line.startswith("@@"):
            positions[path].append(int(HUNK.match(line).group(1)))
    return positions


def _git_apply(patch_file, cwd, check=False):
    command = ["git", "apply", "--unidiff-zero"] + (["--check"] if check else []) + [patch_file]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_committed_patch_holds_only_our_inserted_lines(layout):
    text = _committed(layout)
    preamble, body = text.split("diff --git", 1)
    assert preamble == make_patches.header(_layout(layout))
    for line in ("diff --git" + body).splitlines():
        if line.startswith(("diff --git a/", "--- a/", "+++ b/")):
            continue
        if line.startswith("@@"):
            assert HUNK.match(line), line  # pure insertion, no context
            continue
        assert line.startswith("+") and "# [METEOR]" in line, line
    touched = set(_positions(text))
    codebase = EAGLE if layout == "fef95f1" else LLAVA
    assert touched == {spec.path for spec in codebase.files}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_committed_patch_is_what_the_current_patcher_makes(tmp_path, layout):
    # A synthetic tree with each landmark on the line the committed patch names: the patcher must
    # produce the committed file byte for byte (same files, positions, lines, header).
    committed = _committed(layout)
    root = build_tree(str(tmp_path / "tree"), layout, _positions(committed))
    assert patcher.patch_text(root, make_patches.header(_layout(layout))) == committed


@needs_git
@pytest.mark.parametrize("layout", LAYOUTS)
def test_committed_patch_applies_with_git_to_a_tree_laid_out_like_upstream(tmp_path, layout):
    committed = _committed(layout)
    patch_file = os.path.join(PATCHES, _layout(layout).patch_file)
    by_git = build_tree(str(tmp_path / "git"), layout, _positions(committed))
    by_patcher = build_tree(str(tmp_path / "patcher"), layout, _positions(committed))
    original = snapshot(by_git)
    result = _git_apply(patch_file, by_git, check=True)
    assert result.returncode == 0, result.stderr
    assert _git_apply(patch_file, by_git).returncode == 0
    patcher.apply(by_patcher)
    assert snapshot(by_git) == snapshot(by_patcher)
    assert patcher.check(by_git).fully_applied  # the patcher recognises a git-applied tree
    patcher.revert(by_git)
    assert snapshot(by_git) == original


@needs_git
@pytest.mark.parametrize("layout", LAYOUTS)
def test_patch_made_for_a_tree_applies_to_it_with_git(tmp_path, layout):
    root = build_tree(str(tmp_path / "git"), layout)
    twin = build_tree(str(tmp_path / "patcher"), layout)
    patch_file = str(tmp_path / "made.patch")
    with open(patch_file, "w", encoding="utf-8", newline="") as fh:
        fh.write(patcher.patch_text(root, "made for this tree\n\n"))
    assert _git_apply(patch_file, root, check=True).returncode == 0
    assert _git_apply(patch_file, root).returncode == 0
    patcher.apply(twin)
    assert snapshot(root) == snapshot(twin)


@needs_git
def test_dry_run_diff_applies_with_plain_git_apply(tmp_path):
    root = build_tree(str(tmp_path / "tree"), "fef95f1")
    before = snapshot(root)
    outcome = patcher.apply(root, dry_run=True)
    assert snapshot(root) == before and len(outcome.changed) == len(EAGLE.files)
    assert "\n diff" not in outcome.diff and "\n if __name__" in outcome.diff  # three lines of context
    patch_file = str(tmp_path / "dry.patch")
    with open(patch_file, "w", encoding="utf-8", newline="") as fh:
        fh.write(outcome.diff)
    result = subprocess.run(["git", "apply", patch_file], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert patcher.check(root).fully_applied
    revert_diff = patcher.revert(root, dry_run=True).diff
    assert revert_diff.count("\n-") > 0 and "\n+" not in revert_diff.replace("\n+++", "")
