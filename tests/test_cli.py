"""meteor-plugin's user errors: one line naming the problem, exit status 2, the traceback only with --debug."""

import json

import pytest

from meteor_plugin.cli import main


@pytest.mark.parametrize("name,text,message", [
    ("missing.json", None, "METEOR config file not found: {path}"),
    ("bad.json", "{", "METEOR config file {path} is not valid JSON"),
    ("value.json", json.dumps({"llm_layer": 0}), "METEOR config file {path}: MeteorConfig.llm_layer=0 is invalid"),
])
def test_a_user_error_is_one_line_and_exit_2(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    if text is not None:
        path.write_text(text)
    assert main(["demo", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meteor-plugin demo: error: " + message.format(path=path))
    assert err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    path = tmp_path / "missing.json"
    with pytest.raises(FileNotFoundError, match="METEOR config file not found"):
        main(["demo", "--config", str(path), "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "demo", "--config", str(path)])
