"""python -m meteor_plugin.run [--meteor-config PATH] [--meteor-set FIELD=VALUE ...] MODULE [ARGS...]

Runs MODULE as ``__main__`` (as ``python -m MODULE ARGS...`` would) with the plugin enabled: with the
given config (``--meteor-config`` wins over METEOR_CONFIG; ``--meteor-set`` applies on top of either), else
each checkpoint's saved config or the defaults.
Running as ``__main__`` matters: LLaVA's ``model_vqa_loader`` reads a module-global ``args`` set only
there. Options before MODULE are the runner's; a ``--local_rank`` or ``--local-rank`` put there by a
launcher (``deepspeed``, ``torch.distributed.launch``) is handed on to the module as given.

Training modules (``llava.train.train_mem``, ``llava.train.train``, an EAGLE checkout's ``train_mem`` and
``train``) run through ``python -m meteor_plugin.train`` instead, with the same options: upstream's
``train()`` needs the fixes that entry carries (transformers 5's Trainer, complete checkpoints, the
final save), and would fail or lose weights without them. ``train_mem`` keeps upstream's
FlashAttention-2; ``train`` runs SDPA.
"""

from __future__ import annotations

import runpy
import sys
from typing import Dict, List, Optional, Tuple

USAGE = "usage: python -m meteor_plugin.run [--meteor-config PATH] [--meteor-set FIELD=VALUE] MODULE [ARGS...]"


def training_modules() -> Dict[str, Tuple[str, str]]:
    """Training module -> (codebase, attention) for meteor_plugin.train, from each family's record."""
    from meteor_plugin.adapters import training_specs

    return {module: (codebase.name, attention) for codebase in training_specs().values()
            for module, attention in codebase.entry_modules.items()}


def main(argv: Optional[List[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        raise SystemExit(0)
    # The runner's own options are the ones before MODULE.
    head: List[str] = []
    while argv and argv[0].startswith("-"):
        takes_value = argv[0].replace("_", "-") in ("--meteor-config", "--meteor-set", "--meteor-encoder",
                                                   "--meteor-fusion", "--meteor-llm", "--local-rank")
        head.extend(argv[: 2 if takes_value else 1])
        argv = argv[2 if takes_value else 1:]
    if not argv:
        raise SystemExit(USAGE)
    entries = training_modules()
    if argv[0] in entries:
        from meteor_plugin import train

        codebase, attn = entries[argv[0]]
        train.run_program(head + ["--meteor-codebase", codebase, "--meteor-attn", attn] + argv[1:])
        return
    from meteor_plugin.entry import checked, config_path, pop_options

    passed_on = list(head)
    try:
        options = pop_options(passed_on)
    except SystemExit as exc:  # a malformed option or --meteor-set value: one line, exit 2
        print(f"meteor_plugin.run: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    unknown = [a for a in passed_on if not a.startswith(("--local_rank", "--local-rank"))]
    if any(not a.isdigit() for a in unknown):
        raise SystemExit(f"unknown option(s) before MODULE: {' '.join(unknown)}\n{USAGE}")
    import meteor_plugin

    path = config_path(options.config)
    if path is not None or options.overrides:
        try:
            checked(path, options.overrides, "meteor_plugin.run")
        except SystemExit as exc:  # a user's mistake in the config: one line, exit 2 (the module never ran)
            print(exc, file=sys.stderr)
            raise SystemExit(2) from None
        meteor_plugin.enable(path, **options.overrides)
    elif not meteor_plugin.is_enabled():
        meteor_plugin.enable()
    module = argv[0]
    sys.argv = [module] + passed_on + argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
