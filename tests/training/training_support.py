"""Helpers of the training tests: the tiny workspace and the recipe runs, each launched once per session.

The workspace is what ``recipes/tiny-cpu.sh`` prepares (a tiny LLaVA, 16 generated images), converted
with a non-default METEOR config, so the runs show that training reads the config stored by ``convert``:
Stage 1 keeps 24 of 64 CLIP patches (the default would keep 32).
"""

import json
import os
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
    """Logits and kept positions of ``model`` on the probe's inputs, with the plugin as the run had it."""
    import meteor_plugin

    with torch.no_grad():
        out = model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"], images=probe["images"])
    run = meteor_plugin.stats(model)
    kept = {stage: [s[stage].detail.get("kept") if stage in s else None for s in run.stages]
            for stage in ("encoder", "llm")}
    return out.logits.float(), kept
