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
    from meteor_plugin.bench import llava_prefill

    settings = llava_prefill.PrefillBench(repeats=args.repeats, device=args.device, dtype=args.dtype)
    spec = llava_prefill.QUICK if args.quick else llava_prefill.LLAVA15_SCALED
    if args.quick:
        settings.keep, settings.text_before, settings.text_after = 36, 5, 5
    result = llava_prefill.run(settings, spec)
    print(json.dumps(result, indent=2) if args.json else llava_prefill.report(result))
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
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each variant (median reported)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="a tiny model: checks the benchmark runs, numbers mean little")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_bench)

    from meteor_plugin.training.convert import add_subparser as add_convert
    from meteor_plugin.training.merge import add_subparser as add_merge_lora

    add_convert(sub)
    add_merge_lora(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "prompt", "unset") is None:
        from meteor_plugin.demo import DEFAULT_PROMPT

        args.prompt = DEFAULT_PROMPT
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
