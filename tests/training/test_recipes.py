"""The GPU recipes cannot run here; what can be checked is that each one builds a command whose flags the
entry and upstream's argument parser accept, and that the DeepSpeed files are valid DeepSpeed configs."""

import glob
import json
import os
import shlex
import subprocess

import pytest

from meteor_plugin.compat import training as compat
from meteor_plugin.training import arguments

from training_support import REPO

RECIPES = sorted(glob.glob(os.path.join(REPO, "recipes", "llava-1.5", "*-*.sh")) +
                 glob.glob(os.path.join(REPO, "recipes", "eagle", "*-*.sh")))
DEEPSPEED = sorted(glob.glob(os.path.join(REPO, "recipes", "deepspeed", "*.json")) +
                   glob.glob(os.path.join(REPO, "recipes", "tiny", "*.json")))


def _dry_run(script, **env):
    full = dict(os.environ, DRY_RUN="1", DATA="data.json", IMAGES="images", **env)
    out = subprocess.run(["bash", script, "run1", "--save_steps", "100"], env=full, cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert out.returncode == 0, out.stderr
    return shlex.split(out.stdout)


def test_there_is_a_recipe_for_each_model_and_mode():
    names = {os.path.relpath(p, os.path.join(REPO, "recipes")) for p in RECIPES}
    assert names == {f"eagle/x{v}-{s}-{m}.sh" for v in (4, 5) for s in ("7b", "13b") for m in ("full", "lora")} | \
        {f"llava-1.5/{s}-{m}.sh" for s in ("7b", "13b") for m in ("lora", "qlora")}
    for path in RECIPES + [os.path.join(REPO, "recipes", "tiny-cpu.sh")]:
        with open(path) as fh:
            assert "# Hardware:" in fh.read(), path


@pytest.mark.parametrize("script", RECIPES, ids=lambda p: os.path.relpath(p, os.path.join(REPO, "recipes")))
def test_each_recipe_builds_flags_the_entry_and_upstreams_parser_accept(script):
    import transformers

    from meteor_plugin.training.hooks import prepare_imports

    prepare_imports()
    import llava.train.train as train

    cmd = _dry_run(script)
    assert cmd[:1] == ["torchrun"] and cmd[cmd.index("-m") + 1] == "meteor_plugin.train"
    argv = cmd[cmd.index("-m") + 2:]
    opts = arguments.pop_options(argv)
    assert opts.codebase == ("eagle" if "/eagle/" in script else "auto")
    argv = compat.translate_flags(argv, transformers.TrainingArguments)
    parser = transformers.HfArgumentParser((train.ModelArguments, train.DataArguments, train.TrainingArguments))
    namespace, unknown = parser.parse_known_args(argv)
    assert unknown == []
    assert os.path.isfile(namespace.deepspeed) and namespace.save_steps == 100  # flags after the run name win
    assert namespace.lora_enable == ("lora" in os.path.basename(script))
    assert namespace.bits == (4 if "qlora" in script else 16)


def test_the_launcher_choices_and_multi_node_settings():
    script = os.path.join(REPO, "recipes", "llava-1.5", "7b-lora.sh")
    cmd = _dry_run(script, NNODES="4", NODE_RANK="3", MASTER_ADDR="node0")
    assert cmd[:11] == ["torchrun", "--nproc_per_node", "8", "--nnodes", "4", "--node_rank", "3", "--master_addr",
                        "node0", "--master_port", "25031"]
    cmd = _dry_run(script, LAUNCHER="deepspeed", HOSTFILE="hosts")
    assert cmd[:4] == ["deepspeed", "--hostfile", "hosts", "--master_addr"] and "--module" in cmd
    cmd = _dry_run(script, LAUNCHER="accelerate", NNODES="2", GPUS_PER_NODE="4")
    assert cmd[:2] == ["accelerate", "launch"] and cmd[cmd.index("--num_processes") + 1] == "8"
    out = subprocess.run(["bash", script, "run1"], env=dict(os.environ, DRY_RUN="1"), cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert out.returncode != 0 and "set DATA" in out.stderr


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: os.path.relpath(p, os.path.join(REPO, "recipes")))
def test_deepspeed_files_are_valid_zero_configs(path):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    with open(path) as fh:
        config = json.load(fh)
    zero = {k: (1 if v == "auto" else v) for k, v in config["zero_optimization"].items()}
    parsed = DeepSpeedZeroConfig(**zero)  # unknown keys and wrong types are errors
    assert parsed.stage == (2 if "zero2" in path else 3)
    if parsed.stage == 3:
        assert parsed.gather_16bit_weights_on_model_save  # save_model writes whole weights, not shards only
    if "offload" in path:
        assert parsed.offload_param.device == "cpu" and parsed.offload_optimizer.device == "cpu"
