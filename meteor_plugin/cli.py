"""The ``meteor-plugin`` command: demo, bench and the tools built on the plugin."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from meteor_plugin import MeteorConfig, demo

    config = MeteorConfig.from_file(args.config) if args.config else None
    result = demo.run(args.model_path, args.prompt, config, args.max_new_tokens)
    print(json.dumps(result, indent=2) if args.json else demo.report(result))
    return 0


def _bench(args: argparse.Namespace) -> int:
    from meteor_plugin.bench import eagle_prefill, llava_prefill

    results, reports = [], []
    if args.which in ("llava", "all"):
        settings = llava_prefill.PrefillBench(repeats=args.repeats, device=args.device, dtype=args.dtype)
        spec = llava_prefill.LLAVA15_SCALED
        if args.quick:
            settings.keep, settings.text_before, settings.text_after = 36, 5, 5
            spec = llava_prefill.QUICK
        results.append(llava_prefill.run(settings, spec))
        reports.append(llava_prefill.report(results[-1]))
    if args.which in ("eagle", "all"):
        from meteor_plugin.testing.eagle_like import install

        install()
        settings = eagle_prefill.EagleBench(repeats=args.repeats, device=args.device, dtype=args.dtype)
        spec = eagle_prefill.X4_SCALED
        if args.quick:
            settings.fusion_keep, settings.llm_keep, settings.text_before, settings.text_after = 300, 100, 5, 5
            settings.encoder_keep = 1200
            spec = eagle_prefill.QUICK
        results.append(eagle_prefill.run(settings, spec))
        reports.append(eagle_prefill.report(results[-1]))
    print(json.dumps(results, indent=2) if args.json else "\n\n".join(reports))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meteor-plugin", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="answer one prompt about a generated image with pruning off and on")
    p.add_argument("--model-path", help="a LLaVA checkpoint folder (default: a random model built in memory)")
    p.add_argument("--prompt", default=None)
    p.add_argument("--config", help="a MeteorConfig .json/.yaml (default: Stage 3 at 25%% of visual tokens)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="prefill latency and memory, unpruned against pruned, side by side")
    p.add_argument("which", nargs="?", default="all", choices=["llava", "eagle", "all"],
                   help="llava: Stage 3 on a LLaVA-1.5-shaped model; eagle: all stages on an EAGLE-X4-shaped one")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each variant (median reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="a tiny model: checks the benchmark runs, numbers mean little")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)

    from meteor_plugin.calibrate import add_subparser as add_calibrate
    from meteor_plugin.patcher.cli import add_subparser as add_patch
    from meteor_plugin.training.convert import add_subparser as add_convert
    from meteor_plugin.training.merge import add_subparser as add_merge_lora

    add_calibrate(sub)
    add_convert(sub)
    add_merge_lora(sub)
    add_patch(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    import os

    import torch

    if not torch.cuda.is_available():
        # DeepSpeed (imported by transformers' integrations) otherwise prints a notice on stdout.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    args = build_parser().parse_args(argv)
    if getattr(args, "prompt", "unset") is None:
        from meteor_plugin.demo import DEFAULT_PROMPT

        args.prompt = DEFAULT_PROMPT
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
