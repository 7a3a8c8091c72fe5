"""A user's mistake in a config reached through ``METEOR_CONFIG`` (the import) or ``--meteor-config`` is one line
naming the file and the field, with no traceback; a bug keeps its traceback."""

import os
import subprocess
import sys

import pytest

import meteor_plugin
from meteor_plugin import patching
from meteor_plugin.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(meteor_plugin.__file__)))


@pytest.mark.parametrize("name, text, words", [
    ("misspelt.json", '{"llm_layr": 2}', ["misspelt.json", "unknown MeteorConfig field(s) llm_layr"]),
    ("value.yaml", "llm_layer: 0\n", ["value.yaml", "MeteorConfig.llm_layer=0 is invalid"]),
    ("broken.json", '{"llm_layer": 2', ["broken.json", "is not valid JSON"]),
    ("broken.yaml", "llm_layer: [2\n", ["broken.yaml", "is not valid YAML"]),
    ("missing.json", None, ["missing.json", "not found"]),
])
def test_a_bad_config_in_METEOR_CONFIG_is_one_line_naming_the_file_and_the_field(tmp_path, monkeypatch, capsys, name,
                                                                                   text, words):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv("METEOR_CONFIG", str(path))
    monkeypatch.setattr(sys, "argv", ["script.py"])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # the hook the import installs is undone after the test
    with pytest.raises(ConfigError) as info:
        patching.enable_from_env()
    assert not meteor_plugin.is_enabled()
    # the interpreter's report of it, had nobody caught it: one line
    sys.excepthook(type(info.value), info.value, info.value.__traceback__)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("meteor-plugin: METEOR_CONFIG: ")
    assert all(w in err for w in words), err
    # any other uncaught exception still gets its traceback
    try:
        raise RuntimeError("a bug")
    except RuntimeError as bug:
        sys.excepthook(RuntimeError, bug, bug.__traceback__)
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: a bug" in err


def _python(code, env, cwd):
    full = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=cwd, timeout=300)


def test_import_meteor_plugin_with_a_bad_config_fails_in_one_line_and_a_later_bug_keeps_its_traceback(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"llm_max_kep": 0.25}')
    out = _python("import meteor_plugin", {"METEOR_CONFIG": str(bad)}, tmp_path)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and "Traceback" not in out.stderr
    assert str(bad) in out.stderr and "llm_max_kep" in out.stderr
    code = "try:\n    import meteor_plugin\nexcept ValueError:\n    pass\nraise RuntimeError('a bug')"
    out = _python(code, {"METEOR_CONFIG": str(bad)}, tmp_path)
    assert "Traceback (most recent call last)" in out.stderr and "RuntimeError: a bug" in out.stderr
