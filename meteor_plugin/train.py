"""python -m meteor_plugin.train [METEOR flags] [the flags of LLaVA's or EAGLE's train.py]

Fine-tunes a LLaVA or EAGLE model with METEOR's pruning active, through the upstream training code:
``llava.train.train.train`` or, when run from the root of an EAGLE checkout, EAGLE's ``train.train``.
Launch it the way the upstream scripts are launched:

    deepspeed --module meteor_plugin.train --deepspeed recipes/deepspeed/zero3.json ...
    torchrun --nproc_per_node 8 -m meteor_plugin.train --deepspeed recipes/deepspeed/zero2.json ...
    accelerate launch -m meteor_plugin.train ...

METEOR flags (``--meteor-x`` or ``--meteor_x``; ``--help`` lists them with upstream's):
    --meteor-config PATH          a MeteorConfig .json/.yaml (default: the checkpoint's stored config)
    --meteor-encoder/--meteor-fusion/--meteor-llm true|false     stage switches
    --meteor-set FIELD=VALUE      any MeteorConfig field, repeatable
    --meteor-attn sdpa|flash_attention_2|eager                   the LLM's attention (default sdpa)
    --meteor-codebase auto|llava|eagle
    --meteor-off                  train without pruning (baseline)

What it adds to upstream training is described in ``meteor_plugin/training/hooks.py``.
"""

import os
import sys

if __name__ == "__main__" and sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    # Run as a file from inside the package: its folder must not shadow top-level modules (EAGLE's train).
    sys.path.pop(0)

from typing import List, Optional  # noqa: E402


def attention_implementation(requested: str) -> str:
    if requested == "flash_attention_2":
        from meteor_plugin.compat.transformers import flash_attention_2_available

        if not flash_attention_2_available():
            raise SystemExit("--meteor-attn flash_attention_2: FlashAttention-2 is not usable here (it needs the "
                             "flash-attn package and a CUDA GPU); use --meteor-attn sdpa")
    return requested


def main(argv: Optional[List[str]] = None) -> int:
    from meteor_plugin import adapters
    from meteor_plugin.training import arguments, hooks, save
    from meteor_plugin.distributed import barrier
    from meteor_plugin.training.deepspeed import skip_shm_op_build

    argv = list(sys.argv[1:] if argv is None else argv)
    options = arguments.pop_options(argv)
    if options.off and (options.config or options.overrides):
        raise SystemExit("--meteor-off trains without pruning: it cannot be combined with other METEOR flags")
    if not options.off:  # a mistake in the config ends it here, in one line, before the training code is imported
        from meteor_plugin.entry import checked, config_path

        path = config_path(options.config)
        if path is not None or options.overrides:
            checked(path, options.overrides, "meteor_plugin.train")
    try:
        codebase = adapters.spec_for_training(options.codebase)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"meteor_plugin.train: {exc}") from None
    attn = attention_implementation(options.attn)
    skip_shm_op_build()
    hooks.prepare_imports()
    module = codebase.import_train_module()
    with hooks.installed(module, codebase) as session, pruning(options):
        from meteor_plugin.compat.training import translate_flags

        argv = translate_flags(argv, module.TrainingArguments)
        sys.argv = [getattr(module, "__file__", codebase.train_module)] + argv
        module.train(attn_implementation=attn)
        publish_final(session, barrier, save)
    return 0


def pruning(options):
    """The scope training runs in: pruning with --meteor-config, else METEOR_CONFIG, else each model's config
    stored in its checkpoint (or the defaults); none with --meteor-off."""
    import contextlib

    import meteor_plugin

    from meteor_plugin.entry import config_path

    if options.off:
        return contextlib.nullcontext()
    return meteor_plugin.enabled(config_path(options.config), **options.overrides)


def shutdown_distributed() -> bool:
    """Tear the process group down before interpreter exit; True when there was one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        return True
    return False


def exit_program(code: int, distributed: bool) -> None:
    """End the process after a distributed run without interpreter finalization.

    A gloo rank that finished, saved and destroyed its process group can still abort (SIGABRT) while
    the interpreter tears down: communication buffers freed then need the GIL of a dying interpreter
    (pytorch/pytorch#179291), and launchers report the finished job as failed. So the atexit handlers
    run now, while everything is alive (loggers flush, temporary files go), then the process exits.
    Set METEOR_NATURAL_EXIT=1 to let Python finish normally instead.
    """
    if not distributed or os.environ.get("METEOR_NATURAL_EXIT") == "1":
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def publish_final(session, barrier, save) -> None:
    """Move the staged final save into the output folder once every rank has written its part."""
    trainer = session.trainer
    if trainer is None or session.staging is None:
        return
    barrier()
    if trainer.args.should_save and os.path.isdir(session.staging):
        save.publish(session.staging, session.final_dir)
    trainer.args.output_dir = session.final_dir
    barrier()


def run_program(argv: Optional[List[str]] = None) -> None:
    """The command: `main`, then an exit that a finished distributed run cannot turn into a crash."""
    code = main(argv)
    exit_program(code, shutdown_distributed())


if __name__ == "__main__":
    run_program()
