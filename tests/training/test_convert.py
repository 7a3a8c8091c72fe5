"""meteor-plugin convert on LLaVA checkpoints: what it writes, what it refuses, and that LLaVA's loader
runs the result with the stored settings."""

import hashlib
import json
import os

import pytest
import torch

import meteor_plugin
from meteor_plugin import MeteorConfig
from meteor_plugin.cli import main
from meteor_plugin.testing.checkpoint import save_tiny_llava_checkpoint
from meteor_plugin.training import save
from meteor_plugin.training.convert import ConversionError, convert
from training_support import STORED, STORED_EAGLE


def _snapshot(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns, hashlib.sha256(fh.read()).hexdigest())
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny LLaVA checkpoint, with what a training run leaves beside a model."""
    parent = str(tmp_path_factory.mktemp("convert"))
    folder = save_tiny_llava_checkpoint(parent)
    os.makedirs(os.path.join(folder, "checkpoint-5"))
    with open(os.path.join(folder, "checkpoint-5", "optimizer.pt"), "wb") as fh:
        fh.write(b"x")
    with open(os.path.join(folder, "trainer_state.json"), "w") as fh:
        fh.write("{}")
    return folder


def test_convert_stores_the_config_copies_the_model_and_never_touches_the_source(source, tmp_path):
    before = _snapshot(source)
    config = tmp_path / "meteor.yaml"
    config.write_text("version: 5\nencoder_keep: 20\nllm_max_keep: 0.25\n")
    out = str(tmp_path / "tiny-llava-v1-meteor")
    assert main(["convert", "--model-path", source, "--out", out, "--config", str(config)]) == 0
    assert _snapshot(source) == before
    with open(os.path.join(out, "config.json")) as fh:
        stored = json.load(fh)["meteor"]
    assert stored == MeteorConfig.from_file(str(config)).to_dict()  # version 5's, upgraded as it prunes
    assert (stored["encoder_keep"], stored["llm_max_keep"], stored["llm_budget_signal"]) == (20, 0.25, "regions")
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    assert not {"checkpoint-5", "trainer_state.json"} & set(os.listdir(out))
    assert save.status(out) == "complete"
    assert not [n for n in os.listdir(tmp_path) if ".meteor-tmp" in n]


def test_converting_twice_is_refused(source, tmp_path, capsys):
    first = convert(source, str(tmp_path / "a-llava"))
    assert main(["convert", "--model-path", first, "--out", str(tmp_path / "b-llava")]) == 2
    assert "already a METEOR checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "b-llava")


@pytest.mark.parametrize("name, message", [
    ("tiny-meteor", "lacks 'llava'"),
    ("tiny-llava-lora", "contains 'lora'"),
])
def test_names_upstream_loaders_misread_are_refused(source, tmp_path, name, message):
    with pytest.raises(ConversionError, match=message):
        convert(source, str(tmp_path / name))


def test_other_bad_input_is_refused_with_the_reason(source, tmp_path):
    with pytest.raises(ConversionError, match="overlaps"):
        convert(source, os.path.join(source, "inside-llava"))
    busy = tmp_path / "busy-llava"
    busy.mkdir()
    (busy / "file").write_text("x")
    with pytest.raises(ConversionError, match="not empty"):
        convert(source, str(busy))
    with pytest.raises(ConversionError, match="no config.json"):
        convert(str(tmp_path / "busy-llava"), str(tmp_path / "x-llava"))
    adapter = tmp_path / "run-lora"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(ConversionError, match="LoRA adapter.*merge-lora"):
        convert(str(adapter), str(tmp_path / "y-llava"))
    (tmp_path / "no-images").mkdir()
    with pytest.raises(ValueError, match="no images"):
        convert(source, str(tmp_path / "z-llava"), calibration_images=str(tmp_path / "no-images"))
    assert not os.path.exists(tmp_path / "z-llava")


@pytest.mark.parametrize("text,message", [("{\"model_type\": ", "cannot be read as JSON"),
                                          ("[1, 2]", "holds a JSON list, not the object of a model config")])
def test_a_corrupt_config_json_is_refused_naming_the_file(tmp_path, text, message, capsys):
    folder = tmp_path / "bad-llava"
    folder.mkdir()
    (folder / "config.json").write_text(text)
    assert main(["convert", "--model-path", str(folder), "--out", str(tmp_path / "out-llava")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"meteor-plugin convert: error: {folder / 'config.json'} {message}") and "Traceback" not in err


def test_a_staging_copy_left_by_a_killed_convert_is_removed_by_the_next_run(source, tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    out = tmp_path / "next-llava"
    left = [tmp_path / f".next-llava.meteor-tmp-{dead.pid}", tmp_path / f".next-llava.meteor-tmp-{host}-{dead.pid}"]
    running = tmp_path / f".next-llava.meteor-tmp-{host}-{os.getppid()}"  # a run still going keeps its copy
    for folder in left + [running]:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    convert(source, str(out))
    assert sorted(n for n in os.listdir(tmp_path) if ".meteor-tmp" in n) == [running.name]


EAGLE_TOWERS = "clip-448;convnext-1024;pix2struct-1024"


@pytest.fixture(scope="module")
def eagle_source(tmp_path_factory):
    """A tiny EAGLE-like checkpoint (three encoders, the test stand-in) with a tokenizer that knows the
    words of LLaVA's v1 template."""
    from meteor_plugin.testing.checkpoint import save_tiny_tokenizer
    from meteor_plugin.testing.eagle_like import TinyEagleSpec, install, save_tiny_eagle

    install()
    folder = str(tmp_path_factory.mktemp("convert-eagle") / "tiny-eagle-x3")
    save_tiny_eagle(folder, TinyEagleSpec(vision_tower=EAGLE_TOWERS), tokenizer=False)
    save_tiny_tokenizer(folder)
    return folder


def _restored(source, folder, storage):
    """``source`` rewritten as ``storage``: one safetensors file, safetensors shards, or one .bin file."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    state = load_file(os.path.join(folder, "model.safetensors"))
    if storage == "sharded":
        os.remove(os.path.join(folder, "model.safetensors"))
        keys = sorted(state)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in shards.items():
            save_file({k: state[k] for k in part}, os.path.join(folder, name), metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {k: name for name, part in shards.items() for k in part}}
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh)
    elif storage == "bin":
        os.remove(os.path.join(folder, "model.safetensors"))
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    return folder


@pytest.mark.parametrize("storage", ["single", "sharded", "bin"])
def test_an_eagle_checkpoint_gets_per_encoder_projectors_split_from_its_shared_one(eagle_source, tmp_path, storage):
    from eagle.model.language_model.eagle_llama import EagleLlamaForCausalLM

    from meteor_plugin.adapters.eagle import convert_to_post_projection
    from meteor_plugin import checkpoint_files

    source = _restored(eagle_source, str(tmp_path / "tiny-eagle-x3"), storage)
    before = _snapshot(source)
    out = convert(source, str(tmp_path / "tiny-eagle-x3-meteor"), MeteorConfig(fusion_keep=64))
    assert _snapshot(source) == before

    # Only projector tensors were added; every tensor of the source is there, unchanged.
    original, converted = checkpoint_files.weight_files(source), checkpoint_files.weight_files(out)
    added = sorted(set(converted.weight_map) - set(original.weight_map))
    assert set(original.weight_map) <= set(converted.weight_map) and len(added) == 3 * 4
    assert all(k.startswith("model.mm_projectors.") for k in added)
    old = checkpoint_files.read_tensors(original, list(original.weight_map))
    new = checkpoint_files.read_tensors(converted, list(converted.weight_map))
    assert all(torch.equal(old[k], new[k]) for k in old)

    # They are what the in-memory conversion of the loaded model makes, and load as the model's projectors.
    reference = EagleLlamaForCausalLM.from_pretrained(source)
    convert_to_post_projection(reference)
    with open(os.path.join(out, "config.json")) as fh:
        stored = json.load(fh)
    assert stored["meteor_fusion"] == reference.config.meteor_fusion
    assert stored["meteor"]["fusion_keep"] == 64
    meteor_plugin.enable()
    model = EagleLlamaForCausalLM.from_pretrained(out)
    for (name, ours), (_, theirs) in zip(model.get_model().mm_projectors.named_parameters(),
                                         reference.get_model().mm_projectors.named_parameters()):
        assert torch.equal(ours, theirs) and torch.equal(new["model.mm_projectors." + name], theirs), name


def test_a_converted_tiny_eagle_generates_through_eagles_loader_with_all_stages_and_is_not_converted_twice(
        eagle_source, tmp_path, capsys):
    from PIL import Image

    from eagle.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from eagle.conversation import conv_templates
    from eagle.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from eagle.model.builder import load_pretrained_model

    config = tmp_path / "meteor.json"
    MeteorConfig(encoder_keep=96, fusion_keep=32, llm_max_keep=8, llm_min_keep=2,
                 encoder_ranks={"clip-448": 1.0, "convnext-1024": 2.0, "pix2struct-1024": 1.0}).save(str(config))
    out = str(tmp_path / "tiny-eagle-x3-meteor")
    assert main(["convert", "--model-path", eagle_source, "--out", out, "--config", str(config)]) == 0
    meteor_plugin.enable()  # no config given: the checkpoint's own
    tokenizer, model, processor, _ = load_pretrained_model(out, None, get_model_name_from_path(out),
                                                           device="cpu", device_map="cpu")
    assert model.get_model().mm_projectors is not None and processor is not None
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\nwhat is the colour of the square in this image ?")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    pixels = process_images([Image.new("RGB", (40, 32), (200, 30, 30))], processor, model.config).to(torch.float16)
    with torch.no_grad():
        generated = model.generate(ids, images=pixels, max_new_tokens=3, do_sample=False)
    assert generated.shape[-1] >= 1
    first = meteor_plugin.stats(model).stages[0]
    assert (first["encoder"].entered, first["encoder"].left) == (576 + 1024 + 1024, 96)  # CLIP's 24x24, two 32x32
    assert first["encoder"].detail["per_encoder"] == {"clip-448": [576, 24], "convnext-1024": [1024, 48],
                                                      "pix2struct-1024": [1024, 24]}
    assert (first["fusion"].entered, first["fusion"].left) == (96, 32)
    assert first["llm"].entered == 32 and 2 <= first["llm"].left <= 8

    capsys.readouterr()
    assert main(["convert", "--model-path", out, "--out", str(tmp_path / "again-eagle")]) == 2
    assert "already a METEOR checkpoint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "again-eagle")


def test_eagles_own_encoders_are_split_by_their_known_widths_without_building_them(monkeypatch):
    import sys

    from meteor_plugin.adapters.eagle.conversion import encoders_and_channels

    monkeypatch.setitem(sys.modules, "eagle.model.multimodal_encoder.builder", None)  # building would fail
    x5 = "clip-448;convnext-1024;sam-1024;det-1024;pix2struct-1024"
    assert encoders_and_channels({"mm_vision_tower": x5, "mm_hidden_size": 7680}) == (
        x5.split(";"), [1024, 3072, 1024, 1024, 1536])
    x4 = "clip-448;convnext-1024;det-1024;pix2struct-1024"
    assert encoders_and_channels({"mm_vision_tower": x4, "mm_hidden_size": 6656})[1] == [1024, 3072, 1024, 1536]
    with pytest.raises(ValueError, match="needs the towers built"):
        encoders_and_channels({"mm_vision_tower": x4, "mm_hidden_size": 6000}, "eagle-custom")
    with pytest.raises(ValueError, match="names none of EAGLE's encoders"):
        encoders_and_channels({"mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 1024})


def test_eagle_conversions_it_cannot_do_are_refused_and_leave_nothing(eagle_source, tmp_path):
    import shutil

    no_weights = tmp_path / "projector-only-eagle"  # what a pretraining run with --tune_mm_mlp_adapter leaves
    no_weights.mkdir()
    shutil.copy2(os.path.join(eagle_source, "config.json"), no_weights / "config.json")
    with pytest.raises(ValueError, match="no model weights"):
        convert(str(no_weights), str(tmp_path / "a-eagle"))
    recorded = tmp_path / "recorded-eagle"  # per-encoder projectors recorded, METEOR config removed by hand
    shutil.copytree(eagle_source, recorded)
    with open(recorded / "config.json") as fh:
        config = json.load(fh)
    config["meteor_fusion"] = {"mode": "post_projection"}
    with open(recorded / "config.json", "w") as fh:
        json.dump(config, fh)
    with pytest.raises(ValueError, match="already records per-encoder projectors"):
        convert(str(recorded), str(tmp_path / "b-eagle"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith((".a-eagle", ".b-eagle", "a-eagle", "b-eagle"))]


def test_the_default_calibrator_stores_the_measured_encoder_rank(source, tmp_path):
    from PIL import Image

    images = tmp_path / "calibration-images"
    images.mkdir()
    for i, colour in enumerate([(200, 30, 60), (20, 160, 40), (30, 40, 200)]):
        Image.new("RGB", (40, 30), colour).save(images / f"{i}.png")
    out = convert(source, str(tmp_path / "calibrated-llava"), calibration_images=str(images))
    with open(os.path.join(out, "config.json")) as fh:
        stored = json.load(fh)["meteor"]
    assert set(stored["encoder_ranks"]) == {"clip"} and stored["encoder_ranks"]["clip"] >= 1


def test_calibration_hook_gets_the_copy_and_its_config_is_stored(source, tmp_path):
    seen = {}

    def calibrate(path, images, config):
        seen.update(path=path, weights=os.path.isfile(os.path.join(path, "model.safetensors")), images=images)
        return config.replace(encoder_ranks={"clip": 31.5}, llm_lambda=12.0)

    out = convert(source, str(tmp_path / "cal-llava"), calibration_images=str(tmp_path), calibrator=calibrate)
    assert seen["weights"] and seen["path"] != source and seen["images"] == str(tmp_path)
    with open(os.path.join(out, "config.json")) as fh:
        stored = json.load(fh)["meteor"]
    assert stored["encoder_ranks"] == {"clip": 31.5} and stored["llm_lambda"] == 12.0


def test_the_converted_checkpoint_runs_in_llavas_loader_with_the_stored_settings(source, tmp_path):
    from PIL import Image

    from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from llava.conversation import conv_templates
    from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from llava.model.builder import load_pretrained_model

    config = MeteorConfig(encoder_keep=20, llm_max_keep=0.25)
    out = convert(source, str(tmp_path / "tiny-llava-v1-meteor"), config)
    meteor_plugin.enable()  # no config given: the checkpoint's own
    tokenizer, model, processor, _ = load_pretrained_model(out, None, get_model_name_from_path(out),
                                                           device="cpu", device_map="cpu")
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\nwhat is the colour of the square in this image ?")
    conv.append_message(conv.roles[1], None)
    ids = tokenizer_image_token(conv.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    image = Image.new("RGB", (40, 32), (200, 30, 30))
    pixels = process_images([image], processor, model.config).to(model.dtype)
    with torch.no_grad():
        generated = model.generate(ids, images=pixels, max_new_tokens=4, do_sample=False)
    assert generated.shape[-1] >= 1
    run = meteor_plugin.stats(model)
    assert run.stages[0]["encoder"].entered == 64 and run.stages[0]["encoder"].left == 20
    assert run.stages[0]["llm"].entered == 20 and run.stages[0]["llm"].left <= 5


def _fake_eagle_conversion(job):
    """Stands in for the Stage 2 conversion (per-encoder projectors) that the EAGLE code will register."""
    with open(os.path.join(job.folder, "per_encoder_projectors.safetensors"), "wb") as fh:
        fh.write(b"weights")
    job.model_config["mm_projector_layout"] = "per_encoder"


def test_a_codebase_conversion_hook_given_as_module_function_runs_on_the_copy(tmp_path, monkeypatch):
    from meteor_plugin.adapters.eagle import TRAINING

    eagle = tmp_path / "eagle-x4"
    eagle.mkdir()
    (eagle / "config.json").write_text(json.dumps({"model_type": "eagle_llama"}))
    monkeypatch.setattr(TRAINING, "convert_weights", f"{__name__}:_fake_eagle_conversion")
    with pytest.raises(ConversionError, match="lacks 'eagle'"):
        convert(str(eagle), str(tmp_path / "x4-meteor"))
    out = convert(str(eagle), str(tmp_path / "eagle-x4-meteor"), MeteorConfig(fusion_keep=0.25))
    with open(os.path.join(out, "config.json")) as fh:
        stored = json.load(fh)
    assert stored["mm_projector_layout"] == "per_encoder" and stored["meteor"]["fusion_keep"] == 0.25
    assert os.path.isfile(os.path.join(out, "per_encoder_projectors.safetensors"))
    assert sorted(os.listdir(eagle)) == ["config.json"]


def test_the_demo_prunes_a_converted_checkpoint_with_its_stored_config(workspace, eagle_workspace, tmp_path):
    """LLaVA and EAGLE checkpoints, each through its own loader, about the user's image (--image-file)."""
    from PIL import Image

    from meteor_plugin import demo

    picture = tmp_path / "mine.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(picture)
    for ckpt, stored in ((workspace.model, STORED), (eagle_workspace.model, STORED_EAGLE)):
        result = demo.run(ckpt, "What is in the image?", max_new_tokens=2, repeats=1, image_file=str(picture))
        assert {k: result["config"][k] for k in stored} == stored
        assert result["stages"]["encoder"]["out"] == stored["encoder_keep"]
        drawn = demo.run(ckpt, "What is in the image?", max_new_tokens=2, repeats=1)
        assert drawn["stages"]["encoder"]["out"] == stored["encoder_keep"]
    with pytest.raises(FileNotFoundError, match="--image-file .*: no such file"):
        demo.run(workspace.model, image_file=str(tmp_path / "none.png"))
    assert main(["demo", "--image-file", str(picture)]) == 2  # the fidelity model knows only its scenes
