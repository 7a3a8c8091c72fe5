"""Launched by the tests in place of ``--module meteor_plugin.train`` (the tiny recipe's ENTRY).

It runs the same entry, with two test-only additions driven by the environment:
- ``METEOR_TEST_PROBE=PATH``: when training ends (before the final save), every rank runs the trained model
  on the first two training samples; rank 0 writes the inputs, logits, kept visual positions, the
  projector weights (every ``*mm_projector*``), in a LoRA run every other trained weight, and what the
  run's session recorded to PATH;
- ``METEOR_TEST_CRASH_STEP=N``: every rank dies (``os._exit``) in the middle of saving ``checkpoint-N``:
  the model files are written, the optimizer state is not. This is what a killed job leaves behind.
"""

import os
import sys

import torch


def install_probe(path: str) -> None:
    import meteor_plugin
    from meteor_plugin.distributed import gathered_cpu, rank
    from meteor_plugin.adapters.eagle.training import SPLIT_IN_TRAINING
    from meteor_plugin.training.trainer import MeteorTrainerMixin, bare_model

    original = MeteorTrainerMixin.save_state

    def save_state(self):
        model = self.model
        model.eval()
        batch = self.data_collator([self.train_dataset[i] for i in (0, 1)])
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], images=batch["images"])
        run = meteor_plugin.stats(model)
        bare = bare_model(model)
        projector = gathered_cpu((n, p) for n, p in bare.named_parameters() if "mm_projector" in n)
        trained = {}
        if session_is_lora(self):  # the weights non_lora_trainables.bin must hold
            trained = gathered_cpu((n, p) for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n)
        session = type(self).meteor_session
        if rank() == 0:
            torch.save({
                "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "images": batch["images"],
                "logits": out.logits.detach().float().cpu(),
                "kept": {stage: [s[stage].detail.get("kept") if stage in s else None for s in run.stages]
                         for stage in STAGES},
                "projector": projector, "trained": trained,
                "engine": type(self.model_wrapped).__name__,
                "adapted": list(session.adapted), "quantized": list(session.quantized),
                "fully_trained": list(session.fully_trained), "resumed_from": session.resumed_from,
                # EAGLE's fusion tower has no working .dtype (it reads a missing attribute): ask a parameter
                "tower_dtype": str(next(bare.get_vision_tower().parameters()).dtype),
                "split_in_training": SPLIT_IN_TRAINING.get(bare),
            }, path)
        model.train()
        return original(self)

    MeteorTrainerMixin.save_state = save_state


STAGES = ("encoder", "fusion", "llm")


def session_is_lora(trainer) -> bool:
    from meteor_plugin.training.trainer import is_peft_model

    return is_peft_model(trainer.model)


def install_crash(step: int) -> None:
    import transformers

    original = transformers.Trainer._save_optimizer_and_scheduler

    def _save_optimizer_and_scheduler(self, output_dir, *args, **kwargs):
        if self.state.global_step == step:
            print(f"training_run: simulated crash while saving {output_dir}", flush=True)
            os._exit(17)
        return original(self, output_dir, *args, **kwargs)

    transformers.Trainer._save_optimizer_and_scheduler = _save_optimizer_and_scheduler


if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]
    if os.environ.get("METEOR_TEST_PROBE"):
        install_probe(os.environ["METEOR_TEST_PROBE"])
    if os.environ.get("METEOR_TEST_CRASH_STEP"):
        install_crash(int(os.environ["METEOR_TEST_CRASH_STEP"]))
    from meteor_plugin.train import run_program

    run_program()
