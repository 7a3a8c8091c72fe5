"""One folder and one record per model family: inference, training and the patcher all read the registry
(``adapters.FAMILIES`` and its lookups), every family folder provides what the protocol requires, and no module
outside ``adapters/`` restates an upstream codebase's module paths."""

import ast
import importlib
import os
import pathlib

import pytest

import meteor_plugin
from meteor_plugin import adapters, patcher
from meteor_plugin.adapters.family import Family, Layout, PatcherSpec, TrainingSpec, missing_parts
from meteor_plugin.adapters.shared.script_edits import main_script
from meteor_plugin.run import training_modules

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


def _family_folders():
    return sorted(p.name for p in (PACKAGE / "adapters").iterdir()
                  if p.is_dir() and (p / "__init__.py").is_file() and p.name != "shared")


def test_every_family_is_one_folder_with_one_record():
    records = {}
    for name in _family_folders():
        module = importlib.import_module(f"meteor_plugin.adapters.{name}")
        assert isinstance(getattr(module, "FAMILY", None), Family), f"adapters/{name}/ defines no FAMILY"
        records[name] = module.FAMILY
    # every folder with a record is listed, once, and nothing else is
    assert sorted(map(id, records.values())) == sorted(map(id, adapters.FAMILIES))
    assert sorted(records) == ["eagle", "hf_llava", "llava", "qwen_vl"]
    names = [family.name for family in adapters.FAMILIES]
    assert len(set(names)) == len(names) and set(adapters.BY_NAME) == set(names)
    # No module of adapters/ but the protocol, the registry, refusal.py and support.py sits outside a folder.
    loose = sorted(p.name for p in (PACKAGE / "adapters").glob("*.py"))
    assert loose == ["__init__.py", "family.py", "refusal.py", "support.py"]
    # The training and patcher lookups read exactly the families' records.
    assert list(adapters.training_specs().values()) == [f.training for f in adapters.FAMILIES if f.training is not None]
    assert patcher.known() == tuple(f.patcher for f in adapters.FAMILIES if f.patcher is not None)
    entries = training_modules()
    assert entries["llava.train.train_mem"] == ("llava", "flash_attention_2") and entries["train"] == ("eagle", "sdpa")


@pytest.mark.parametrize("family", adapters.FAMILIES, ids=lambda f: f.name)
def test_every_family_record_provides_what_the_protocol_requires(family):
    assert missing_parts(family) == []


def test_a_family_folder_lacking_a_part_of_the_protocol_is_named():
    class Partial:
        name = "partial"
        refused = {}

        def is_installed(self):
            return True

    problems = missing_parts(Family(name="partial", target=Partial()))
    assert problems == ["target.patch()", "target.encoders()", "target.open()", "target.prompt()", "target.support()"]
    assert missing_parts(Family(name="other", target=_ToyTarget())) == [
        "target.name equal to the family's name 'other'"]
    assert missing_parts(object()) == ["FAMILY is a object, not an adapters.family.Family"]


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

    def encoders(self, model):
        return None

    def open(self, path, config):
        return None

    def prompt(self, model, processor, image, question, conv_mode=None):
        return {}

    def support(self, model):
        from meteor_plugin.adapters.support import Support

        return Support(type(model).__name__, frozenset({"llm"}))


def _toy_family():
    training = TrainingSpec(
        name="toy", keyword="toy", model_module="toyvlm.model.toy_llama", causal_lm="ToyLlamaForCausalLM",
        config_class="ToyConfig", model_types=("toy_llama",), train_module="toyvlm.train.train",
        trainer_class="ToyTrainer", model_global="ToyLlamaForCausalLM", available=lambda: True,
        entry_modules={"toyvlm.train.train_mem": "flash_attention_2"}, title="Toy",
    )
    layout = Layout("v1", "toy at v1", "toy-v1.patch")
    patches = PatcherSpec(name="toy", title="Toy", package="toyvlm",
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
    assert adapters.spec_for_checkpoint({"model_type": "toy_llama"}) is toy.training
    assert adapters.training_spec("toy") is toy.training
    assert training_modules()["toyvlm.train.train_mem"] == ("toy", "flash_attention_2")
    # the patcher: a tree with its landmark is recognised as it
    (tmp_path / "toyvlm" / "model").mkdir(parents=True)
    (tmp_path / "toyvlm" / "model" / "builder.py").write_text("")
    assert patcher.detect(str(tmp_path)) is toy.patcher
    with pytest.raises(patcher.NotACodebase, match="not a LLaVA or EAGLE or Toy tree"):
        patcher.detect(os.path.join(str(tmp_path), "toyvlm"))
