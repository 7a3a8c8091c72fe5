"""Helpers of the training tests: the tiny workspace and the recipe runs, each launched once per session.

The workspace is what ``recipes/tiny-cpu.sh`` prepares (a tiny LLaVA, 16 generated images), converted
with a non-default METEOR config, so the runs show that training reads the config stored by ``convert``:
Stage 1 keeps 24 of 64 CLIP patches (the default would keep 32). ``EagleWorkspace`` is the same with
``CODEBASE=eagle``: a tiny EAGLE-like model of three encoders (the test stand-in), whose stored config
keeps 192 encoder tokens split 1:2:1 by rank, 48 after fusion and at most 24 in the LLM.
"""

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RECIPE = os.path.join(REPO, "recipes", "tiny-cpu.sh")
HARNESS = os.path.join(REPO, "tests", "training", "training_run.py")
STORED = {"encoder_keep": 24, "llm_max_keep": 0.5, "llm_layer": 2}
ENCODER_KEPT = 24
STORED_EAGLE = {"encoder_keep": 192, "fusion_keep": 48, "llm_max_keep": 0.5, "llm_layer": 2,
                "encoder_ranks": {"clip-448": 1.0, "convnext-1024": 2.0, "pix2struct-1024": 1.0}}
EAGLE_KEPT = {"encoder": 192, "fusion": 48}
# The language model's linear layers: where LoRA adapters may go, and nowhere else.
LLM_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)$")


def adapter_modules(folder: str) -> List[str]:
    """The modules a saved LoRA adapter (``adapter_model.safetensors``) puts adapters on."""
    from safetensors.torch import load_file

    keys = load_file(os.path.join(folder, "adapter_model.safetensors")).keys()
    return sorted({k.split(".lora_")[0] for k in keys})


def transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


@dataclass
class Run:
    name: str
    out: str
    returncode: int
    log: str
    seconds: float
    probe_path: Optional[str] = None
    _probe: Optional[dict] = None

    @property
    def probe(self) -> dict:
        if self._probe is None:
            assert self.probe_path and os.path.isfile(self.probe_path), f"{self.name}: no probe written\n{self.tail()}"
            self._probe = torch.load(self.probe_path, weights_only=False)
        return self._probe

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-n:])

    def require_success(self) -> "Run":
        assert self.returncode == 0, f"{self.name} failed ({self.returncode}):\n{self.tail()}"
        return self

    def log_history(self) -> List[dict]:
        with open(os.path.join(self.out, "trainer_state.json"), encoding="utf-8") as fh:
            return json.load(fh)["log_history"]

    def losses(self) -> List[float]:
        return [entry["loss"] for entry in self.log_history() if "loss" in entry]


def _launcher_command(script: str, module: str) -> str:
    """This interpreter's launcher script, or its module form where the script is missing."""
    path = os.path.join(os.path.dirname(sys.executable), script)
    return path if os.path.isfile(path) else f"{sys.executable} -m {module}"


@dataclass
class Workspace:
    root: str
    runs: Dict[str, Run] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return os.path.join(self.root, "models", "tiny-llava-v1-meteor")

    @property
    def original(self) -> str:
        return os.path.join(self.root, "models", "tiny-llava-v1")

    def env(self, **extra: str) -> Dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update(PYTHON=sys.executable, DEEPSPEED=_launcher_command("deepspeed", "deepspeed.launcher.runner"),
                   TORCHRUN=_launcher_command("torchrun", "torch.distributed.run"),
                   ACCELERATE=_launcher_command("accelerate", "accelerate.commands.accelerate_cli"), ENTRY=HARNESS,
                   DS_ACCELERATOR="cpu",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.update(extra)
        return env

    def launch(self, name: str, out: str, probe: bool = True, args: tuple = (), **env: str) -> Run:
        """Run the tiny recipe (ZERO, LORA, BITS, METEOR_TEST_* in ``env``; ``args`` appended to its train.py
        flags, later ones win) and keep its result under ``name``."""
        if name in self.runs:
            return self.runs[name]
        probe_path = os.path.join(self.root, f"{name}.probe.pt") if probe else None
        extra = dict(env, OUT=out)
        if probe_path:
            extra["METEOR_TEST_PROBE"] = probe_path
        start = time.time()
        proc = subprocess.run(["bash", RECIPE, self.root, *args], env=self.env(**extra), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=600)
        run = Run(name, out, proc.returncode, proc.stdout, time.time() - start, probe_path)
        with open(os.path.join(self.root, f"{name}.log"), "w", encoding="utf-8") as fh:
            fh.write(proc.stdout)
        self.runs[name] = run
        return run

    # The runs several test files use ---------------------------------------------------------------------
    def zero2_crashed(self) -> Run:
        """ZeRO-2, killed while saving checkpoint-4 (checkpoint-2 is whole)."""
        return self.launch("zero2-crash", os.path.join(self.root, "zero2"), probe=False, ZERO="2",
                           METEOR_TEST_CRASH_STEP="4")

    def zero2(self) -> Run:
        """The same ZeRO-2 command again after the crash: resumes from checkpoint-2 and finishes."""
        self.zero2_crashed()
        return self.launch("zero2", os.path.join(self.root, "zero2"), ZERO="2")

    def zero3(self) -> Run:
        return self.launch("zero3", os.path.join(self.root, "zero3"), ZERO="3")

    def lora(self) -> Run:
        # "llava" and "lora" in the name: what LLaVA's own loader needs to take its LoRA branch.
        return self.launch("lora", os.path.join(self.root, "tiny-llava-v1-lora"), ZERO="3", LORA="1")

    def qlora(self) -> Run:
        # Two steps and no intermediate checkpoints: 4-bit steps are slow on CPU, and saving is tested elsewhere.
        return self.launch("qlora", os.path.join(self.root, "tiny-llava-v1-qlora"), ZERO="2", BITS="4",
                           args=("--max_steps", "2", "--save_strategy", "no"))



class EagleWorkspace(Workspace):
    """The tiny recipe with CODEBASE=eagle: the EAGLE stand-in's train.py driven by the same entry."""

    @property
    def model(self) -> str:
        return os.path.join(self.root, "models", "tiny-eagle-x3-meteor")

    @property
    def original(self) -> str:
        return os.path.join(self.root, "models", "tiny-eagle-x3")

    @property
    def config_file(self) -> str:
        return os.path.join(self.root, "meteor.json")

    def launch(self, name: str, out: str, probe: bool = True, args: tuple = (), **env: str) -> Run:
        return super().launch(name, out, probe, args, CODEBASE="eagle", **env)

    # Only the final model is examined: intermediate saves are left out (time).
    def zero2(self) -> Run:
        """ZeRO-2 from the converted checkpoint (per-encoder projectors made by `meteor-plugin convert`)."""
        return self.launch("eagle-zero2", os.path.join(self.root, "zero2"), ZERO="2", args=("--save_strategy", "no"))

    def zero3(self) -> Run:
        """ZeRO-3 from the original checkpoint: the projectors are split in training, from a partitioned one."""
        return self.launch("eagle-zero3", os.path.join(self.root, "zero3"), ZERO="3",
                           args=("--save_strategy", "no", "--model_name_or_path", self.original,
                                 "--meteor-config", self.config_file))

    def lora(self) -> Run:
        # "eagle" and "lora" in the name: what EAGLE's own loader needs to take its LoRA branch.
        return self.launch("eagle-lora", os.path.join(self.root, "tiny-eagle-x3-lora"), ZERO="3", LORA="1",
                           args=("--save_strategy", "no"))


def converted_by_transformers(model, skip, monkeypatch):
    """The linear layers this transformers' own bitsandbytes code would quantise given ``skip`` (each
    generation matches differently: 4.37 substring, 4.44 ``key + "."`` inside the path, 5.x regex from the
    start or suffix)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if transformers_major() >= 5:
        from transformers.quantizers.quantizers_utils import should_convert_module

        return [n for n in linears if should_convert_module(n, skip)]
    # 4.x matches inside _replace_with_bnb_linear; run it with stand-in bnb layers (no bitsandbytes needed).
    import types

    import transformers.integrations.bitsandbytes as hf_bnb

    class Linear8bitLt(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

    monkeypatch.setattr(hf_bnb, "bnb", types.SimpleNamespace(nn=types.SimpleNamespace(Linear8bitLt=Linear8bitLt)),
                        raising=False)
    # 4.37 imports these only when bitsandbytes is installed
    from accelerate import init_empty_weights
    from transformers.pytorch_utils import Conv1D

    for name, value in (("nn", torch.nn), ("Conv1D", Conv1D), ("init_empty_weights", init_empty_weights)):
        if not hasattr(hf_bnb, name):
            monkeypatch.setattr(hf_bnb, name, value, raising=False)
    config = types.SimpleNamespace(quantization_method=lambda: "llm_int8", llm_int8_has_fp16_weight=False,
                                   llm_int8_threshold=6.0, llm_int8_skip_modules=skip)
    hf_bnb._replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=config)
    return [n for n, m in model.named_modules() if isinstance(m, Linear8bitLt)]


def tower_dtype(probe: dict) -> torch.dtype:
    """The CLIP dtype during training: train() casts it to float16 without --bf16, which ZeRO-3 on
    transformers 4.x does not apply to its partitioned parameters."""
    return getattr(torch, probe["tower_dtype"].split(".")[-1])


def load_trained(folder: str, tower_dtype=torch.float16):
    """A saved LLaVA model as training left it: CLIP loaded from its folder and cast as in training."""
    from llava.model.language_model.llava_llama import LlavaLlamaForCausalLM

    model = LlavaLlamaForCausalLM.from_pretrained(folder)
    tower = model.get_vision_tower()
    if not tower.is_loaded:
        tower.load_model()
    tower.to(dtype=tower_dtype)
    return model.eval()


def probe_forward(model, probe: dict):
    """Logits and kept positions of ``model`` on the probe's inputs, with the plugin as the run had it.

    One thread, as the recipe's processes (OMP_NUM_THREADS=1): sums then add up in the same order, so
    tokens whose scores tie up to rounding (the generated images have many identical patches) are
    chosen the same way."""
    import meteor_plugin

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            out = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"], images=probe["images"])
    finally:
        torch.set_num_threads(threads)
    run = meteor_plugin.stats(model)
    kept = {stage: [s[stage].detail.get("kept") if stage in s else None for s in run.stages]
            for stage in ("encoder", "fusion", "llm")}
    return out.logits.float(), kept


def load_trained_eagle(folder: str, tower_dtype=torch.float16):
    """A saved EAGLE model as training left it (enable the plugin first: it builds the per-encoder
    projectors of a converted checkpoint at load time)."""
    from eagle.model.language_model.eagle_llama import EagleLlamaForCausalLM

    model = EagleLlamaForCausalLM.from_pretrained(folder)
    model.get_vision_tower().to(dtype=tower_dtype)
    return model.eval()
