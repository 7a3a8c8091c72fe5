"""The ``meteor-plugin`` command: demo, bench and the tools built on the plugin.

A user error (a missing file, a malformed or invalid config, a checkpoint that cannot be used) prints
one line naming the problem and exits 2; ``--debug`` (anywhere on the line) shows the traceback instead.
``--no-progress`` (anywhere on the line) draws no progress bar, whichever part of the command would. Ctrl-C exits
130; ``bench fidelity`` first prints the rows it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from meteor_plugin import MeteorConfig, demo

    config = MeteorConfig.from_file(args.config) if args.config else None
    if args.model_path is None and not args.random_llava:
        if args.image_file:
            raise ValueError("--image-file asks about your image on a LLaVA or EAGLE checkpoint: give --model-path "
                             "(the fidelity model knows only its generated scenes)")
        if args.repeats is not None:
            raise ValueError("--repeats times the prefill of a LLaVA demo (--model-path, --random-llava); the fidelity "
                             "model is too small to show speed: run `meteor-plugin bench`")
        result = demo.run_fidelity(args.prompt, args.seed, config, args.fidelity_model, args.save_map, args.scenes)
        text = demo.report_fidelity(result)
    else:
        if args.save_map:
            raise ValueError("--save-map draws the fidelity model's encoder grids; it does not apply to a LLaVA model")
        result = demo.run(args.model_path, args.prompt or demo.DEFAULT_PROMPT, config, args.max_new_tokens,
                          args.repeats, args.image_file)
        text = demo.report(result)
    print(json.dumps(result, indent=2) if args.json else text)
    return 0


def _bench_fidelity(args: argparse.Namespace) -> int:
    from meteor_plugin.bench import fidelity
    from meteor_plugin.entry import parse_field
    from meteor_plugin.fidelity import methods

    model_path = args.model_path
    if args.train:
        from meteor_plugin.fidelity import recipe

        workdir = args.train_dir or os.path.join(os.getcwd(), "fidelity-train")
        rounds = recipe.SHIPPED_ROUNDS if args.train_rounds else ()
        settings = recipe.RecipeSettings(workdir=workdir, threads=args.threads or 2,
                                         budget_seconds=60.0 * args.train_minutes,
                                         continue_steps=tuple(n for n, _ in rounds),
                                         continue_seeds=tuple(seed for _, seed in rounds))
        model_path = recipe.run(settings, echo=lambda *a: print(*a, file=sys.stderr))
    budgets = [float(b) for b in args.budgets.split(",")] if args.budgets else list(methods.BUDGETS)
    settings = fidelity.FidelityBench(
        model_path=model_path, per_kind=args.per_kind, val_per_kind=args.val_per_kind, budgets=budgets,
        methods=args.methods.split(",") if args.methods else list(methods.ALL_METHODS),
        plot=None if args.plot in ("", "none") else args.plot, progress=not args.no_progress, threads=args.threads,
        meteor=dict(parse_field("--meteor-set", pair) for pair in args.meteor_set), ablations=list(methods.ABLATIONS) if args.ablation else [],
        test_seed=args.test_seed, split=args.split, flops_questions=args.flops_questions)
    result = fidelity.run(settings, log=lambda *a: print(*a, file=sys.stderr))
    print(json.dumps(result, indent=2) if args.json else fidelity.report(result))
    return INTERRUPTED if result.get("interrupted") else 0


def _bench_gpu(args: argparse.Namespace) -> int:
    from meteor_plugin.bench import gpu

    settings = gpu.GpuBench(device=args.device or "cuda", dtype=args.dtype or "bfloat16", repeats=args.repeats,
                            shapes=[args.shape] if args.shape else list(gpu.SHAPES))
    gpu.require_gpu(settings.device)  # before anything is built
    result = gpu.run(settings, log=lambda *a: print(*a, file=sys.stderr))
    print(json.dumps(result, indent=2) if args.json else gpu.report(result))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.which == "gpu":
        return _bench_gpu(args)
    args.device, args.dtype = args.device or "cpu", args.dtype or "float32"
    if args.tp is not None:
        return _bench_tensor_parallel(args)
    from meteor_plugin.bench import eagle_prefill, llava_prefill

    results, reports = [], []
    full = _full_size(args)  # {bench: spec} of --shape, after its memory check
    if args.which in ("llava", "all"):
        settings = llava_prefill.PrefillBench(repeats=args.repeats, device=args.device, dtype=args.dtype,
                                             profile=args.profile, float_mask=args.float_mask)
        spec = full.get("llava", llava_prefill.LLAVA15_SCALED)
        if args.quick:
            settings.keep, settings.text_before, settings.text_after = 36, 5, 5
            spec = llava_prefill.QUICK
        results.append(llava_prefill.run(settings, _depth(args, spec, settings.llm_layer)))
        reports.append(llava_prefill.report(results[-1]))
    if args.which in ("llava-next", "all"):
        from meteor_plugin.bench import llava_next_prefill

        settings = llava_next_prefill.NextBench(repeats=args.repeats, device=args.device, dtype=args.dtype,
                                               profile=args.profile)
        spec = full.get("llava-next", llava_next_prefill.LLAVA16_SCALED)
        if args.quick:
            settings.llm_keep, settings.text_before, settings.text_after = 40, 5, 5
            spec = llava_next_prefill.QUICK_NEXT
        results.append(llava_next_prefill.run(settings, _depth(args, spec, settings.llm_layer)))
        reports.append(llava_next_prefill.report(results[-1]))
    if args.which in ("eagle", "all"):
        from meteor_plugin.testing.eagle_like import install

        install()
        settings = eagle_prefill.EagleBench(repeats=args.repeats, device=args.device, dtype=args.dtype,
                                           profile=args.profile, float_mask=args.float_mask)
        spec = full.get("eagle", eagle_prefill.X4_SCALED)
        if args.quick:
            settings.fusion_keep, settings.llm_keep, settings.text_before, settings.text_after = 300, 100, 5, 5
            settings.encoder_keep = 1200
            spec = eagle_prefill.QUICK
        results.append(eagle_prefill.run(settings, _depth(args, spec, settings.llm_layer)))
        reports.append(eagle_prefill.report(results[-1]))
    if args.which == "qwen-vl":
        from meteor_plugin.bench import qwen_vl_prefill

        if args.profile:
            raise ValueError("--profile times the parts of the llava, llava-next and eagle benches; the qwen-vl bench "
                             "has no profile yet")
        settings = qwen_vl_prefill.QwenBench(repeats=args.repeats, device=args.device, dtype=args.dtype)
        spec = full.get("qwen-vl", qwen_vl_prefill.QWEN25_SCALED)
        if args.quick:
            settings.grid, settings.text_before, settings.text_after = qwen_vl_prefill.QUICK_GRID, 5, 5
            spec = qwen_vl_prefill.QUICK
        results.append(qwen_vl_prefill.run(settings, _depth(args, spec, settings.llm_layer)))
        reports.append(qwen_vl_prefill.report(results[-1]))
    if args.which == "decode":
        from meteor_plugin.bench import decode

        settings = decode.DecodeBench(repeats=args.repeats, device=args.device, dtype=args.dtype)
        spec = decode.LLAVA15_SCALED
        if args.quick:
            settings.batch, settings.new_tokens, settings.keep, settings.text_before, settings.text_after = 2, 4, 36, 5, 5
            spec = decode.QUICK_DECODE
        results.append(decode.run(settings, _depth(args, spec, settings.llm_layer)))
        reports.append(decode.report(results[-1]))
    print(json.dumps(results, indent=2) if args.json else "\n\n".join(reports))
    return 0


def _bench_tensor_parallel(args: argparse.Namespace) -> int:
    """``bench llava --tp N``: relaunched on N ranks under torch.distributed.run, unless this is one of them."""
    from meteor_plugin.bench import llava_prefill, shapes
    from meteor_plugin.bench import tensor_parallel as tp

    from meteor_plugin.compat.tensor_parallel import unavailable

    if args.which != "llava" or args.profile or args.tp < 2:
        raise ValueError("--tp N (N >= 2) runs the llava bench tensor-parallel: `meteor-plugin bench llava --tp N`, "
                         "without --profile")
    if unavailable():
        raise ValueError(f"--tp: {unavailable()}")
    if not tp.is_rank():
        argv = ["bench", "llava", "--tp", str(args.tp), "--repeats", str(args.repeats), "--device", args.device,
                "--dtype", args.dtype] + (["--quick"] if args.quick else []) + (["--json"] if args.json else [])
        argv += (["--llm-layers", str(args.llm_layers)] if args.llm_layers is not None else [])
        argv += (["--shape", args.shape] if args.shape else [])
        return tp.launch(args.tp, argv)
    settings = tp.TensorParallelBench(ranks=args.tp, repeats=args.repeats, device=args.device, dtype=args.dtype)
    spec = llava_prefill.LLAVA15_SCALED
    if args.quick:
        settings.keep, settings.text_before, settings.text_after = 36, 5, 5
        spec = llava_prefill.QUICK
    if args.shape:  # each rank holds 1/N of the language model: the one-device memory check does not apply
        which, spec = shapes.shape(args.shape)
        if which != "llava" or args.quick or args.llm_layers is not None:
            raise ValueError(f"--tp runs the llava bench: --shape llava-1.5-7b (not {args.shape}), without --quick "
                             "or --llm-layers")
    result = tp.run(settings, _depth(args, spec, settings.llm_layer))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2) if args.json else tp.report(result))
    return 0


def _depth(args: argparse.Namespace, spec, stage3_layer: int):
    """``--llm-layers``: the scaled shape at another language-model depth (Stage 3's layer must lie inside it)."""
    if args.llm_layers is None:
        return spec
    import dataclasses

    if args.llm_layers <= stage3_layer:
        raise ValueError(f"--llm-layers {args.llm_layers} is invalid: Stage 3 prunes from layer {stage3_layer}, so the "
                         f"language model needs at least {stage3_layer + 1} layers")
    return dataclasses.replace(spec, llm_layers=args.llm_layers)


def _full_size(args: argparse.Namespace) -> dict:
    """``--shape``: the full-size spec for its bench, refused early where the device cannot hold it."""
    if not args.shape:
        return {}
    import dataclasses

    import torch

    from meteor_plugin.bench import shapes

    which, spec = shapes.shape(args.shape)
    if args.llm_layers is not None:
        raise ValueError(f"--llm-layers sets the depth of the CPU-sized shapes; --shape {args.shape} has its model's own "
                         f"({spec.llm_layers} layers)")
    if args.which not in (which, "all") or args.quick:
        raise ValueError(f"--shape {args.shape} is a shape of the {which!r} bench: run `meteor-plugin bench {which} "
                         f"--shape {args.shape}` (without --quick)")
    args.which = which
    device = torch.device(args.device)
    shapes.check_memory(args.shape, spec, device, getattr(torch, args.dtype))
    return {which: dataclasses.replace(spec, attn_implementation=shapes.attention_for(device))}


def fidelity_parser() -> argparse.ArgumentParser:
    """``meteor-plugin bench fidelity``: a parser of its own, so that its ``--help`` shows its options alone."""
    from meteor_plugin.fidelity.methods import ABLATIONS

    p = argparse.ArgumentParser(prog="meteor-plugin bench fidelity", description=(
        "Accuracy per question kind of a trained two-encoder model under every pruning method at equal budgets "
        "(docs/fidelity.md). Ctrl-C prints the rows finished so far."))
    p.add_argument("--model-path", help="a trained fidelity checkpoint (default: the one shipped in the package)")
    p.add_argument("--train", action="store_true", help="train a fidelity model first, as the shipped one was "
                   "(85 minutes of training on 2 cores, then two further rounds of about an hour in all, plus writing "
                   "the data; the plan and its end time are printed)")
    p.add_argument("--train-minutes", type=float, default=85.0, help="wall-clock budget of pretraining and the first "
                   "fine-tuning")
    p.add_argument("--train-rounds", action=argparse.BooleanOptionalAction, default=True,
                   help="then the shipped model's further fine-tuning rounds (where it learned to count; "
                   "--no-train-rounds stops after the budget)")
    p.add_argument("--train-dir", help="work folder of --train (default: ./fidelity-train)")
    p.add_argument("--per-kind", type=int, default=500, help="test questions per question kind")
    p.add_argument("--val-per-kind", type=int, default=100, help="validation questions per kind, for calibration")
    p.add_argument("--budgets", help="comma-separated ratios of the 208 visual tokens (default: 0.5,0.25,0.125,0.0625; "
                                     "METEOR also runs at 0.24)")
    p.add_argument("--methods", help="comma-separated subset of the methods (default: all)")
    p.add_argument("--plot", default="fidelity.png", help="PNG of accuracy against retained tokens ('none': no plot)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--meteor-set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a MeteorConfig field of every METEOR run (repeatable), e.g. fusion_similarity=cosine; the "
                        "baselines never take it")
    p.add_argument("--ablation", action="store_true",
                   help="also run METEOR with each of its choices switched alone and all together, at 25%% and 12.5%% "
                        f"({', '.join(ABLATIONS)})")
    p.add_argument("--test-seed", type=int, default=0,
                   help="seed of the test scenes: another seed draws fresh held-out questions (default 0)")
    p.add_argument("--flops-questions", type=int, default=32,
                   help="questions whose prefill FLOPs are counted per run, each alone (default 32)")
    p.add_argument("--split", default="test", choices=["test", "val"],
                   help="test (default); val: validation questions other than the calibration ones, for choosing "
                        "defaults without looking at the test split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (any command takes it)")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.set_defaults(func=_bench_fidelity, command="bench", which="fidelity")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meteor-plugin", description=__doc__)
    parser.add_argument("--version", action="version", version=f"meteor-plugin {_version()}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="answer questions about a generated image with pruning off and on")
    p.add_argument("--model-path", help="a LLaVA or EAGLE checkpoint folder (default: the trained fidelity model "
                                        "shipped in the package)")
    p.add_argument("--image-file", help="with --model-path (or --random-llava): ask about this image instead of a "
                                        "drawn one")
    p.add_argument("--random-llava", action="store_true", help="a random LLaVA-1.5-shaped model built in memory "
                                                                "(576 visual tokens; answers are meaningless)")
    p.add_argument("--fidelity-model", help="another trained fidelity checkpoint (default: the shipped one)")
    p.add_argument("--seed", type=int, default=0, help="which generated test scene the fidelity model is asked about")
    p.add_argument("--prompt", default=None, help="the question (fidelity: one of the task's questions; default: "
                                                  "one question of every kind the scene answers)")
    p.add_argument("--scenes", type=int, default=1, help="fidelity model: ask about N scenes from --seed on, count "
                                                          "how often pruning keeps the answers, and give the mean "
                                                          "tokens kept per stage")
    p.add_argument("--repeats", type=int, help="--model-path, --random-llava: interleaved timing rounds after the "
                                               "warm-up (default 9; the median shown)")
    p.add_argument("--save-map", metavar="PNG", help="fidelity model: draw where each stage's kept tokens are, per "
                                                    "encoder, for the first question (with the question, both answers "
                                                    "and a legend)")
    p.add_argument("--config", help="a MeteorConfig .json/.yaml (default: fidelity, the checkpoint's calibrated "
                                    "METEOR at 24%%; LLaVA: the config stored in the checkpoint, else Stage 1 keeps "
                                    "50%% inside CLIP and Stage 3 25%% of those, 12.5%% of the visual tokens)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="LLaVA checkpoints: tokens to generate per answer")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the report")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="prefill latency and memory, or accuracy against retained tokens (fidelity)")
    p.add_argument("which", nargs="?", default="all",
                   choices=["llava", "llava-next", "eagle", "all", "qwen-vl", "decode", "fidelity", "gpu"],
                   help="llava: Stage 3 on a LLaVA-1.5-shaped model; llava-next: Stages 1 and 3 on a LLaVA-1.6-shaped "
                        "one (anyres, 2880 patch tokens); eagle: all stages on an EAGLE-X4-shaped one "
                        "(llava, llava-next, eagle and all measure prefill speed); qwen-vl: Stages 1 and 3 on a "
                        "Qwen2.5-VL-shaped one (transformers' class, not in all); decode: batched generate with the KV "
                        "cache on the LLaVA-1.5 shape (batch 8, 64 new tokens), tokens per second and KV-cache bytes; "
                        "fidelity: accuracy per question kind of a trained "
                        "two-encoder model under every pruning method at equal budgets (its options: "
                        "meteor-plugin bench fidelity --help); gpu: on a CUDA GPU, the "
                        "key column's exactness there and the full-size shapes (bfloat16, FlashAttention-2 where "
                        "installed) in one table (refused without a GPU)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each variant (median reported)")
    p.add_argument("--device", help="where the speed benches run (cpu, the default; cuda, cuda:1...; gpu: cuda)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="the speed benches' weights and activations (default float32; gpu: bfloat16)")
    p.add_argument("--quick", action="store_true", help="a tiny model: checks the benchmark runs, numbers mean little")
    p.add_argument("--shape", help="a full-size model for GPUs, random weights with the real 7B dimensions: "
                   "llava-1.5-7b, llava-next-7b, eagle-x4-7b or qwen2.5-vl-7b (use --device cuda --dtype bfloat16; "
                   "FlashAttention-2 where installed); refused where the device cannot hold it. gpu: that shape only")
    p.add_argument("--llm-layers", type=int, help="llava, llava-next, eagle, qwen-vl, decode: the language model's "
                   "depth. 32 is Vicuna-7B's, where the speed figures are headlined; the default, 8, is the quick "
                   "CPU-sized mode, where the fixed work (encoders, scoring) weighs about four times more")
    p.add_argument("--profile", action="store_true", help="llava, llava-next, eagle: also time each part of the pruned "
                   "prefill (encoders, projectors, decoder layers, each stage's scoring, selection and gathering) beside "
                   "its share of the FLOPs; eagle also profiles the unpruned run and gives the speedup without the "
                   "encoders both variants run whole")
    p.add_argument("--tp", type=int, metavar="N", help="llava: the prefill of transformers' LLaVA loaded tensor-parallel "
                   "over N ranks (tp_plan='auto'), relaunched under torch.distributed.run; on a CPU (gloo) a functional "
                   "check whose times mean little, on N GPUs (--device cuda) the pruned/unpruned ratio under tensor "
                   "parallelism")
    p.add_argument("--float-mask", action="store_true", help="llava, eagle: also time the pruned prefill with "
                   "proportional attention's sizes in an additive float mask (as transformers 4.x and eager attention "
                   "run it; SDPA then computes the full square) against the key column's causal path, interleaved")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.set_defaults(func=_bench)

    from meteor_plugin.calibrate import add_subparser as add_calibrate
    from meteor_plugin.patcher.cli import add_subparser as add_patch
    from meteor_plugin.training.convert import add_subparser as add_convert
    from meteor_plugin.training.merge import add_subparser as add_merge_lora

    add_calibrate(sub)
    sub.choices["calibrate"].set_defaults(func=_calibrate)
    add_convert(sub)
    add_merge_lora(sub)
    add_patch(sub)
    return parser


def _calibrate(args: argparse.Namespace) -> int:
    """``meteor-plugin calibrate``: images generated from the fidelity task when no folder is given, and the
    fidelity task's own checkpoints (built on the EAGLE stand-in) opened by the fidelity package."""
    from meteor_plugin import calibrate
    from meteor_plugin.fidelity import scene_images
    from meteor_plugin.fidelity.model import open_for_tools

    def load(path: str) -> tuple:
        found = open_for_tools(path)
        return found if found is not None else calibrate.load_checkpoint(path)

    return calibrate.run(args, load=load, generate=scene_images)


def _user_errors() -> tuple:
    """What a bad input raises: files, configs, checkpoints. Anything else is a bug and keeps its traceback."""
    from meteor_plugin.calibrate import CodebaseMissing
    from meteor_plugin.training.save import IncompleteCheckpointError

    return (ValueError, OSError, MemoryError, IncompleteCheckpointError, CodebaseMissing)


def _version() -> str:
    from meteor_plugin import __version__

    return __version__


def main(argv: Optional[List[str]] = None) -> int:
    import os

    import torch

    if not torch.cuda.is_available():
        # DeepSpeed (imported by transformers' integrations) otherwise prints a notice on stdout.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from meteor_plugin.compat.transformers import quiet_cli_notices

    quiet_cli_notices()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug, quiet = "--debug" in argv, "--no-progress" in argv
    argv = [a for a in argv if a not in ("--debug", "--no-progress")]  # accepted anywhere on the line
    args = parse(argv)
    from meteor_plugin.progress import silenced

    try:
        with silenced(quiet):
            return args.func(args)
    except _user_errors() as exc:
        if debug:
            raise
        print(f"meteor-plugin {args.command}: error: {str(exc) or type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a command that can report what it finished has done so (bench fidelity)
        if debug:
            raise
        print(f"meteor-plugin {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


INTERRUPTED = 130  # the shell's code for a program stopped by Ctrl-C


def parse(argv: List[str]) -> argparse.Namespace:
    """The command line: ``bench fidelity`` with its own parser (its ``--help`` lists its options alone)."""
    if argv[:1] == ["bench"]:
        rest = argv[1:]
        first = next((i for i, a in enumerate(rest) if not a.startswith("-")), None)
        if first is not None and rest[first] == "fidelity" and not any(a in ("-h", "--help") for a in rest[:first]):
            return fidelity_parser().parse_args(rest[:first] + rest[first + 1:])
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
