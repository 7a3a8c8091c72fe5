"""meteor-plugin patch apply|check|revert PATH [--dry-run]: output and exit status."""

import argparse
import os
import subprocess
import sys

from patcher_fixtures import build_tree, snapshot

from meteor_plugin.patcher import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tree(tmp_path, layout="c121f04"):
    return build_tree(str(tmp_path / layout), layout)


def test_check_apply_check_revert(tmp_path, capsys):
    root = _tree(tmp_path)
    assert cli.run(["check", root]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{root}: LLaVA, layout of haotian-liu/LLaVA at c121f04\n")
    assert "  not applied  evaluation  llava/eval/model_vqa_loader.py" in out
    assert out.endswith("METEOR patch: applied to 0 of 10 files\n")

    assert cli.run(["apply", root]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"patched 10 file(s) in {root}:\n  llava/train/train.py\n")

    assert cli.run(["check", root]) == 0
    out = capsys.readouterr().out
    assert "  applied      training    llava/train/train.py             (bits-fix, enable)\n" in out
    assert out.endswith("METEOR patch: applied to 10 of 10 files\n")

    assert cli.run(["apply", root]) == 0
    assert capsys.readouterr().out == "nothing to do: already applied\n"
    assert cli.run(["revert", root]) == 0
    assert capsys.readouterr().out.startswith("reverted 10 file(s)")
    assert cli.run(["check", root]) == 1


def test_dry_run_prints_the_diff_and_changes_nothing(tmp_path, capsys):
    root = _tree(tmp_path, "fef95f1")
    before = snapshot(root)
    assert cli.run(["apply", "--dry-run", root]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("diff --git a/train.py b/train.py\n--- a/train.py\n+++ b/train.py\n@@ ")
    assert "+eagleConfig = EagleConfig  # [METEOR]" in captured.out
    assert captured.err == "dry run: would have patched 12 file(s)\n"
    assert snapshot(root) == before
    assert cli.run(["apply", root]) == 0
    capsys.readouterr()
    assert cli.run(["revert", root, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "-eagleConfig = EagleConfig  # [METEOR]" in captured.out
    assert captured.err == "dry run: would have reverted 12 file(s)\n"


def test_refusal_exits_2_and_names_the_file(tmp_path, capsys):
    root = _tree(tmp_path, "llava-torch-1.2.2")
    path = os.path.join(root, "llava", "serve", "cli.py")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text.replace("main(args)", "run(args)"))
    before = snapshot(root)
    assert cli.run(["apply", root]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"meteor-plugin patch apply: {root}: patch apply refused; nothing was changed.")
    assert "\n  llava/serve/cli.py: does not look as expected: the `if __name__" in err
    assert snapshot(root) == before
    assert cli.run(["check", root]) == 2
    assert "  refused      demo        llava/serve/cli.py" in capsys.readouterr().out
    assert cli.run(["check", str(tmp_path)]) == 2
    assert "is not a LLaVA or EAGLE tree" in capsys.readouterr().err


def test_add_subparser_plugs_into_a_parent_cli(tmp_path, capsys):
    root = _tree(tmp_path, "fef95f1")
    parser = argparse.ArgumentParser(prog="meteor-plugin")
    cli.add_subparser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["patch", "apply", root])
    assert args.func is cli.main and args.func(args) == 0
    assert "patched 12 file(s)" in capsys.readouterr().out


def test_python_dash_m_meteor_plugin_patcher(tmp_path):
    root = _tree(tmp_path, "fef95f1")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-m", "meteor_plugin.patcher", "check", root],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 1, done.stderr
    assert done.stdout.endswith("METEOR patch: applied to 0 of 12 files\n")
