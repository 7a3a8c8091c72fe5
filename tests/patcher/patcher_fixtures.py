"""Synthetic LLaVA and EAGLE trees for the patcher tests.

Each tree has the upstream paths and, in each file, the structural landmarks the patcher hooks (the
``if __name__ == "__main__":`` block and the call it makes, the module-level imports before a model
load or ``class Eagle``, ``class EagleConfig``, the ``--bits`` kwargs in ``train()``), written from the
documented structure of those files (``patches/README.md``, ``llava-eagle-anatomy.md``). Everything
else is filler of our own; no upstream code is copied. Indentation matches upstream where our lines
take theirs from it (4 spaces in ``__main__`` blocks, 8 in ``train()``'s ``--bits`` branch), so the
``+`` lines of a patch made from these trees are the ones in ``patches/``.

``build_tree(..., positions)`` also puts each landmark on the line where upstream has it (the lines
named by the hunks of ``patches/*.patch``), padding with comment lines, so that the committed
zero-context patches apply to these trees as they do to the upstream ones.

The filler of ``train.py``, ``eagle_llama.py`` and EAGLE's ``builder.py`` runs, so that tests can
show the two tree fixes work.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from meteor_plugin.adapters.eagle import PATCHER as EAGLE
from meteor_plugin.adapters.llava import PATCHER as LLAVA
from meteor_plugin.source_edits.edits import plan

LAYOUTS = ("c121f04", "llava-torch-1.2.2", "fef95f1")

# Where filler lines may go: one slot before each landmark, in file order. Without positions the slots
# are dropped; with positions they are filled so each landmark sits on its upstream line.
PAD = "# <pad>\n"
FILLER = "# (synthetic filler line)\n"


def _script(pkg: str, func: str, call: str, define: str = "") -> str:
    """An argparse script whose ``__main__`` block parses its arguments and calls ``call``."""
    body = define or f"def {func}(args):\n    return load_pretrained_model(args.model_path, None, 'name')\n"
    return (
        f'"""Synthetic stand-in (filler) with the landmarks the METEOR patcher hooks."""\n'
        "import argparse\n"
        "import json\n\n"
        f"from {pkg}.model.builder import load_pretrained_model\n\n\n"
        "def split_list(items, n):\n"
        "    return [items[i::n] for i in range(n)]\n\n\n"
        f"{body}\n\n"
        f"{PAD}"
        'if __name__ == "__main__":\n'
        "    parser = argparse.ArgumentParser()\n"
        '    parser.add_argument("--model-path", type=str, default="model")\n'
        '    parser.add_argument("--answers-file", type=str, default="answers.jsonl")\n'
        "    args = parser.parse_args()\n\n"
        f"    {call}\n"
    )


def _worker_script(pkg: str) -> str:
    define = (
        "class ModelWorker:\n"
        "    def __init__(self, model_path):\n"
        "        self.model = load_pretrained_model(model_path, None, 'name')\n"
    )
    return _script(pkg, "", "worker = ModelWorker(args.model_path)", define)


def _train_launcher(module: str, call: str) -> str:
    return f"from {module} import train\n\n{PAD}if __name__ == \"__main__\":\n    {call}\n"


# train(): the --bits branch builds from_pretrained kwargs with load_in_*bit beside quantization_config.
# Runs: parse_arguments() and load_model() are hooks a test replaces.
TRAIN = '''"""Synthetic stand-in (filler) for train.py with the landmarks the METEOR patcher hooks."""
import types


def parse_arguments():
    return types.SimpleNamespace(bits=16, double_quant=True)


def load_model(**kwargs):
    return dict(kwargs)


# <pad>
def train(attn_implementation=None):
    training_args = parse_arguments()
    bnb_model_from_pretrained_args = {}
    if training_args.bits in [4, 8]:
        bnb_model_from_pretrained_args.update(dict(
            device_map={"": "cpu"},
            load_in_4bit=training_args.bits == 4,
            load_in_8bit=training_args.bits == 8,
            quantization_config={"bits": training_args.bits, "double_quant": training_args.double_quant},
        ))

    model = load_model(attn_implementation=attn_implementation, **bnb_model_from_pretrained_args)
    if training_args.bits in [4, 8]:
        model["prepared_for_kbit"] = True
    return model


# <pad>
if __name__ == "__main__":
    train()
'''

EAGLE_LLAMA = '''"""Synthetic stand-in (filler) for eagle_llama.py: the config class and what follows it."""
from transformers import LlamaConfig


# <pad>
class EagleConfig(LlamaConfig):
    model_type = "synthetic_eagle_llama"


class EagleLlamaModel:
    config_class = EagleConfig
'''

# builder.py's LoRA branch imports the misspelt name, as upstream's does (the bug the patch fixes).
EAGLE_BUILDER = '''"""Synthetic stand-in (filler) for eagle/model/builder.py."""


def load_pretrained_model(model_path, model_base, model_name):
    if "lora" in model_name.lower() and model_base is not None:
        from eagle.model.language_model.eagle_llama import eagleConfig
        return eagleConfig
    return None
'''

LLAVA_BUILDER = '''"""Synthetic stand-in (filler) for llava/model/builder.py."""


def load_pretrained_model(model_path, model_base, model_name):
    return None
'''


def _tower_builder(with_s2: bool) -> str:
    extra = "\n\nclass CLIPVisionTowerS2:\n    pass\n" if with_s2 else ""
    return f'"""Synthetic stand-in (filler) for the vision tower builder."""\n\n\nclass CLIPVisionTower:\n    pass\n{extra}'


LMMS_MODEL = '''"""Synthetic stand-in (filler) for lmms_eval/models/eagle.py."""
import logging

from lmms_eval.api.registry import register_model

logging.basicConfig()
eval_logger = logging.getLogger("synthetic")

try:
    from eagle.model.builder import load_pretrained_model
except ImportError:
    eval_logger.error("eagle is not importable")

# <pad>
from typing import List, Optional


def resize(image, size):
    return image


@register_model("eagle")
class Eagle:
    def __init__(self, pretrained: str = "model", batch_size: Optional[int] = 1):
        self.model = load_pretrained_model(pretrained, None, "eagle")

    def generate_until(self, requests) -> List[str]:
        return ["" for _ in requests]
'''

PREDICT_DEMO = '''"""Synthetic stand-in (filler) for predict_demo.py: loads the model at module level."""
import os

from eagle.model.builder import load_pretrained_model
# <pad>
from eagle.mm_utils import get_model_name_from_path

model_path = os.environ.get("MODEL", "model")
model_name = get_model_name_from_path(model_path)
tokenizer, model, processor, context_len = load_pretrained_model(model_path, None, model_name)
print(model)
'''

GRADIO_DEMO = '''"""Synthetic stand-in (filler) for gradio_demo.py: parses arguments at module level."""
import argparse

# <pad>
from eagle.model.builder import load_pretrained_model

# a comment between the imports and the first statement
buttons = []
argparser = argparse.ArgumentParser()
argparser.add_argument("--model-path", default="model", type=str)
args = argparser.parse_args()
model = load_pretrained_model(args.model_path, None, "eagle")
'''


def llava_files(layout: str) -> Dict[str, str]:
    files = {
        "llava/__init__.py": "",
        "llava/model/builder.py": LLAVA_BUILDER,
        "llava/model/multimodal_encoder/builder.py": _tower_builder(with_s2=layout == "c121f04"),
        "llava/train/train.py": TRAIN,
        "llava/train/train_mem.py": _train_launcher("llava.train.train", 'train(attn_implementation="flash_attention_2")'),
        "llava/train/train_xformers.py": _train_launcher("llava.train.train", "train()"),
        "llava/serve/cli.py": _script("llava", "main", "main(args)"),
        "llava/serve/model_worker.py": _worker_script("llava"),
        "llava/serve/gradio_web_server.py": '"""Not an entry point the patcher touches."""\n',
    }
    for name in ("model_vqa_loader", "model_vqa", "model_vqa_science", "model_vqa_mmbench", "run_llava"):
        files[f"llava/eval/{name}.py"] = _script("llava", "eval_model", "eval_model(args)")
    if layout == "c121f04":  # a checkout also has files at its root
        files["pyproject.toml"] = '[project]\nname = "synthetic-llava"\n'
        files["predict.py"] = '"""Not patched (a Cog predictor)."""\n'
    return files


def eagle_files() -> Dict[str, str]:
    files = {
        "eagle/__init__.py": "",
        "eagle/model/builder.py": EAGLE_BUILDER,
        "eagle/model/__init__.py": "",
        "eagle/model/language_model/__init__.py": "",
        "eagle/model/language_model/eagle_llama.py": EAGLE_LLAMA,
        "train.py": TRAIN,
        "train_mem.py": _train_launcher("train", 'train(attn_implementation="flash_attention_2")'),
        "lmms_eval/models/eagle.py": LMMS_MODEL,
        "predict_demo.py": PREDICT_DEMO,
        "gradio_demo.py": GRADIO_DEMO,
        "requirements.txt": "transformers==4.44.2\n",
        "eagle/eval/model_vqa_mmmu.py": _script("eagle", "main", "main()", "def main():\n    return None\n"),
    }
    for name in ("model_vqa_loader", "model_vqa", "model_vqa_science", "model_vqa_mmbench", "run_eagle"):
        files[f"eagle/eval/{name}.py"] = _script("eagle", "eval_model", "eval_model(args)")
    return files


def files_for(layout: str) -> Dict[str, str]:
    return eagle_files() if layout == "fef95f1" else llava_files(layout)


def _place(spec, text: str, targets: List[int]) -> str:
    """Fill the pad slots so that the patcher's insertion points fall after the ``targets`` lines."""
    parts = text.split(PAD)
    if len(parts) - 1 != len(targets):
        raise ValueError(f"{spec.path}: {len(parts) - 1} pad slots for {len(targets)} upstream positions")
    fills = [0] * len(targets)
    for slot, target in enumerate(targets):
        current = "".join(p + FILLER * n for p, n in zip(parts, fills)) + "".join(parts[len(fills):])
        where = [index for index, _, _ in plan(spec, current)][slot]
        if where > target:
            raise ValueError(f"{spec.path}: the synthetic file is too long to put landmark {slot} on line {target}")
        fills[slot] = target - where
    return "".join(p + FILLER * n for p, n in zip(parts, fills + [0]))


def build_tree(root: str, layout: str, positions: Optional[Dict[str, List[int]]] = None) -> str:
    """Write the synthetic tree for ``layout`` under ``root``; returns ``root``.

    ``positions`` (path -> the lines after which the patcher inserts, as upstream has them) puts each
    landmark on its upstream line, so that zero-context patches made from the upstream files apply.
    """
    codebase = EAGLE if layout == "fef95f1" else LLAVA
    for path, text in files_for(layout).items():
        if positions is not None and path in positions:
            text = _place(codebase.spec(path), text, positions[path])
        else:
            text = text.replace(PAD, "")
        full = os.path.join(root, *path.split("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
    return root


def snapshot(root: str) -> Dict[str, bytes]:
    """Every file under ``root`` and its bytes."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            full = os.path.join(folder, name)
            with open(full, "rb") as fh:
                out[os.path.relpath(full, root).replace(os.sep, "/")] = fh.read()
    return out
