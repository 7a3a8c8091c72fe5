"""Every command line in the fenced blocks of README.md, recipes/README.md and patches/README.md runs as
written, so that a documented command that breaks fails CI.

A block fenced as ```text is a synopsis (placeholders such as CKPT, PATH, [--flag], ...) and ```python
is code: neither is run. Every line of every other fenced block is classified here and run in a fresh
temporary work directory (with the repository's ``recipes/`` and ``patches/`` beside it, as in a clone):

- lines that run on a CPU as written run as written (a tiny checkpoint stands at the path a line names);
- GPU and multi-node recipe lines run in the recipes' dry-run mode (``DRY_RUN=1``: the launch command is
  printed, not started), with the per-node placeholders filled in (node 0);
- the quick start's install and the README's test command are what CI itself runs (``.ci/run``);
- a few lines need what no CPU test has (a 13B LoRA run, eight GPUs): they are listed in ``NOT_RUN`` with
  the reason. A new command line that is none of these fails this test until it is classified.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
READMES = ("README.md", os.path.join("recipes", "README.md"), os.path.join("patches", "README.md"))
# Lines a CPU test cannot run, with why (matched by their start).
NOT_RUN = {
    "meteor-plugin merge-lora --model-path ./checkpoints/llava-v1.5-13b-meteor-lora-run1":
        "needs the LoRA run of the line before it (8 GPUs); merge-lora itself is tested on tiny runs",
}
# Per-node placeholders of the multi-node lines, filled in for node 0.
NODE_ZERO = {"NODE_RANK=$i": "NODE_RANK=0", "/path/to/recipes/": "recipes/", "DATA=...": "DATA=data.json",
             "IMAGES=...": "IMAGES=images"}


def fenced_commands(path):
    """(info string, command line) of every line of every fenced block; continuation lines joined."""
    out, info, pending = [], None, ""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.rstrip("\n")
            if line.startswith("```"):
                info = line[3:].strip() if info is None else None
                continue
            if info is None:
                continue
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            text = (pending + line.strip()).strip()
            pending = ""
            if text and not text.startswith("#"):
                out.append((info, text))
    return out


def readme_test_command(readme):
    block = readme.split("<!-- test-command -->", 1)[1].split("<!-- /test-command -->", 1)[0]
    return block.strip().strip("`").strip()


def commands():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    out = []
    for name in READMES:
        for info, line in fenced_commands(os.path.join(REPO, name)):
            if info in ("text", "python"):
                continue
            if line == readme_test_command(readme):
                continue  # the command this test runs under
            out.append((name, line))
    return out


def classify(line):
    if "pip install" in line:
        return "install"
    if any(line.startswith(start) for start in NOT_RUN):
        return "not run"
    if re.search(r"\bbash (/path/to/)?recipes/\S+\.sh", line):
        return "dry run"
    return "run"


def test_every_fenced_command_line_is_classified_and_not_run_lines_still_exist():
    found = commands()
    assert found, "no fenced command lines found"
    lines = [line for _, line in found]
    for start in NOT_RUN:  # a stale entry would hide nothing, but must not accumulate
        assert any(line.startswith(start) for line in lines), f"NOT_RUN entry no longer in a README: {start}"


def test_the_quick_start_installs_what_ci_installs():
    quick = [line for _, line in commands() if classify(line) == "install"]
    assert len(quick) == 1
    ci = open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read()
    for piece in ('pip install -e ".[test]" -r .ci/stacks/current.txt', "pip install --no-deps llava-torch==1.2.2.post1",
                  "PIP_CONSTRAINT"):
        assert piece in quick[0]
    assert 'pip install -q -e ".[test]" -r ".ci/stacks/$stack.txt"' in ci and "llava-torch==1.2.2.post1" in ci


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A fresh folder laid out like a clone (recipes/ and patches/ beside the work), with a tiny LLaVA
    checkpoint where the recipes README's convert line reads one."""
    from meteor_plugin.testing.checkpoint import save_tiny_llava_checkpoint

    root = tmp_path_factory.mktemp("readme")
    for folder in ("recipes", "patches"):
        shutil.copytree(os.path.join(REPO, folder), root / folder)
    save_tiny_llava_checkpoint(str(root / "checkpoints"), name="llava-v1.5-13b")
    return root


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DS_ACCELERATOR="cpu")
    bin_dir = os.path.dirname(sys.executable)  # meteor-plugin and python of this environment first
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    return env


def _run(line, cwd, env, timeout=600):
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _quick_start_tail(line):
    """The quick start's commands after its install steps (CI runs the install itself)."""
    steps = [s.strip() for s in line.split("&&")]
    return " && ".join(s for s in steps if not re.match(r"(python3 -m venv|\. |export |pip )", s))


@pytest.mark.parametrize("where,line", commands(), ids=lambda v: v if len(v) < 40 else v[:37] + "...")
def test_documented_command_runs(workdir, where, line):
    kind = classify(line)
    env = _env()
    if kind == "not run":
        pytest.skip(next(reason for start, reason in NOT_RUN.items() if line.startswith(start)))
    if kind == "install":
        line = _quick_start_tail(line)
        assert line == "meteor-plugin demo"
    if kind == "dry run":
        for placeholder, value in NODE_ZERO.items():
            line = line.replace(placeholder, value)
        if line.startswith("srun "):  # SLURM starts the line once per node: node 0 here
            env.update(SLURM_NNODES="4", SLURM_PROCID="0", MASTER_ADDR="node0")
            line = line[line.index("bash "):]
        env.update(DRY_RUN="1", DATA=env.get("DATA", "data.json"), IMAGES=env.get("IMAGES", "images"))
    done = _run(line, str(workdir), env)
    assert done.returncode == 0, f"{where}: {line}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    if kind == "dry run":
        launched = done.stdout.strip().splitlines()[-1]
        assert "meteor_plugin.train" in launched and "--model_name_or_path" in launched, launched
        if "NNODES=4" in shlex.split(line) or line.startswith("bash ") and "SLURM_NNODES" in env:
            assert "--nnodes 4" in launched or "--num_machines 4" in launched, launched
