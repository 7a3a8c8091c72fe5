"""The Trainer that upstream ``train()`` builds, with METEOR's additions mixed in.

``make_trainer(LLaVATrainer or EagleTrainer, session)`` returns a subclass of upstream's own Trainer (its
optimizer groups, samplers and adapter-only saving stay as they are) that also:

- runs on transformers 4.37, 4.44 and 5.x (``compat.py``);
- checks where LoRA adapters and 4-bit layers landed, and keeps projectors trainable next to adapters;
- gives every trainable weight one dtype under DeepSpeed with --bf16/--fp16 (``one_half_dtype``), and
  float32 to every weight of a full-precision run (``full_precision``);
- brackets every ``checkpoint-N`` save with the completeness marker (``save.py``), writes the fully
  trained weights of a LoRA run beside the adapter there too, and resumes only from a whole checkpoint;
- sends the final save into a staging folder that the entry publishes once every rank is done;
- logs how many visual tokens each stage kept in the last step (``meteor/<stage>_tokens_kept``), so a
  run shows in its logs that pruning was active, and prints the engine it trains with once.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch

from ..compat import training as compat
from . import lora, quant, save
from ..distributed import barrier
from ..runtime import pruning_config


def is_peft_model(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "base_model")


def bare_model(model: Any) -> Any:
    """The LLaVA/EAGLE model inside a DeepSpeed engine and/or a PeftModel."""
    model = getattr(model, "module", model)
    if is_peft_model(model):
        model = model.base_model.model
    return model


def record_config(model: Any) -> None:
    """The config training prunes ``model`` with, in its ``config.meteor``: the checkpoint it saves then prunes as it
    was trained (training runs in a scope, which writes nothing to the model by itself)."""
    cfg = pruning_config(model)
    if cfg is not None:
        model.config.meteor = cfg.to_dict()


class MeteorTrainerMixin:
    meteor_session: Any = None  # set by make_trainer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        session = type(self).meteor_session
        bare = bare_model(kwargs["model"] if "model" in kwargs else args[0])
        prepare = session.codebase.hook("before_training")
        if prepare is not None:
            # Before Trainer.__init__, which moves the model to its device: modules the checkpoint lacks
            # are made here, and exist before the optimizer and DeepSpeed see the parameters.
            prepare(bare, kwargs["args"] if "args" in kwargs else args[1])
        record_config(bare)
        super().__init__(*args, **compat.trainer_kwargs(kwargs))
        session.trainer = self
        model = self.model
        if getattr(self.args, "lora_enable", False):
            session.adapted = lora.check_placement(model)
            if not getattr(self.args, "freeze_mm_mlp_adapter", False) and not getattr(self.args, "tune_mm_mlp_adapter", False):
                session.fully_trained = lora.train_fully(model, session.codebase.fully_trained)
        if getattr(self.args, "bits", 16) in (4, 8):
            session.quantized = quant.check_quantization(model)
        session.cast_to_half = one_half_dtype(model, self.args)
        session.cast_to_float = full_precision(model, self.args)

    def create_optimizer(self):
        # Upstream builds four groups when --mm_projector_lr is set; in a LoRA run the no-decay group of
        # the LLM is empty. ZeRO-3 drops empty groups while transformers 4.x sizes the LR scheduler from
        # the optimizer it built ("zip() argument 2 is longer than argument 1"): drop them here.
        optimizer = super().create_optimizer()
        kept = [group for group in optimizer.param_groups if len(group["params"]) > 0]
        if len(kept) != len(optimizer.param_groups):
            optimizer.param_groups[:] = kept
        return optimizer

    # transformers 5 passes the dataset; upstream's override takes none.
    def _get_train_sampler(self, *args: Any, **kwargs: Any):
        return super()._get_train_sampler()

    def _save_checkpoint(self, model: Any, trial: Any, *args: Any, **kwargs: Any) -> None:
        folder = compat.checkpoint_folder(self, trial)
        with save.marked_save(folder, self.args.should_save, barrier):
            if getattr(self.args, "tune_mm_mlp_adapter", False):
                super()._save_checkpoint(model, trial, *args, **kwargs)  # upstream's projector-only save
            else:
                # Upstream's override only defers to Trainer here, passing ``metrics`` that 5.x no longer takes.
                compat.base_save_checkpoint(self, model, trial, *args, **kwargs)
                if is_peft_model(self.model):  # Trainer keeps only the adapter of a PeftModel
                    others = lora.non_lora_state(self.model)
                    if self.args.should_save:
                        torch.save(others, os.path.join(folder, lora.NON_LORA_FILE))
                        # the model's config too, so that merge-lora takes this checkpoint-N alone
                        bare_model(self.model).config.save_pretrained(folder)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        # Without DeepSpeed the Trainer restores only the adapter of a PeftModel; the engine's own
        # checkpoint (global_stepN) already holds every weight.
        path = os.path.join(resume_from_checkpoint, lora.NON_LORA_FILE)
        target = model if model is not None else self.model
        if os.path.isfile(path) and is_peft_model(target) and not getattr(self, "is_deepspeed_enabled", False):
            lora.load_non_lora(bare_model(target), resume_from_checkpoint)

    def _load_rng_state(self, checkpoint: Any) -> None:
        with compat.numpy_rng_globals():
            return super()._load_rng_state(checkpoint)

    def train(self, resume_from_checkpoint: Any = None, *args: Any, **kwargs: Any):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = save.last_resumable(self.args.output_dir)
        elif isinstance(resume_from_checkpoint, str):
            save.require_loadable(resume_from_checkpoint, "the checkpoint to resume from")
        if isinstance(resume_from_checkpoint, str):
            check_same_kind(resume_from_checkpoint, is_peft_model(self.model))
        session = type(self).meteor_session
        session.resumed_from = resume_from_checkpoint
        if resume_from_checkpoint and self.args.should_save:
            print(f"meteor-plugin: resuming from {resume_from_checkpoint}", flush=True)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def save_state(self) -> None:
        super().save_state()
        # Upstream saves the final model right after this, into args.output_dir: send it to a staging
        # folder; the entry publishes it into the real output folder when every rank has finished.
        session = type(self).meteor_session
        if session.staging is None:
            session.final_dir = self.args.output_dir
            session.staging = save.staging_dir(self.args.output_dir)
            if self.args.should_save:
                shutil.rmtree(session.staging, ignore_errors=True)
                os.makedirs(session.staging)
            barrier()
            self.args.output_dir = session.staging

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        from ..stats import stats

        run = stats(self.model)
        if run is not None and "loss" in logs:
            for stage in ("encoder", "fusion", "llm"):
                kept = [n for n in run.visual_tokens(stage) if n is not None]
                if kept:
                    logs[f"meteor/{stage}_tokens_kept"] = sum(kept) / len(kept)
        session = type(self).meteor_session
        if session.engine is None:
            session.engine = type(getattr(self, "model_wrapped", self.model)).__name__
            if self.args.should_save:
                print(f"meteor-plugin: training with {session.engine}, pruning "
                      f"{'on' if run is not None else 'off or not reached'}", flush=True)
        return super().log(logs, *args, **kwargs)


def one_half_dtype(model: Any, args: Any) -> list:
    """Under DeepSpeed with --bf16/--fp16, give every trainable weight that dtype; returns their names.

    peft >= 0.12 keeps LoRA adapters in float32 on a bfloat16 model (``autocast_adapter_dtype``) while the
    projectors (and EAGLE's towers) trained beside them are bfloat16, and DeepSpeed's ZeRO-3 optimizer
    flattens a group's weights into one buffer ("assert len(set(t.dtype for t in tensors)) == 1"). The
    peft of LLaVA's time made adapters in the model's dtype; DeepSpeed keeps float32 master copies of them
    either way. Weights already partitioned by ZeRO-3 keep their dtype (their data is a placeholder).
    """
    if not getattr(args, "deepspeed", None):
        return []
    half = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None
    if half is None:
        return []
    cast = []
    for name, param in model.named_parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != half and not hasattr(param, "ds_id"):
            param.data = param.data.to(half)
            cast.append(name)
    return cast


def full_precision(model: Any, args: Any) -> list:
    """Without --bf16/--fp16 (and unquantised), give every half-precision weight float32; returns their names.

    Upstream ``train()`` casts the vision tower to float16 whenever --bf16 is not set, written for GPU
    runs in fp16: in a float32 run on the CPU the towers then compute in float16 (slow there), and where
    they are trained (EAGLE trains every encoder) AdamW's eps (1e-8) underflows to 0 in float16, so a
    weight whose gradient is exactly zero (CLIP's class embedding: EAGLE drops the CLS token) becomes
    0/0 = NaN after the first step, and the NaN spreads through the model from the next forward.
    """
    if getattr(args, "bf16", False) or getattr(args, "fp16", False) or getattr(args, "bits", 16) in (4, 8):
        return []
    cast = []
    for name, param in model.named_parameters():
        if param.is_floating_point() and param.dtype in (torch.float16, torch.bfloat16) and not hasattr(param, "ds_id"):
            param.data = param.data.float()
            cast.append(name)
    return cast


def check_same_kind(checkpoint: str, lora_run: bool) -> None:
    """Upstream resumes from any ``checkpoint-*`` in the output folder: refuse one of the other kind."""
    has_adapter = os.path.isfile(os.path.join(checkpoint, "adapter_config.json"))
    if has_adapter != lora_run:
        kinds = ("a LoRA run", "a full fine-tuning run")
        raise SystemExit(
            f"{checkpoint} was saved by {kinds[0] if has_adapter else kinds[1]}, but this is "
            f"{kinds[0] if lora_run else kinds[1]}: upstream train() resumes from the checkpoints in --output_dir, "
            "so give this run its own --output_dir"
        )


def make_trainer(base: type, session: Any) -> type:
    if issubclass(base, MeteorTrainerMixin):
        base = base.__mro__[2]
    return type(f"Meteor{base.__name__}", (MeteorTrainerMixin, base), {"meteor_session": session,
                                                                        "__module__": __name__})


def save_final_model(original: Any):
    """A replacement for upstream's ``safe_save_model_for_hf_trainer`` (called at the end of ``train()``).

    - LoRA (a ``PeftModel``): the adapter *and* ``non_lora_trainables.bin`` (EAGLE's train.py would keep
      only the adapter; LLaVA's never gets here, it saves LoRA inline the same way);
    - DeepSpeed: ``trainer.save_model`` (upstream first calls ``torch.cuda.synchronize()``, which fails
      without CUDA);
    - otherwise upstream's own function (projector-only saves, plain saves).
    """

    def safe_save_model_for_hf_trainer(trainer: Any, output_dir: str) -> None:
        args = trainer.args
        if getattr(args, "tune_mm_mlp_adapter", False):
            return original(trainer=trainer, output_dir=output_dir)
        if is_peft_model(trainer.model):
            return lora.save_adapter(trainer.model, output_dir, getattr(args, "lora_bias", "none"), args.should_save)
        if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "deepspeed", None) is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return trainer.save_model(output_dir)
        return original(trainer=trainer, output_dir=output_dir)

    safe_save_model_for_hf_trainer.meteor_original = original
    return safe_save_model_for_hf_trainer
