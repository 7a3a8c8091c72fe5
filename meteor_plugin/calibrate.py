"""meteor-plugin calibrate: the numbers METEOR measures once and then reuses.

- ``encoder_ranks``: the rank of each encoder's token-by-channel output features (the tokens its pruning
  boundary sees), averaged over a few images (METEOR found it barely varies from image to image). Stage 1
  splits its budget in proportion to them. ``--rank-measure``: ``effective`` (default) or ``numerical``
  (the paper's, which saturates at min(tokens, channels)); definitions in ``core/rank.py``.
- ``llm_lambda``: Stage 3 keeps ``K = llm_lambda * signal`` tokens (``llm_budget_signal``); given a target
  average (a count or a ratio of the visual tokens entering Stage 3), lambda is set so that the mean K
  over the calibration prompts hits it (before the per-sample clips).

Images come from a folder, or from a generator the caller hands in (``meteor-plugin calibrate`` without
``--images`` generates the fidelity task's scenes). The result is deterministic for the same images and model.
Each model's encoders are what its family states (``adapters.encoders_of``); checkpoints load through their
family's own loader (``adapters.spec_for_checkpoint``).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from . import adapters
from .adapters.family import IMAGE_TOKEN_INDEX
from .config import MeteorConfig
from .core.budget import Budget
from .core.rank import RANK_MEASURES, encoder_rank
from .progress import bar, counted
from .patching import enabled
from .runtime import stored_config
from .stats import stats

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PROMPTS = (
    "What is in this image?",
    "Describe the picture in detail.",
    "What colour is the object on the left?",
    "Read the text in the image.",
)


def load_images(folder: Optional[str], count: int, seed: int = 0,
                generate: Optional[Callable[[int, int], List[Any]]] = None) -> List[Any]:
    """``count`` PIL images: the first ones of ``folder`` in name order, or ``generate(count, seed)``'s."""
    from PIL import Image

    if count < 1:
        raise ValueError(f"count={count} is invalid: allowed >= 1 image")
    if folder is None:
        if generate is None:
            raise ValueError("no calibration images: give a folder of images (--images)")
        return list(generate(count, seed))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"calibration image folder not found: {folder}")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return [Image.open(os.path.join(folder, n)).convert("RGB") for n in names[:count]]


def image_processor(model: Any) -> Any:
    tower = model.get_model().get_vision_tower()
    processor = getattr(tower, "image_processor", None)
    if processor is None:
        raise ValueError(f"the vision tower {type(tower).__name__} has no image_processor to prepare images with")
    return processor


def pixels(model: Any, images: Sequence[Any]) -> torch.Tensor:
    values = image_processor(model)(images=list(images), return_tensors="pt")["pixel_values"]
    param = next(model.parameters())
    return values.to(device=param.device, dtype=param.dtype)


@torch.no_grad()
def encoder_ranks(model: Any, images: torch.Tensor, measure: str = "effective",
                  rtol: Optional[float] = None) -> Dict[str, float]:
    """Mean rank (``measure``, see ``core.rank``) of each encoder's output features (before any pruning)."""
    encoders = adapters.encoders_of(model)
    if encoders is None:
        raise ValueError(f"meteor-plugin calibrate does not know the encoders of {type(model).__name__}: no family "
                         "prunes it")
    out = {}
    with bar(len(encoders), "encoder ranks", "encoder") as progress:
        for part in encoders:
            out[part.name] = float(encoder_rank(part.run(images), measure, rtol).mean())
            progress.update(1)
    return out


@torch.no_grad()
def stage3_mass(model: Any, tokenizer: Any, images: torch.Tensor, config: MeteorConfig,
                prompts: Sequence[str] = PROMPTS) -> Dict[str, float]:
    """Mean Stage 3 budget signal (``llm_budget_signal``) and mean visual tokens entering Stage 3, measured in a
    scope of its own (the user's switch and configs are left as they are)."""
    # Every token kept, and lambda 1: the coverage count then never stops early (its limit is llm_max_keep / lambda)
    probe = config.replace(llm=True, llm_min_keep=1.0, llm_max_keep=1.0, llm_lambda=1.0)
    masses, entering = [], []
    with enabled(probe):
        for i in counted(images.shape[0], "Stage 3 signal", "image"):
            text = f"USER: <image>\n{prompts[i % len(prompts)]} ASSISTANT:"
            before, after = text.split("<image>")
            ids = tokenizer(before).input_ids + [IMAGE_TOKEN_INDEX] + tokenizer(after, add_special_tokens=False).input_ids
            model(input_ids=torch.tensor([ids], device=images.device), images=images[i:i + 1])
            llm = stats(model).stages[0]["llm"]
            masses.append(float(llm.detail["signal"]))
            entering.append(llm.entered)
    return {"signal": sum(masses) / len(masses), "visual_tokens": sum(entering) / len(entering)}


def lambda_for(target: Budget, signal: float, visual_tokens: float) -> float:
    tokens = target * visual_tokens if isinstance(target, float) else float(target)
    if signal <= 0:
        raise ValueError("the calibration prompts gave no visual attention: cannot set llm_lambda")
    return tokens / signal


def calibrate(model: Any, images: torch.Tensor, base: Optional[MeteorConfig] = None, tokenizer: Any = None,
              target_keep: Optional[Budget] = None, rank_measure: str = "effective") -> MeteorConfig:
    base = base or MeteorConfig()
    ranks = encoder_ranks(model, images, rank_measure)
    config = base.replace(encoder_ranks=ranks)
    if target_keep is not None:
        if tokenizer is None:
            raise ValueError("--target-keep needs the checkpoint's tokenizer to build calibration prompts")
        measured = stage3_mass(model, tokenizer, images, config)
        config = config.replace(llm_lambda=lambda_for(target_keep, measured["signal"], measured["visual_tokens"]))
    return config


class CodebaseMissing(ModuleNotFoundError):
    """The checkpoint's codebase (LLaVA's or EAGLE's package) is not importable: a user's setup, not a bug."""


def load_checkpoint(model_path: str):
    """(tokenizer or processor, model) through the codebase's own loader, in float32 on the CPU: LLaVA's or EAGLE's
    ``load_pretrained_model`` (a checkpoint whose family builds extra modules at load time, a converted EAGLE
    checkpoint's per-encoder projectors, gets them: the family's ``loading`` context is around the load), else the
    family's own (transformers' checkpoints: its processor and class)."""
    import json

    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_path} is not a checkpoint folder: it has no config.json")
    with open(path) as fh:
        config = json.load(fh)
    model_type = config.get("model_type")
    try:
        codebase = adapters.spec_for_checkpoint(config, model_path)
    except ValueError:
        opened = adapters.open_checkpoint(model_path, config)  # a transformers checkpoint: its own loaders
        if opened is None:
            raise
        return opened
    try:
        load_pretrained_model, get_model_name_from_path = codebase.loader()
    except ModuleNotFoundError as exc:
        article = "an" if codebase.title[:1] in "AEIOU" else "a"
        raise CodebaseMissing(f"{model_path} is {article} {codebase.title} checkpoint ({model_type}): calibrate loads "
                              f"it with {codebase.title}'s own code, which is not importable here ({exc}); "
                              f"{codebase.notes['install']}") from None
    with codebase.loading(config):
        tokenizer, model, _, _ = load_pretrained_model(model_path, None, get_model_name_from_path(model_path),
                                                       device_map="cpu", device="cpu")
    return tokenizer, model.float().eval()


def add_subparser(subparsers: Any) -> None:
    p = subparsers.add_parser("calibrate", help="measure encoder ranks and Stage 3's lambda for a checkpoint, or its "
                              "operating points on your own questions (--questions)")
    p.add_argument("--model-path", required=True, help="a LLaVA, EAGLE or transformers (llava-hf, Qwen-VL) checkpoint "
                                                        "folder")
    p.add_argument("--images", help="a folder of images (default: generated scenes of the fidelity task)")
    p.add_argument("--num-images", type=int, default=8, help="images the ranks are measured on (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images")
    p.add_argument("--config", help="a MeteorConfig to start from (default: the checkpoint's, or the defaults)")
    p.add_argument("--target-keep", type=float, help="also set llm_lambda: mean tokens Stage 3 keeps "
                   "(a ratio < 1 of the tokens entering it, or a count)")
    p.add_argument("--rank-measure", default="effective", choices=list(RANK_MEASURES),
                   help="effective (default): the effective rank of the centred features; numerical: the "
                        "paper's, which saturates at min(tokens, channels) and so splits the budget uniformly")
    q = p.add_argument_group("operating points on your own questions")
    q.add_argument("--questions", help="a .jsonl file of questions in LLaVA's format ({\"image\", \"question\" or "
                   "\"text\", \"answer\"} per line): sweep Stage 3's layer and budget, measure accuracy and prefill "
                   "FLOPs at each point, and write the cheapest config that keeps the unpruned accuracy")
    q.add_argument("--image-folder", help="where the questions' images are (default: the file's folder)")
    q.add_argument("--layers", help="comma-separated Stage 3 layers to try (default: a spread of the model's)")
    q.add_argument("--budgets", default="0.5,0.25,0.125", help="comma-separated average budgets to try, ratios of "
                   "the visual tokens entering Stage 3 (default 0.5,0.25,0.125)")
    q.add_argument("--tolerance", type=float, default=0.01, help="accuracy a chosen point may lose, as a share of "
                   "the unpruned model's (default 0.01)")
    q.add_argument("--max-questions", type=int, help="use the first N questions only")
    q.add_argument("--max-new-tokens", type=int, default=8, help="tokens generated per answer (default 8)")
    q.add_argument("--conv-mode", help="LLaVA/EAGLE: the conversation template (default llava_v1); transformers' "
                   "checkpoints use their processor's chat template")
    q.add_argument("--flops-questions", type=int, default=8, help="questions whose prefill FLOPs are counted per "
                   "point (default 8)")
    q.add_argument("--plot", help="also draw accuracy against prefill FLOPs per point in this PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="where to write the calibrated config (.json)")
    p.set_defaults(func=run)


def run(args: Any, load: Callable[[str], tuple] = load_checkpoint,
        generate: Optional[Callable[[int, int], List[Any]]] = None) -> int:
    """``meteor-plugin calibrate``: ``load(model path)`` gives (tokenizer, model); ``generate(count, seed)`` the
    images when no folder is given."""
    if getattr(args, "questions", None):
        return run_questions(args, load)
    tokenizer, model = load(args.model_path)
    base = MeteorConfig.from_file(args.config) if args.config else (stored_config(model.config) or MeteorConfig())
    target = None
    if args.target_keep is not None:
        target = args.target_keep if args.target_keep < 1 else int(args.target_keep)
    config = calibrate(model, pixels(model, load_images(args.images, args.num_images, args.seed, generate)), base,
                       tokenizer, target, args.rank_measure)
    config.save(args.out)
    print(f"encoder ranks ({args.rank_measure}): {config.encoder_ranks}")
    if target is not None:
        wanted = f"{target:.0%} of the visual tokens entering Stage 3" if isinstance(target, float) else \
            f"{target} visual tokens"
        print(f"llm_lambda: {config.llm_lambda:.3f} (Stage 3 keeps {wanted} on average)")
    print(f"wrote {args.out}")
    return 0


def calibrate_checkpoint(model_path: str, images_dir: str, config: MeteorConfig) -> MeteorConfig:
    """The hook ``meteor-plugin convert --calibration-images DIR`` calls: encoder ranks on those images."""
    _, model = load_checkpoint(model_path)
    return config.replace(encoder_ranks=encoder_ranks(model, pixels(model, load_images(images_dir, 8))))


def run_questions(args: Any, load: Callable[[str], tuple] = load_checkpoint) -> int:
    """``meteor-plugin calibrate --questions``: the operating points (``operating_points.py``) on the user's own
    questions, and the chosen config written, only once everything has run."""
    from . import operating_points as op

    if not args.out.endswith(".json"):
        raise ValueError(f"--out {args.out}: a calibrated config is written as .json")
    questions = op.load_questions(args.questions, args.image_folder, args.max_questions)
    budgets = [float(b) for b in args.budgets.split(",")]
    if any(not 0 < b < 1 for b in budgets):
        raise ValueError(f"--budgets {args.budgets}: each a ratio in (0, 1) of the visual tokens entering Stage 3")
    _require_tokenizer(args.model_path)
    processor, model = load(args.model_path)
    family = adapters.family_of(model)
    if family is None:
        raise ValueError(f"{args.model_path}: no family prunes {type(model).__name__}")
    base = MeteorConfig.from_file(args.config) if args.config else (stored_config(model.config) or MeteorConfig())
    text_config = getattr(model.config, "text_config", None) or model.config
    layers = ([int(x) for x in args.layers.split(",")] if args.layers
              else op.default_layers(int(text_config.num_hidden_layers)))
    asker = op.Asker(model, processor, family, questions, args.conv_mode, args.max_new_tokens, not args.no_progress)
    points = op.sweep(asker, base, layers, budgets, args.flops_questions)
    op.score(points, questions)
    chosen, keeps = op.choose(points, args.tolerance)
    print(f"{len(questions)} questions from {args.questions}; {type(model).__name__}")
    print(op.table(points, chosen))
    verdict = "keeps" if keeps else "does NOT keep (no point did; the most accurate is chosen)"
    print(f"chosen: {chosen.label()}: {verdict} the unpruned accuracy within {args.tolerance:.0%}, at "
          f"{chosen.gflops / points[0].gflops:.0%} of its prefill FLOPs")
    if args.plot:
        print(f"plot: {op.plot(points, args.plot)}")
    temporary = args.out + ".partial"
    chosen.config.save(temporary)
    os.replace(temporary, args.out)  # written whole, or not at all
    print(f"wrote {args.out}")
    return 0


def _require_tokenizer(model_path: str) -> None:
    """A checkpoint the questions are asked through must carry its tokenizer (or processor)."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if os.path.isdir(model_path) and not any(os.path.isfile(os.path.join(model_path, n)) for n in names):
        raise ValueError(f"{model_path} has no tokenizer ({', '.join(names)}): calibrate asks the questions through it")
