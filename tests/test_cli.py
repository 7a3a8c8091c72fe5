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


def test_version_and_every_option_has_help(capsys):
    import argparse

    import meteor_plugin
    from meteor_plugin import cli

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"meteor-plugin {meteor_plugin.__version__}"
    parser = cli.build_parser()
    undocumented = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                undocumented += [f"{name} {a.option_strings[-1]}" for a in sub._actions
                                 if a.option_strings and a.help is None]
    assert undocumented == []


def test_the_runner_prints_its_help_and_exits_0(capsys):
    from meteor_plugin import run

    with pytest.raises(SystemExit) as exit_:
        run.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("python -m meteor_plugin.run [--meteor-config PATH]") and "MODULE as ``__main__``" in out


def test_a_command_prints_no_notice_a_user_would_read_as_failure():
    """transformers' torchvision fallback notice and the progress bars of a model built in memory are gone
    from the CLI's output; the report is all there is."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "meteor_plugin.cli", "demo", "--random-llava", "--repeats", "1",
                           "--max-new-tokens", "1"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torchvision" not in done.stderr and "Writing model shards" not in done.stderr
    assert "Loading weights" not in done.stderr
    assert done.stdout.startswith("model: random LLaVA-shaped model")


def test_quiet_loading_restores_the_verbosity_and_the_bars():
    from transformers.utils import logging as hf_logging

    from meteor_plugin.compat.transformers import quiet_loading

    before = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with quiet_loading():
        assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == before


@pytest.mark.parametrize("flag", ["--model-path", "--fidelity-model"])
def test_a_wrong_checkpoint_path_is_named_as_such(tmp_path, capsys, flag):
    assert main(["demo", flag, str(tmp_path / "nope")]) == 2
    assert f"{flag} {tmp_path / 'nope'}: no such folder" in capsys.readouterr().err
    assert main(["demo", flag, str(tmp_path)]) == 2
    assert "not a checkpoint folder (it has no config.json)" in capsys.readouterr().err


def test_long_commands_share_one_progress_bar_on_stderr(tmp_path, capsys):
    """convert (and calibrate, the speed bench, the fidelity bench) report progress through
    ``meteor_plugin.progress.bar``, on stderr: stdout keeps the report alone."""
    from meteor_plugin.testing.checkpoint import save_tiny_llava_checkpoint

    source = save_tiny_llava_checkpoint(str(tmp_path / "tiny-llava"))
    assert main(["convert", "--model-path", source, "--out", str(tmp_path / "tiny-llava-meteor")]) == 0
    out, err = capsys.readouterr()
    assert "convert" in err and "copying the checkpoint" in err
    assert "convert:" not in out


def test_bench_fidelity_help_shows_its_own_options_and_bench_help_not_them(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "fidelity", "--help"])
    own = capsys.readouterr().out
    assert own.startswith("usage: meteor-plugin bench fidelity")
    assert "--per-kind" in own and "--meteor-set" in own and "--ablation" in own
    assert "--repeats" not in own and "--device" not in own and "--shape" not in own
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    speed = capsys.readouterr().out
    assert "--repeats" in speed and "--per-kind" not in speed and "meteor-plugin bench fidelity --help" in speed


def test_no_progress_silences_every_bar_wherever_it_is_drawn():
    from meteor_plugin import progress

    with progress.bar(3, "shown") as shown:
        assert not shown.disable
    with progress.silenced():
        with progress.bar(3, "calibrate's") as a, progress.phase("a phase"):
            assert a.disable
        assert list(progress.steps([1, 2], "steps")) == [1, 2]
    with progress.bar(3, "shown again") as again:
        assert not again.disable
