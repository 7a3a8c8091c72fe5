"""One record per model family: inference, training and the patcher all read ``adapters.FAMILIES``, and no
module outside ``adapters/`` restates an upstream codebase's module paths."""

import ast
import importlib
import os
import pathlib

import pytest

import meteor_plugin
from meteor_plugin import adapters, patcher
from meteor_plugin.adapters.family import Family
from meteor_plugin.patcher.codebases import Codebase as PatcherCodebase
from meteor_plugin.patcher.codebases import Layout, main_script
from meteor_plugin.run import training_modules
from meteor_plugin.training import codebases
from meteor_plugin.training.codebases import Codebase as TrainingCodebase

PACKAGE = pathlib.Path(meteor_plugin.__file__).parent
# Where upstream codebases keep their models, training and loaders.
UPSTREAM = ("llava.model", "llava.train", "llava.mm_utils", "llava.eval", "eagle.model", "eagle.mm_utils",
            "transformers.models.llava")
# adapters/ declares them; testing/ builds stand-ins laid out like them (EAGLE is not on PyPI).
ALLOWED = ("adapters", "testing")


def _code_strings(tree: ast.AST):
    """Imported module names and string constants, less docstrings."""
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            docstrings.add(id(body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_no_module_outside_the_adapters_names_an_upstream_module():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] in ALLOWED:
            continue
        for line, text in _code_strings(ast.parse(path.read_text(encoding="utf-8"))):
            if any(text == name or text.startswith(name + ".") for name in UPSTREAM):
                found.append(f"{relative}:{line}: {text}")
    assert found == []


def test_every_family_is_one_module_with_one_record():
    records = {}
    folder = PACKAGE / "adapters"
    modules = [p.stem for p in sorted(folder.glob("*.py"))] + [p.parent.name for p in sorted(folder.glob("*/__init__.py"))]
    for name in modules:  # a family's module, or its package
        module = importlib.import_module(f"meteor_plugin.adapters.{name}")
        if isinstance(getattr(module, "FAMILY", None), Family):
            records[name] = module.FAMILY
    # every module with a record is listed, once, and nothing else is
    assert sorted(map(id, records.values())) == sorted(map(id, adapters.FAMILIES))
    assert sorted(records) == ["eagle", "hf_llava", "llava", "qwen_vl"]
    names = [family.name for family in adapters.FAMILIES]
    assert len(set(names)) == len(names) and set(adapters.BY_NAME) == set(names)
    # The training and patcher registries are exactly the families' records.
    assert list(codebases.known().values()) == [f.training for f in adapters.FAMILIES if f.training is not None]
    assert patcher.known() == tuple(f.patcher for f in adapters.FAMILIES if f.patcher is not None)
    entries = training_modules()
    assert entries["llava.train.train_mem"] == ("llava", "flash_attention_2") and entries["train"] == ("eagle", "sdpa")


class _ToyTarget:
    """What enable() patches for the toy family: records each call."""

    name = "toy"
    refused = {"ToyMptForCausalLM": "the toy's MPT is not supported"}

    def __init__(self):
        self.patched = 0

    def is_installed(self):
        return True

    def patch(self, registry):
        self.patched += 1
        return []


def _toy_family():
    training = TrainingCodebase(
        name="toy", keyword="toy", model_module="toyvlm.model.toy_llama", causal_lm="ToyLlamaForCausalLM",
        config_class="ToyConfig", model_types=("toy_llama",), train_module="toyvlm.train.train",
        trainer_class="ToyTrainer", model_global="ToyLlamaForCausalLM", available=lambda: True,
        entry_modules={"toyvlm.train.train_mem": "flash_attention_2"}, title="Toy",
    )
    layout = Layout("v1", "toy at v1", "toy-v1.patch")
    patches = PatcherCodebase(name="toy", title="Toy", package="toyvlm",
                              files=(main_script("toyvlm/eval/run.py", "evaluation", ("main",)),), layouts=(layout,))
    return Family(name="toy", target=_ToyTarget(), training=training, patcher=patches)


def test_a_family_added_as_one_record_reaches_inference_training_and_the_patcher(tmp_path, monkeypatch):
    toy = _toy_family()
    monkeypatch.setattr(adapters, "FAMILIES", adapters.FAMILIES + (toy,))
    monkeypatch.setattr(adapters, "BY_NAME", {**adapters.BY_NAME, "toy": toy})
    # inference: enable() patches it, and its refused classes are named
    try:
        meteor_plugin.enable(targets=["toy"])
        assert toy.target.patched == 1
    finally:
        meteor_plugin.disable()
    assert toy.refused == {"ToyMptForCausalLM": "the toy's MPT is not supported"}
    # training: its checkpoints, its training entry, its name in convert's --codebase
    assert codebases.for_checkpoint({"model_type": "toy_llama"}) is toy.training
    assert codebases.get("toy") is toy.training
    assert training_modules()["toyvlm.train.train_mem"] == ("toy", "flash_attention_2")
    # the patcher: a tree with its landmark is recognised as it
    (tmp_path / "toyvlm" / "model").mkdir(parents=True)
    (tmp_path / "toyvlm" / "model" / "builder.py").write_text("")
    assert patcher.detect(str(tmp_path)) is toy.patcher
    with pytest.raises(patcher.NotACodebase, match="not a LLaVA or EAGLE or Toy tree"):
        patcher.detect(os.path.join(str(tmp_path), "toyvlm"))
