"""A tiny training workspace: a tiny LLaVA (or EAGLE-like) checkpoint, images and a conversation JSON.

What the tiny CPU recipe (``recipes/tiny-cpu.sh``) and the training tests run on:

    python -m meteor_plugin.testing.workspace WORKDIR [--codebase eagle]     # prints the paths as JSON

The EAGLE checkpoint is one of the test stand-in (``meteor_plugin.testing.eagle_like``) with three
encoders, ``clip-448;convnext-1024;pix2struct-1024``: CLIP is pruned inside (between its blocks), the
others at their output, and SAM's tiny tower (4096 tokens) would triple the step time on CPU.

Samples are single-turn v1 conversations in LLaVA's format (``{"id", "image", "conversations": [{"from":
"human", "value": "<image>\\n..."}, {"from": "gpt", "value": ...}]}``) about generated images: a coloured
square on a dark background, and the answer names the colour and the quadrant. Every word is in the tiny
tokenizer's vocabulary (``testing/checkpoint.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Dict, List, Optional

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 220), "yellow": (230, 220, 40)}
PLACES = {("top", "left"): (0, 0), ("top", "right"): (1, 0), ("bottom", "left"): (0, 1), ("bottom", "right"): (1, 1)}
QUESTIONS = (
    "what is the colour of the square in this image ?",
    "describe the shape in this image .",
    "what is in the image ?",
)


def write_images_and_data(folder: str, samples: int = 16, image_size: int = 32, seed: int = 0,
                          text_only: int = 0) -> Dict[str, str]:
    """Write ``folder/images/*.png`` and ``folder/data.json``; returns their paths.

    ``text_only`` samples have no image (LLaVA feeds them a zero image): the batch mixes both kinds.
    """
    from PIL import Image

    rng = random.Random(seed)
    image_dir = os.path.join(folder, "images")
    os.makedirs(image_dir, exist_ok=True)
    records: List[dict] = []
    half = image_size // 2
    for i in range(samples):
        colour = rng.choice(sorted(COLOURS))
        (vertical, horizontal), (cx, cy) = rng.choice(sorted(PLACES.items()))
        image = Image.new("RGB", (image_size, image_size), (rng.randint(0, 30),) * 3)
        side = rng.randint(half // 2, half)
        x0 = cx * half + rng.randint(0, half - side)
        y0 = cy * half + rng.randint(0, half - side)
        image.paste(COLOURS[colour], (x0, y0, x0 + side, y0 + side))
        name = f"{i:04d}.png"
        image.save(os.path.join(image_dir, name))
        question = QUESTIONS[i % len(QUESTIONS)]
        answer = f"a {colour} square in the {vertical} {horizontal} ."
        records.append({
            "id": f"tiny-{i}", "image": name,
            "conversations": [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}],
        })
    for j in range(text_only):
        records.append({
            "id": f"tiny-text-{j}",
            "conversations": [{"from": "human", "value": "what is one ?"}, {"from": "gpt", "value": "one is one ."}],
        })
    data = os.path.join(folder, "data.json")
    with open(data, "w", encoding="utf-8") as fh:
        json.dump(records, fh, indent=1)
    return {"data_path": data, "image_folder": image_dir}


def prepare(workdir: str, samples: int = 16, seed: int = 0, spec=None) -> Dict[str, str]:
    """A tiny LLaVA checkpoint (``workdir/models/tiny-llava-v1``) and data (``workdir/data``)."""
    from .checkpoint import save_tiny_llava_checkpoint, vision_tower_path
    from .llava import TinyLlavaSpec

    spec = spec or TinyLlavaSpec()
    checkpoint = save_tiny_llava_checkpoint(os.path.join(workdir, "models"), spec)
    paths = write_images_and_data(os.path.join(workdir, "data"), samples, spec.image_size, seed)
    return {"model_name_or_path": checkpoint, "vision_tower": vision_tower_path(checkpoint), **paths}


EAGLE_TOWERS = "clip-448;convnext-1024;pix2struct-1024"


def prepare_eagle(workdir: str, samples: int = 16, seed: int = 0, spec=None) -> Dict[str, str]:
    """A tiny EAGLE-like checkpoint (``workdir/models/tiny-eagle-x3``, not converted) and data."""
    from .checkpoint import save_tiny_tokenizer
    from .eagle_like import TinyEagleSpec, install, save_tiny_eagle

    install()
    spec = spec or TinyEagleSpec(vision_tower=EAGLE_TOWERS)
    checkpoint = os.path.join(workdir, "models", "tiny-eagle-x3")
    save_tiny_eagle(checkpoint, spec, tokenizer=False)
    save_tiny_tokenizer(checkpoint, spec.vocab_size)  # knows the words of LLaVA's v1 template and the data
    paths = write_images_and_data(os.path.join(workdir, "data"), samples, 64, seed)
    return {"model_name_or_path": checkpoint, "vision_tower": spec.vision_tower, **paths}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meteor_plugin.testing.workspace", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--codebase", choices=("llava", "eagle"), default="llava")
    args = parser.parse_args(argv)
    make = prepare_eagle if args.codebase == "eagle" else prepare
    print(json.dumps(make(args.workdir, args.samples, args.seed), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
