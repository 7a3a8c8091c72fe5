"""meteor-plugin convert: an existing LLaVA (or EAGLE) checkpoint becomes a METEOR checkpoint.

    meteor-plugin convert --model-path SRC --out DST [--config cfg.json] [--calibration-images DIR]

DST is a copy of SRC (training leftovers such as ``checkpoint-*`` and optimizer states are not copied)
whose ``config.json`` carries the METEOR config under ``"meteor"``: ``meteor_plugin.enable()`` without a
config then prunes that model with those settings, in the upstream loaders and eval scripts too. A
codebase that needs new weights (EAGLE: per-encoder projectors for Stage 2) rewrites them through its
``convert_weights`` hook (its ``TrainingSpec``); LLaVA has one encoder and needs none.

Rules, each enforced with an error that names the problem:
- SRC is never written to; DST must not exist (or be empty) and must not overlap SRC;
- a checkpoint that already has a METEOR config is not converted again;
- a LoRA adapter folder is not a model: merge it first (``meteor-plugin merge-lora``);
- DST's name must keep what upstream loaders read in it: LLaVA's ``load_pretrained_model`` only builds
  the image processor for a folder whose name contains "llava" (EAGLE: "eagle"), and takes any name
  containing "lora" for an unmerged adapter.
DST is assembled in a hidden sibling folder and renamed into place at the end, so an interrupted
conversion leaves no half-written DST (and the next run removes the sibling a killed one left).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

from .. import adapters
from ..calibrate import calibrate_checkpoint
from ..checkpoint_files import read_json_object
from ..config import MeteorConfig
from ..progress import bar
from . import save

# What training leaves next to a model and a converted checkpoint does not need.
LEFTOVERS = re.compile(
    r"^(checkpoint-\d+|global_step\d+|optimizer\.pt|scheduler\.pt|rng_state.*\.pth|trainer_state\.json|"
    r"training_args\.bin|zero_to_fp32\.py|zero_to_torch\.py|latest|meteor-saving|meteor-complete\.json|"
    r"\.meteor-final|runs|wandb)$"
)


class ConversionError(ValueError):
    pass


@dataclass
class ConvertJob:
    """What a codebase's ``convert_weights`` hook receives."""

    source: str  # the original checkpoint (read only)
    folder: str  # the copy being converted (write here)
    config: MeteorConfig
    model_config: Dict[str, Any]  # the copy's config.json as a dict; written back after the hook


def loader_model_name(path: str) -> str:
    """The name upstream loaders derive from a path (``get_model_name_from_path``): the last component,
    or ``parent_checkpoint-N`` for a ``checkpoint-N`` folder."""
    parts = os.path.abspath(path).rstrip(os.sep).split(os.sep)
    return f"{parts[-2]}_{parts[-1]}" if parts[-1].startswith("checkpoint-") else parts[-1]


def check_model_name(path: str, keyword: str, what: str) -> None:
    name = loader_model_name(path)
    if keyword not in name.lower():
        raise ConversionError(
            f"{what} {path}: its name {name!r} lacks {keyword!r}, which {keyword.upper()}'s load_pretrained_model "
            f"needs to build the image processor (the eval scripts would run without images). Choose a name "
            f"with {keyword!r} in it, e.g. {os.path.join(os.path.dirname(os.path.abspath(path)), name + '-' + keyword)}"
        )
    if "lora" in name.lower():
        raise ConversionError(
            f"{what} {path}: its name {name!r} contains 'lora', which upstream loaders take for an unmerged "
            "LoRA adapter (they then look for non_lora_trainables.bin and a --model-base). Choose a name without it"
        )


def read_model_config(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    return read_json_object(path, "the object of a model config", ConversionError)


def _inside(child: str, parent: str) -> bool:
    child, parent = os.path.realpath(child), os.path.realpath(parent)
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_source(model_path: str) -> Dict[str, Any]:
    if not os.path.isdir(model_path):
        raise ConversionError(f"--model-path {model_path} is not a folder")
    save.require_loadable(model_path, "--model-path")
    if os.path.isfile(os.path.join(model_path, "adapter_config.json")):
        raise ConversionError(
            f"{model_path} is a LoRA adapter, not a model: merge it first with "
            f"`meteor-plugin merge-lora --model-path {model_path} --out MERGED`, then convert MERGED"
        )
    config = read_model_config(model_path)
    if "meteor" in config:
        raise ConversionError(
            f"{model_path} is already a METEOR checkpoint (its config.json has a 'meteor' entry): converting it "
            "again would stack a second conversion on the first. Convert the original checkpoint, or change the "
            "stored settings with --meteor-config / meteor_plugin.enable(config) at run time"
        )
    return config


def check_destination(out: str, model_path: str) -> None:
    if _inside(out, model_path) or _inside(model_path, out):
        raise ConversionError(f"--out {out} overlaps --model-path {model_path}: the source is never written to")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConversionError(f"--out {out} already exists and is not empty: choose a new folder")


def write_model_config(folder: str, config: Dict[str, Any]) -> None:
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")


def convert(model_path: str, out: str, config: Any = None, calibration_images: Optional[str] = None,
            codebase: Optional[str] = None, calibrator: Callable[[str, str, Any], Any] = calibrate_checkpoint) -> str:
    """Convert ``model_path`` into a METEOR checkpoint at ``out``; returns ``out``.

    ``config``: a MeteorConfig, a path to a .json/.yaml, or None for the defaults. With ``calibration_images``,
    ``calibrator(copied checkpoint, images folder, config)`` returns the calibrated config to store (by default
    ``meteor-plugin calibrate``'s encoder ranks on those images).
    """
    model_path, out = os.path.abspath(model_path), os.path.abspath(out)
    model_config = check_source(model_path)
    cb = adapters.training_spec(codebase) if codebase else adapters.spec_for_checkpoint(model_config, model_path)
    check_destination(out, model_path)
    check_model_name(out, cb.keyword, "--out")
    convert_weights = cb.hook("convert_weights")
    if cb.weights_required and convert_weights is None:
        raise ConversionError(f"cannot convert {model_path}: {cb.weights_missing_reason}")
    if calibration_images is not None and not os.path.isdir(calibration_images):
        raise ConversionError(f"--calibration-images {calibration_images} is not a folder")
    if config is None:
        meteor = MeteorConfig()
    elif isinstance(config, MeteorConfig):
        meteor = config
    else:
        meteor = MeteorConfig.from_file(config)

    staging = save.staging_folder(out)
    steps = 2 + (convert_weights is not None) + (calibration_images is not None)  # copy, ..., write
    try:
        with bar(steps, "convert") as progress:
            progress.set_postfix_str("copying the checkpoint")
            shutil.copytree(model_path, staging, ignore=lambda _d, names: [n for n in names if LEFTOVERS.match(n)])
            progress.update(1)
            job = ConvertJob(source=model_path, folder=staging, config=meteor, model_config=read_model_config(staging))
            if convert_weights is not None:
                progress.set_postfix_str("converting the weights")
                convert_weights(job)
                progress.update(1)
            if calibration_images is not None:
                progress.set_postfix_str("calibrating")
                write_model_config(staging, job.model_config)
                job.config = _calibrated(calibrator, staging, calibration_images, job.config)
                progress.update(1)
            job.model_config["meteor"] = job.config.to_dict()
            write_model_config(staging, job.model_config)
            save.finish(staging)
            progress.update(1)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _calibrated(calibrator: Callable[[str, str, Any], Any], folder: str, images: str, config: Any) -> Any:
    result = calibrator(folder, images, config)
    if not isinstance(result, MeteorConfig):
        raise TypeError(f"the calibrator returned {type(result).__name__}, not a MeteorConfig")
    return result


def _run(args: argparse.Namespace) -> int:
    try:
        out = convert(args.model_path, args.out, args.config, args.calibration_images, args.codebase)
    except (ConversionError, save.IncompleteCheckpointError, ValueError,
            FileNotFoundError) as exc:
        print(f"meteor-plugin convert: error: {exc}", file=__import__("sys").stderr)
        return 2
    stored = read_model_config(out)["meteor"]
    print(f"converted {args.model_path} -> {out}")
    print("METEOR config stored in config.json: " + json.dumps(stored, sort_keys=True))
    return 0


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert", help="make a METEOR checkpoint (config and, for EAGLE, per-encoder projectors) from an existing one",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="the checkpoint to convert (never modified)")
    parser.add_argument("--out", required=True, help="the new folder; its name must keep 'llava' (or 'eagle')")
    parser.add_argument("--config", help="a MeteorConfig .json/.yaml to store (default: MeteorConfig's defaults)")
    parser.add_argument("--calibration-images", help="a folder of images to calibrate ranks and lambda on")
    parser.add_argument("--codebase", choices=sorted(adapters.training_specs()), help="default: from config.json's model_type")
    parser.set_defaults(func=_run)
    return parser
