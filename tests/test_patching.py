"""enable/disable, version and structure checks, config persistence, the import hook and the runner."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import meteor_plugin
from meteor_plugin import MeteorConfig
from meteor_plugin.compat import transformers as compat
from meteor_plugin.entry import enable_from_argv
from meteor_plugin.adapters.family import StructureError
from meteor_plugin.adapters.shared.llava_arch import ArchTarget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_untested_transformers_version_is_refused_with_the_supported_range(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.40.0")
    monkeypatch.delenv("METEOR_ALLOW_UNTESTED_TRANSFORMERS", raising=False)
    with pytest.raises(compat.UnsupportedVersionError, match=r"4\.37\.2 .*4\.44\.2 .*5\.0-5\.23\.0.*has transformers 4\.40\.0"):
        meteor_plugin.enable()
    assert not meteor_plugin.is_enabled()
    with pytest.warns(UserWarning, match="untested versions were explicitly allowed"):
        meteor_plugin.enable(allow_untested_transformers=True)
    assert meteor_plugin.is_enabled()


def test_nothing_to_patch_is_an_error(monkeypatch):
    from meteor_plugin.adapters.hf_llava import TransformersLlavaTarget
    from meteor_plugin.adapters.qwen_vl.target import QwenVLTarget

    monkeypatch.setattr(ArchTarget, "is_installed", lambda self: False)
    monkeypatch.setattr(TransformersLlavaTarget, "is_installed", lambda self: False)
    monkeypatch.setattr(QwenVLTarget, "is_installed", lambda self: False)
    with pytest.raises(RuntimeError, match="found nothing to patch: install LLaVA"):
        meteor_plugin.enable()


def test_unrecognised_model_structure_names_what_is_missing(tmp_path, monkeypatch):
    pkg = tmp_path / "oddllava" / "model" / "language_model"
    pkg.mkdir(parents=True)
    for d in (tmp_path / "oddllava", tmp_path / "oddllava" / "model", pkg):
        (d / "__init__.py").write_text("")
    (pkg / "odd_llama.py").write_text(textwrap.dedent("""
        class OddForCausalLM:
            def get_model(self): pass
            def encode_images(self, images): pass
            def forward(self): pass
            def generate(self): pass
        class OddModel:
            def forward(self): pass
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    target = ArchTarget("odd", "oddllava.model.language_model.odd_llama", "OddForCausalLM", "OddModel")
    assert target.is_installed()
    from meteor_plugin.registry import PatchRegistry

    with pytest.raises(StructureError, match="OddForCausalLM has no prepare_inputs_labels_for_multimodal"):
        target.patch(PatchRegistry())
    missing = ArchTarget("odd", "oddllava.model.language_model.odd_llama", "OddForCausalLM", "NoSuchModel")
    with pytest.raises(StructureError, match="odd_llama has no NoSuchModel"):
        missing.patch(PatchRegistry())


def test_language_model_without_llama_layers_fails_at_first_forward():
    from meteor_plugin.registry import PatchRegistry
    from meteor_plugin.stages.decoder import DecoderPruner

    with pytest.raises(RuntimeError, match="has no decoder `layers`"):
        DecoderPruner.attach(torch.nn.Linear(2, 2), PatchRegistry())


def test_a_projection_missing_from_the_scoring_layer_is_named_at_the_first_forward(tiny_llava):
    from meteor_plugin.testing.llava import make_batch

    model = tiny_llava()
    del model.get_model().layers[2].self_attn.k_proj  # the scoring layer (llm_layer=2), not layer 0
    meteor_plugin.enable(encoder=False, llm=True, llm_layer=2)
    ids, mask, images = make_batch([(3, 5)], [True], seed=1)
    with pytest.raises(RuntimeError, match="has no `k_proj` projection"):
        model(input_ids=ids, attention_mask=mask, images=images)


def test_config_is_stored_in_the_model_and_reloads_from_a_saved_checkpoint(tiny_llava, tmp_path):
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM
    from meteor_plugin.runtime import pruning_config as config_for
    from meteor_plugin.testing.llava import make_batch

    model = tiny_llava()
    chosen = MeteorConfig(encoder=False, fusion=False, llm_layer=3, llm_max_keep=20, llm_lambda=11.0)
    meteor_plugin.enable(chosen)
    ids, mask, images = make_batch([(2, 4)], [True])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, images=images)
    assert model.config.meteor == chosen.to_dict()
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["meteor"] == chosen.to_dict()
    meteor_plugin.disable()
    meteor_plugin.enable()  # no config: each model uses its own
    reloaded = LlavaLlamaForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert config_for(reloaded) == chosen
    # Overrides apply on top of the checkpoint's config; a later enable does not inherit them.
    meteor_plugin.enable(llm_max_keep=5)
    assert config_for(reloaded) == chosen.replace(llm_max_keep=5)
    meteor_plugin.enable(llm_lambda=2.0)
    assert config_for(reloaded) == chosen.replace(llm_lambda=2.0)


def test_enable_from_argv_takes_its_options_out_of_argv(tmp_path):
    path = tmp_path / "cfg.json"
    MeteorConfig(llm_layer=3).save(path)
    argv = ["script.py", "--model-path", "x", "--meteor-config", str(path), "--meteor-set", "llm_max_keep=12",
            "--meteor-set=text_query=last", "--meteor_encoder", "false", "--temperature", "0"]
    cfg = enable_from_argv(argv)
    assert argv == ["script.py", "--model-path", "x", "--temperature", "0"]
    assert cfg == MeteorConfig(llm_layer=3, llm_max_keep=12, text_query="last", encoder=False)
    with pytest.raises(SystemExit, match="--meteor-llm takes true or false, got 'maybe'"):
        enable_from_argv(["s.py", "--meteor-llm", "maybe"])
    assert meteor_plugin.is_enabled()


def _run(code_or_args, env_extra, cwd):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + str(cwd), **env_extra}
    return subprocess.run([sys.executable, *code_or_args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def run_here(tmp_path, monkeypatch, capsys):
    """``python ARGS`` for the runner (``-m meteor_plugin.run ...``) and for a patched entry point (a script path), in
    this process: the runner's own parsing and enabling, then the module or script run as ``__main__`` by runpy, as
    the interpreter would. A process costs seconds of imports; each test below still starts one real process."""
    import runpy

    from meteor_plugin import run

    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))

    def go(args, env=None):
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        code = 0
        try:
            if args[:2] == ["-m", "meteor_plugin.run"]:
                run.main(args[2:])
            else:
                sys.argv = list(args)
                runpy.run_path(str(tmp_path / args[0]), run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            if not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        except ImportError as exc:
            code = 1
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        out, err = capsys.readouterr()
        meteor_plugin.disable()
        return subprocess.CompletedProcess(args, code, out, err)

    return go


def test_meteor_config_variable_makes_the_import_enable_the_plugin(tmp_path):
    """(A bad config in the variable: tests/test_config_errors.py.)"""
    path = tmp_path / "cfg.yaml"
    path.write_text("llm_layer: 3\nllm_max_keep: 16\n")
    code = ("import meteor_plugin, json; from meteor_plugin.runtime import ACTIVE; "
            "print(json.dumps([meteor_plugin.is_enabled(), ACTIVE.config.llm_max_keep]))")
    out = _run(["-c", code], {"METEOR_CONFIG": str(path)}, tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, 16]


PROBE_SCRIPT = """
    import sys, json, meteor_plugin
    from meteor_plugin.runtime import ACTIVE
    if __name__ == "__main__":
        print(json.dumps([meteor_plugin.is_enabled(), sys.argv[1:], ACTIVE.config.llm_layer if ACTIVE.config else None]))
"""


def test_runner_runs_a_module_as_main_with_the_plugin_enabled(tmp_path, run_here):
    (tmp_path / "probe_script.py").write_text(textwrap.dedent(PROBE_SCRIPT))
    cfg = tmp_path / "c.json"
    MeteorConfig(llm_layer=3).save(cfg)
    out = _run(["-m", "meteor_plugin.run", "--meteor-config", str(cfg), "probe_script", "--flag", "1"], {}, tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, ["--flag", "1"], 3]
    out = run_here(["-m", "meteor_plugin.run", "--meteor-set", "llm_layer=3", "--local_rank=1", "probe_script", "x"])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, ["--local_rank=1", "x"], None]
    out = run_here(["-m", "meteor_plugin.run"])
    assert out.returncode != 0 and "usage: python -m meteor_plugin.run" in out.stderr
    out = run_here(["-m", "meteor_plugin.run", "--verbose", "probe_script"])
    assert out.returncode != 0 and "unknown option(s) before MODULE: --verbose" in out.stderr


def test_an_explicit_meteor_config_wins_over_the_environment(tmp_path, run_here):
    (tmp_path / "probe_entry.py").write_text(textwrap.dedent("""
        import sys, json
        import meteor_plugin.entry
        meteor_plugin.entry.enable_from_argv()
        from meteor_plugin.runtime import ACTIVE
        if __name__ == "__main__":
            print(json.dumps([ACTIVE.config and ACTIVE.config.llm_layer, ACTIVE.overrides, sys.argv[1:]]))
    """))
    good, env = tmp_path / "good.json", tmp_path / "env.json"
    MeteorConfig(llm_layer=3).save(good)
    MeteorConfig(llm_layer=5).save(env)
    stale = {"METEOR_CONFIG": str(tmp_path / "gone.json")}
    out = _run(["probe_entry.py", "--meteor-config", str(good), "x"], stale, tmp_path)  # a patched entry point
    assert out.returncode == 0, out.stderr  # the import skipped the stale variable: the command line names a config
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [3, {}, ["x"]]
    for spelling in (["--meteor-config", str(good)], [f"--meteor_config={good}"]):
        out = run_here(["-m", "meteor_plugin.run", *spelling, "probe_script_env"], stale)
        assert out.returncode != 0 and "No module named probe_script_env" in out.stderr  # got past the config
        out = run_here(["-m", "meteor_plugin.run", *spelling, "probe_entry", "x"], stale)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1]) == [3, {}, ["x"]]
        out = run_here(["probe_entry.py", *spelling, "x"], stale)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1]) == [3, {}, ["x"]]
    # Without --meteor-config the variable is the config, and --meteor-set applies on top of it.
    out = run_here(["-m", "meteor_plugin.run", "--meteor-set", "llm_max_keep=16", "probe_entry"],
                   {"METEOR_CONFIG": str(env)})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [5, {"llm_max_keep": 16}, []]


def test_runner_takes_both_spellings_of_local_rank(tmp_path, run_here):
    (tmp_path / "probe_rank.py").write_text("import sys, json\nprint(json.dumps(sys.argv[1:]))\n")
    out = _run(["-m", "meteor_plugin.run", "--local-rank", "0", "probe_rank", "x"], {}, tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["--local-rank", "0", "x"]
    for flag in (["--local-rank", "0"], ["--local-rank=0"], ["--local_rank", "0"]):
        out = run_here(["-m", "meteor_plugin.run", *flag, "probe_rank", "x"])
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout.strip().splitlines()[-1]) == [*flag, "x"]


def test_runner_reports_a_bad_config_in_one_line_and_exits_2(tmp_path, run_here):
    (tmp_path / "probe_never.py").write_text("print('ran')\n")
    bad = tmp_path / "bad.json"
    bad.write_text('{"llm_max_keep": 1.5}')
    out = _run(["-m", "meteor_plugin.run", "--meteor-config", str(bad), "probe_never"], {}, tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "ran" not in out.stdout
    assert [line for line in out.stderr.splitlines() if line.strip()] == [
        line for line in out.stderr.splitlines() if line.startswith("meteor_plugin.run: error: ")]
    assert "llm_max_keep=1.5 is invalid" in out.stderr
    for args in (["--meteor-config", str(bad)], ["--meteor-set", "text_query=first"],
                 ["--meteor-config", str(tmp_path / "missing.json")]):
        out = run_here(["-m", "meteor_plugin.run", *args, "probe_never"])
        assert out.returncode == 2, out.stderr
        lines = [line for line in out.stderr.splitlines() if line.startswith("meteor_plugin.run: error: ")]
        assert len(lines) == 1 and "Traceback" not in out.stderr and "ran" not in out.stdout


@pytest.mark.parametrize("module,codebase,attn", [("llava.train.train_mem", "llava", "flash_attention_2"),
                                                  ("train", "eagle", "sdpa")])
def test_runner_sends_training_modules_through_the_training_entry(monkeypatch, module, codebase, attn):
    """``deepspeed --module meteor_plugin.run ... llava.train.train_mem`` as patches/README.md documents it:
    upstream's train() needs the entry's fixes (it failed on transformers 5 with ALL_LAYERNORM_LAYERS)."""
    from meteor_plugin import run, train

    seen = []
    monkeypatch.setattr(train, "run_program", lambda argv: seen.append(argv))
    run.main(["--meteor-config", "m.json", "--local_rank=1", module, "--model_name_or_path", "x"])
    assert seen == [["--meteor-config", "m.json", "--local_rank=1", "--meteor-codebase", codebase,
                     "--meteor-attn", attn, "--model_name_or_path", "x"]]
    assert not meteor_plugin.is_enabled()  # the entry enables it, after its own set-up
