"""apply / check / revert on synthetic LLaVA (c121f04, llava-torch 1.2.2) and EAGLE (fef95f1) trees."""

import difflib
import os
import sys
import types

import pytest
from patcher_fixtures import LAYOUTS, build_tree, snapshot

from meteor_plugin import patcher
from meteor_plugin.source_edits import anchors, edits

MAIN = 'if __name__ == "__main__":\n'


def _tree(tmp_path, layout):
    return build_tree(str(tmp_path / layout), layout)


def _edit(root, path, old, new):
    full = os.path.join(root, *path.split("/"))
    with open(full, encoding="utf-8", newline="") as fh:
        text = fh.read()
    assert old in text
    with open(full, "w", encoding="utf-8", newline="") as fh:
        fh.write(text.replace(old, new, 1))


def _read(root, path):
    with open(os.path.join(root, *path.split("/")), encoding="utf-8", newline="") as fh:
        return fh.read()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_apply_check_revert_roundtrip(tmp_path, layout):
    root = _tree(tmp_path, layout)
    before = snapshot(root)
    codebase = patcher.detect(root)
    assert patcher.check(root).layout.name == layout
    assert {f.status for f in patcher.check(root).files} == {patcher.NOT_APPLIED}

    outcome = patcher.apply(root)
    assert outcome.changed == [f.path for f in codebase.files]
    after = snapshot(root)
    assert set(after) == set(before)  # no file added: nothing is stored beside the tree's files
    for path in before:
        old, new = before[path].decode().splitlines(), after[path].decode().splitlines()
        added = [line for line in difflib.ndiff(old, new) if line.startswith("+ ")]
        removed = [line for line in difflib.ndiff(old, new) if line.startswith("- ")]
        assert not removed, path
        assert all("# [METEOR]" in line for line in added), path
        assert bool(added) == (path in outcome.changed), path
    survey = patcher.check(root)
    assert survey.fully_applied and {f.status for f in survey.files} == {patcher.APPLIED}

    again = patcher.apply(root)  # idempotent
    assert again.changed == [] and again.diff == ""
    assert snapshot(root) == after

    undone = patcher.revert(root)
    assert sorted(undone.changed) == sorted(outcome.changed)
    assert snapshot(root) == before  # byte for byte, every file
    assert patcher.revert(root).changed == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_enable_lines_open_the_main_block_of_every_entry_script(tmp_path, layout):
    root = _tree(tmp_path, layout)
    patcher.apply(root)
    for spec in patcher.detect(root).files:
        if not isinstance(spec.edits[0].anchor, anchors.MainBlockStart):
            continue
        text = _read(root, spec.path)
        after_header = text.split(MAIN, 1)[1].splitlines()
        assert after_header[:2] == [
            "    import meteor_plugin.entry  # [METEOR] --meteor-config PATH or METEOR_CONFIG turns visual-token "
            "pruning on",
            "    meteor_plugin.entry.enable_from_argv()  # [METEOR]",
        ], spec.path
        # before the parser and the call that loads the model
        assert after_header[2].lstrip().startswith(("parser =", "train(")), spec.path


def test_edit_points_follow_structure_not_line_numbers(tmp_path):
    root = _tree(tmp_path, "c121f04")
    path = "llava/eval/run_llava.py"
    filler = "".join(f"def helper_{i}():\n    return {i}\n\n\n" for i in range(30))
    _edit(root, path, "def split_list", filler + "def split_list")
    _edit(root, path, MAIN, "# a comment line\n" + MAIN)
    patcher.apply(root)
    lines = _read(root, path).splitlines()
    header = lines.index(MAIN.rstrip("\n"))
    assert header > 120
    assert lines[header + 1].startswith("    import meteor_plugin.entry  # [METEOR]")


def test_module_level_scripts_get_the_lines_after_their_imports(tmp_path):
    root = _tree(tmp_path, "fef95f1")
    patcher.apply(root)
    demo = _read(root, "predict_demo.py").splitlines()
    at = demo.index("from eagle.mm_utils import get_model_name_from_path")
    assert demo[at + 1].startswith("import meteor_plugin.entry  # [METEOR]")
    assert demo[at + 2] == "meteor_plugin.entry.enable_from_argv()  # [METEOR]"
    gradio = _read(root, "gradio_demo.py")
    assert gradio.index("enable_from_argv()") < gradio.index("parse_args()")
    lmms = _read(root, "lmms_eval/models/eagle.py")
    assert lmms.index("from typing import List, Optional\n") < lmms.index("try:  # [METEOR]")
    assert lmms.index("enable_from_argv()") < lmms.index('@register_model("eagle")')


def _load(path, name, **hooks):
    module = types.ModuleType(name)
    with open(path, encoding="utf-8") as fh:
        code = compile(fh.read(), path, "exec")
    exec(code, module.__dict__)  # the __main__ block does not run: __name__ is not "__main__"
    module.__dict__.update(hooks)
    return module


@pytest.mark.parametrize("layout,path", [("c121f04", "llava/train/train.py"), ("fef95f1", "train.py")])
def test_bits_fix_keeps_quantization_config_only(tmp_path, layout, path):
    root = _tree(tmp_path, layout)
    four_bit = lambda: types.SimpleNamespace(bits=4, double_quant=True)  # noqa: E731
    before = _load(os.path.join(root, path), "before", parse_arguments=four_bit).train()
    assert before["load_in_4bit"] is True and "quantization_config" in before
    patcher.apply(root)
    after = _load(os.path.join(root, path), "after", parse_arguments=four_bit).train()
    assert "load_in_4bit" not in after and "load_in_8bit" not in after
    assert after["quantization_config"] == before["quantization_config"]
    assert after["prepared_for_kbit"] is True


def test_bits_fix_is_skipped_where_the_kwargs_are_already_right(tmp_path):
    root = _tree(tmp_path, "fef95f1")
    _edit(root, "train.py", "            load_in_4bit=training_args.bits == 4,\n"
                            "            load_in_8bit=training_args.bits == 8,\n", "")
    patcher.apply(root)
    state = next(f for f in patcher.check(root).files if f.path == "train.py")
    assert state.status == patcher.APPLIED and state.edits == ["enable"]
    assert "load_in_4bit" not in _read(root, "train.py")


@pytest.fixture
def own_eagle_modules():
    """The synthetic tree's ``eagle`` must not leak into other tests (the EAGLE stand-in is one too)."""
    def eagle_modules():
        return {m: mod for m, mod in sys.modules.items() if m == "eagle" or m.startswith("eagle.")}

    saved = eagle_modules()
    for name in saved:
        del sys.modules[name]
    yield
    for name in eagle_modules():
        del sys.modules[name]
    sys.modules.update(saved)


def test_eagle_config_alias_makes_the_lora_loader_import_work(tmp_path, monkeypatch, own_eagle_modules):
    root = _tree(tmp_path, "fef95f1")
    monkeypatch.syspath_prepend(root)
    import eagle.model.builder as builder

    with pytest.raises(ImportError, match="eagleConfig"):
        builder.load_pretrained_model("ckpt", "base", "eagle-x5-lora")
    patcher.apply(root)
    del sys.modules["eagle.model.language_model.eagle_llama"]
    import eagle.model.language_model.eagle_llama as eagle_llama

    assert builder.load_pretrained_model("ckpt", "base", "eagle-x5-lora") is eagle_llama.EagleConfig


def test_a_file_without_its_landmark_is_refused_by_name_and_nothing_changes(tmp_path):
    root = _tree(tmp_path, "c121f04")
    path = "llava/eval/run_llava.py"
    text = _read(root, path)
    _edit(root, path, text[text.index(MAIN):], "eval_model(None)\n")
    before = snapshot(root)
    with pytest.raises(patcher.PatchError) as info:
        patcher.apply(root)
    message = str(info.value)
    assert f'  {path}: does not look as expected: no `if __name__ == "__main__":` block at module level' in message
    assert "nothing was changed" in message
    assert message.count("\n  ") == 1  # only that file is named
    assert snapshot(root) == before
    state = next(f for f in patcher.check(root).files if f.path == path)
    assert state.status == patcher.REFUSED


@pytest.mark.parametrize(
    "layout,path,old,new,reason",
    [
        ("c121f04", "llava/eval/model_vqa.py", "    eval_model(args)\n", "    print(args)\n",
         'the `if __name__ == "__main__":` block (line 16) does not call eval_model()'),
        ("fef95f1", "train.py", "    bnb_model_from_pretrained_args.update(dict(", "    bnb_kwargs = (dict(",
         "no `bnb_model_from_pretrained_args.update(...)` directly under an `if training_args.bits in [4, 8]:`"),
        ("fef95f1", "eagle/model/language_model/eagle_llama.py", "class EagleConfig(", "class EagleLlamaConfig(",
         "no module-level `class EagleConfig`"),
        ("fef95f1", "lmms_eval/models/eagle.py", "class Eagle:", "class EagleModel:", "no `class Eagle` at module level"),
        ("llava-torch-1.2.2", "llava/serve/cli.py", MAIN, 'if __name__ == "__main__": pass\n' + MAIN,
         '2 `if __name__ == "__main__":` blocks'),
        ("llava-torch-1.2.2", "llava/serve/cli.py", "import json\n", "import json\nif True\n", "it is not valid Python"),
    ],
)
def test_changed_files_are_refused_with_a_message_naming_them(tmp_path, layout, path, old, new, reason):
    root = _tree(tmp_path, layout)
    _edit(root, path, old, new)
    before = snapshot(root)
    with pytest.raises(patcher.PatchError) as info:
        patcher.apply(root)
    assert f"  {path}: " in str(info.value) and reason in str(info.value)
    assert snapshot(root) == before


def test_a_hand_made_meteor_edit_is_refused(tmp_path):
    root = _tree(tmp_path, "fef95f1")
    path = "eagle/eval/model_vqa_loader.py"
    _edit(root, path, MAIN, MAIN + "    import meteor_plugin\n")
    with pytest.raises(patcher.PatchError, match=f"{path}: line 17 already mentions meteor_plugin without the "
                                                 r"\[METEOR\] marker"):
        patcher.apply(root)


def test_edited_marker_lines_are_refused_by_apply_and_revert(tmp_path):
    root = _tree(tmp_path, "c121f04")
    patcher.apply(root)
    path = "llava/train/train_mem.py"
    _edit(root, path, "enable_from_argv()  # [METEOR]", "enable_from_argv(['x'])  # [METEOR]")
    _edit(root, "llava/serve/cli.py", "import json\n", "import json  # a change of the user's\n")
    state = next(f for f in patcher.check(root).files if f.path == path)
    assert state.status == patcher.REFUSED
    assert state.problem.startswith("its [METEOR] lines differ from what the patcher inserts (first difference at line 5)")
    for action in (patcher.apply, patcher.revert):
        with pytest.raises(patcher.PatchError, match=f"  {path}: its \\[METEOR\\] lines differ"):
            action(root)
    forced = patcher.revert(root, force=True)
    assert path in forced.changed
    assert "[METEOR]" not in "".join(_read(root, p) for p in forced.changed)
    assert "import json  # a change of the user's\n" in _read(root, "llava/serve/cli.py")  # kept


def test_user_changes_elsewhere_survive_revert(tmp_path):
    root = _tree(tmp_path, "fef95f1")
    patcher.apply(root)
    _edit(root, "train.py", "import types\n", "import types\nimport os  # added after patching\n")
    assert patcher.check(root).fully_applied
    patcher.revert(root)
    text = _read(root, "train.py")
    assert "[METEOR]" not in text and "import os  # added after patching\n" in text


def test_missing_files_required_are_refused_optional_are_skipped(tmp_path):
    root = _tree(tmp_path, "fef95f1")
    os.remove(os.path.join(root, "gradio_demo.py"))  # optional
    outcome = patcher.apply(root)
    assert "gradio_demo.py" not in outcome.changed
    assert next(f for f in patcher.check(root).files if f.path == "gradio_demo.py").status == patcher.ABSENT
    assert patcher.check(root).fully_applied
    patcher.revert(root)
    os.remove(os.path.join(root, "eagle", "eval", "run_eagle.py"))  # required
    with pytest.raises(patcher.PatchError, match="  eagle/eval/run_eagle.py: the file is missing"):
        patcher.apply(root)


def test_crlf_files_get_crlf_lines_and_revert_exactly(tmp_path):
    root = _tree(tmp_path, "llava-torch-1.2.2")
    path = "llava/eval/model_vqa_science.py"
    full = os.path.join(root, *path.split("/"))
    with open(full, "rb") as fh:
        data = fh.read().replace(b"\n", b"\r\n")
    with open(full, "wb") as fh:
        fh.write(data)
    patcher.apply(root)
    with open(full, "rb") as fh:
        patched = fh.read()
    assert b"enable_from_argv()  # [METEOR]\r\n" in patched and b"\n" not in patched.replace(b"\r\n", b"")
    patcher.revert(root)
    with open(full, "rb") as fh:
        assert fh.read() == data


def test_not_a_tree(tmp_path):
    with pytest.raises(patcher.NotACodebase, match="is not a LLaVA or EAGLE tree"):
        patcher.apply(str(tmp_path))
    root = _tree(tmp_path, "c121f04")
    with pytest.raises(patcher.NotACodebase, match="give the folder that contains llava/"):
        patcher.check(os.path.join(root, "llava"))


def test_every_inserted_line_carries_the_marker():
    for codebase in patcher.known():
        for spec in codebase.files:
            for edit in spec.edits:
                assert edit.code and all("# [METEOR]" in line for line in edit.code)
    with pytest.raises(ValueError, match="must be one line carrying"):
        edits.Edit("bad", None, ("x = 1",), "why")


def test_a_users_own_meteor_line_is_never_removed(tmp_path):
    root = _tree(tmp_path, "c121f04")
    path = "llava/serve/cli.py"
    mine = "import json  # [METEOR] a note of the user's\n"
    _edit(root, path, "import json\n", mine)
    before = snapshot(root)
    patcher.apply(root)
    assert next(f for f in patcher.check(root).files if f.path == path).status == patcher.APPLIED
    patcher.revert(root)
    assert snapshot(root) == before  # byte for byte, the user's line included
    patcher.apply(root)
    _edit(root, "llava/train/train_mem.py", "enable_from_argv()  # [METEOR]", "enable_from_argv(['x'])  # [METEOR]")
    patcher.revert(root, force=True)
    assert mine in _read(root, path)
    assert _read(root, path) == before[path].decode()


def test_a_read_only_file_leaves_the_tree_untouched(tmp_path, monkeypatch):
    root = _tree(tmp_path, "c121f04")
    before = snapshot(root)
    locked = os.path.join(root, "llava", "serve", "cli.py")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if p == locked else real_access(p, mode))
    with pytest.raises(patcher.PatchError) as info:
        patcher.apply(root)
    assert "nothing was changed" in str(info.value)
    assert "  llava/serve/cli.py: it cannot be written (no write permission)" in str(info.value)
    assert str(info.value).count("\n  ") == 1
    assert snapshot(root) == before


def test_a_write_that_fails_midway_is_rolled_back(tmp_path, monkeypatch):
    from meteor_plugin.patcher import tree

    root = _tree(tmp_path, "c121f04")
    before = snapshot(root)
    real_write, calls = tree._write, []

    def write(path, text):
        calls.append(path)
        if len(calls) == 4:
            raise PermissionError(13, "Permission denied")
        real_write(path, text)

    monkeypatch.setattr(tree, "_write", write)
    with pytest.raises(patcher.PatchError, match=r"nothing was changed \(the 3 file\(s\) written before it were "
                                                 r"restored\)\. Writing \S+ failed: Permission denied"):
        patcher.apply(root)
    assert snapshot(root) == before


@pytest.mark.parametrize("link", ["llava/serve/cli.py", "llava/serve"])
def test_a_symbolic_link_out_of_the_tree_is_refused_by_name(tmp_path, link):
    root = _tree(tmp_path, "c121f04")
    outside = tmp_path / "elsewhere"
    os.rename(os.path.join(root, *link.split("/")), outside)
    os.symlink(outside, os.path.join(root, *link.split("/")))
    before = snapshot(str(outside)) if outside.is_dir() else outside.read_bytes()
    for action in (patcher.apply, patcher.revert):
        with pytest.raises(patcher.PatchError, match=f"  llava/serve/cli.py: {link} is a symbolic link to "
                                                     f"{outside}, outside the tree"):
            action(root)
    assert (snapshot(str(outside)) if outside.is_dir() else outside.read_bytes()) == before
    assert next(f for f in patcher.check(root).files if f.path == "llava/serve/cli.py").status == patcher.REFUSED
