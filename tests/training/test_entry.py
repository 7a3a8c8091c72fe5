"""python -m meteor_plugin.train: its flags, --help, what it installs into LLaVA's train module, and how it
picks the codebase."""

import os
import subprocess
import sys

import pytest

import meteor_plugin
from meteor_plugin.train import attention_implementation
from meteor_plugin.adapters import eagle, llava
from meteor_plugin.adapters.eagle import training as eagle_training
from meteor_plugin import adapters
from meteor_plugin.training import arguments, hooks

from training_support import REPO, transformers_major


def test_meteor_flags_are_taken_out_of_argv_in_both_spellings():
    argv = ["--local_rank=1", "--meteor-config", "m.yaml", "--model_name_or_path", "x", "--meteor_llm", "false",
            "--meteor-set", "llm_max_keep=0.25", "--meteor_set=method=random", "--mm_vision_select_layer", "-2",
            "--meteor-encoder=TRUE", "--meteor-attn", "eager", "--meteor-codebase", "llava"]
    opts = arguments.pop_options(argv)
    assert argv == ["--local_rank=1", "--model_name_or_path", "x", "--mm_vision_select_layer", "-2"]
    assert opts.config == "m.yaml" and opts.attn == "eager" and opts.codebase == "llava" and not opts.off
    assert opts.overrides == {"llm": False, "llm_max_keep": 0.25, "method": "random", "encoder": True}


@pytest.mark.parametrize("argv, message", [
    (["--meteor-llm", "maybe"], "takes true or false"),
    (["--meteor-config"], "needs a value"),
    (["--meteor-set", "llm_max_keep"], "FIELD=VALUE"),
    (["--meteor-attn", "flash"], "sdpa, flash_attention_2, eager"),
    (["--meteor-off=1"], "takes no value"),
])
def test_bad_meteor_flags_say_what_is_wrong(argv, message):
    with pytest.raises(SystemExit, match=message):
        arguments.pop_options(argv)


def test_meteor_off_cannot_be_combined_with_settings_and_codebases_are_checked():
    from meteor_plugin.train import main

    with pytest.raises(SystemExit, match="meteor-off trains without pruning"):
        main(["--meteor-off", "--meteor-llm", "false"])
    with pytest.raises(SystemExit, match="unknown codebase 'llava2': choose from eagle, llava"):
        main(["--meteor-codebase", "llava2"])


def test_help_lists_the_meteor_flags_with_upstreams():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "meteor_plugin.train", "--help"], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    for flag in ("--meteor_config", "--meteor_encoder", "--meteor_fusion", "--meteor_llm", "--meteor_set",
                 "--meteor_attn", "--lora_enable", "--model_name_or_path", "--deepspeed"):
        assert flag in out.stdout, flag
    assert "Stage 3 (text-guided pruning inside the language model)" in " ".join(out.stdout.split())


def test_flash_attention_2_is_refused_where_it_cannot_run():
    from transformers.utils import is_flash_attn_2_available

    if is_flash_attn_2_available():
        pytest.skip("FlashAttention-2 is usable here")
    with pytest.raises(SystemExit, match="FlashAttention-2 is not usable here"):
        attention_implementation("flash_attention_2")
    assert attention_implementation("sdpa") == "sdpa"


def test_install_replaces_llavas_train_globals_and_trainings_own_scope_restores_them():
    hooks.prepare_imports()
    import llava.train.train as train

    before = {name: getattr(train, name) for name in ("ModelArguments", "TrainingArguments", "find_all_linear_names",
                                                      "safe_save_model_for_hf_trainer", "LLaVATrainer",
                                                      "LlavaLlamaForCausalLM")}
    session = hooks.install(train, llava.TRAINING)
    assert train.find_all_linear_names.__name__ == "target_regex"
    assert train.LLaVATrainer.meteor_session is session and issubclass(train.LLaVATrainer, before["LLaVATrainer"])
    assert {"meteor_config", "meteor_llm"} <= set(train.ModelArguments.__dataclass_fields__)
    assert train.LlavaLlamaForCausalLM.meteor_wrapped is before["LlavaLlamaForCausalLM"]
    hooks.install(train, llava.TRAINING)  # a second run in the same process wraps nothing twice
    assert train.LLaVATrainer.__mro__[2] is before["LLaVATrainer"]
    meteor_plugin.disable()  # the user's switch: training's changes are not its to undo
    assert train.find_all_linear_names.__name__ == "target_regex"
    hooks.uninstall()
    assert {name: getattr(train, name) for name in before} == before
    with hooks.installed(train, llava.TRAINING) as session:
        assert train.LLaVATrainer.meteor_session is session
    assert {name: getattr(train, name) for name in before} == before


def test_the_codebase_is_llava_here_and_eagle_from_an_eagle_checkout(tmp_path, monkeypatch):
    from meteor_plugin.testing import eagle_like

    # Other tests put the EAGLE stand-in (an eagle package and a train.py) on sys.path: take it away.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not eagle_like._same_dir(p or ".", eagle_like.ROOT)])
    for name in [m for m in sys.modules if m == "eagle" or m.startswith("eagle.") or m == "train"]:
        monkeypatch.delitem(sys.modules, name)
    assert adapters.spec_for_training("auto") is llava.TRAINING
    with pytest.raises(RuntimeError, match="root of an EAGLE checkout"):
        adapters.spec_for_training("eagle")
    # An EAGLE-shaped root: eagle/model/language_model/eagle_llama.py and a train.py with EAGLE's names.
    root = tmp_path / "EAGLE"
    package = root / "eagle" / "model" / "language_model"
    package.mkdir(parents=True)
    for folder in (root / "eagle", root / "eagle" / "model", package):
        (folder / "__init__.py").write_text("")
    (package / "eagle_llama.py").write_text("")
    (root / "train.py").write_text("class ModelArguments: ...\nEagleTrainer = None\n"
                                   "def safe_save_model_for_hf_trainer(trainer, output_dir): ...\n"
                                   "def train(attn_implementation=None): ...\n")
    monkeypatch.syspath_prepend(str(root))
    assert eagle_training.eagle_train_script() == str(root / "train.py")
    assert adapters.spec_for_training("auto") is eagle.TRAINING
    (root / "train.py").write_text("def train(): ...\n")  # another project's train.py
    assert eagle_training.eagle_train_script() is None


def test_checkpoints_are_matched_to_their_codebase():
    assert adapters.spec_for_checkpoint({"model_type": "llava_llama"}) is llava.TRAINING
    assert adapters.spec_for_checkpoint({"architectures": ["EagleLlamaForCausalLM"]}) is eagle.TRAINING
    with pytest.raises(ValueError, match="not a checkpoint of a codebase meteor-plugin knows"):
        adapters.spec_for_checkpoint({"model_type": "llama"}, "vicuna-7b")


def test_main_enables_the_plugin_with_the_flags_and_hands_the_rest_to_upstream(monkeypatch, tmp_path):
    """The entry up to upstream's train(), with a stand-in for LLaVA's train module."""
    import types

    import transformers

    from meteor_plugin import runtime
    from meteor_plugin.train import main

    config = tmp_path / "m.json"
    config.write_text('{"encoder_keep": 12}')
    seen = {}

    def train(attn_implementation=None):  # training runs in a scope of its own: the global switch stays off
        scope = runtime.current_scope()
        seen.update(argv=list(sys.argv[1:]), attn=attn_implementation, enabled=meteor_plugin.is_enabled(),
                    config=scope.config if scope else None, overrides=dict(scope.overrides) if scope else {},
                    global_switch=runtime.ACTIVE.enabled)

    module = types.ModuleType("llava_train_stand_in")
    module.__file__ = "train.py"
    module.train = train
    module.ModelArguments = type("ModelArguments", (), {})
    module.TrainingArguments = transformers.TrainingArguments
    module.find_all_linear_names = lambda model: []
    module.safe_save_model_for_hf_trainer = lambda trainer, output_dir: None
    module.LLaVATrainer = transformers.Trainer
    module.LlavaLlamaForCausalLM = object
    monkeypatch.setattr(llava.TRAINING, "import_train_module", lambda: module)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() hands upstream its own sys.argv
    monkeypatch.setattr(hooks, "install", lambda module, codebase: hooks.Session(codebase))

    # --meteor-codebase llava: "auto" would pick EAGLE's stand-in where other tests have put it on sys.path
    assert main(["--meteor-config", str(config), "--meteor-llm", "false", "--meteor-set", "encoder_shallow_share=1.0",
                 "--meteor-attn", "eager", "--meteor-codebase", "llava", "--warmup_ratio", "0.1",
                 "--output_dir", "out"]) == 0
    assert seen["enabled"] and seen["attn"] == "eager" and not seen["global_switch"]
    assert seen["config"].encoder_keep == 12 and seen["overrides"] == {"llm": False, "encoder_shallow_share": 1.0}
    assert seen["argv"] == (["--warmup_steps", "0.1"] if transformers_major() >= 5 else ["--warmup_ratio", "0.1"]) + \
        ["--output_dir", "out"]

    assert not meteor_plugin.is_enabled()  # the scope ended with the run
    assert main(["--meteor-off", "--meteor-codebase", "llava", "--output_dir", "out"]) == 0
    assert not seen["enabled"]


def test_a_finished_distributed_run_exits_with_its_code_after_running_atexit_handlers(tmp_path):
    """The entry ends distributed runs without interpreter finalization (where gloo ranks could abort);
    what atexit would have done still happens, and the exit code is kept."""
    marker = tmp_path / "atexit-ran"
    script = (
        "import atexit, os, sys\n"
        "import torch.distributed as dist\n"
        "from meteor_plugin.train import exit_program, shutdown_distributed\n"
        "os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=sys.argv[2])\n"
        "dist.init_process_group('gloo', rank=0, world_size=1)\n"
        "atexit.register(lambda: open(sys.argv[1], 'w').write('yes'))\n"
        "print('about to exit', flush=True)\n"
        "exit_program(3, shutdown_distributed())\n"
        "print('not reached')\n"
    )
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script, str(marker), port], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=120)
    assert out.returncode == 3, out.stdout
    assert "about to exit" in out.stdout and "not reached" not in out.stdout
    assert marker.read_text() == "yes"
