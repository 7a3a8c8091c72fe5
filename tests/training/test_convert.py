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
from meteor_plugin.training import calibration, save
from meteor_plugin.training.convert import ConversionError, convert


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
    config.write_text("encoder_keep: 20\nllm_max_keep: 0.25\n")
    out = str(tmp_path / "tiny-llava-v1-meteor")
    assert main(["convert", "--model-path", source, "--out", out, "--config", str(config)]) == 0
    assert _snapshot(source) == before
    with open(os.path.join(out, "config.json")) as fh:
        stored = json.load(fh)["meteor"]
    assert stored == MeteorConfig(encoder_keep=20, llm_max_keep=0.25).to_dict()
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


def test_an_eagle_checkpoint_is_refused_until_stage_2_provides_its_conversion(tmp_path):
    eagle = tmp_path / "eagle-x4"
    eagle.mkdir()
    (eagle / "config.json").write_text(json.dumps({"model_type": "eagle_llama", "architectures": ["EagleLlamaForCausalLM"]}))
    with pytest.raises(ConversionError, match="per-encoder projectors"):
        convert(str(eagle), str(tmp_path / "eagle-x4-meteor"))


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

    calibration.set_calibrator(calibrate)
    try:
        out = convert(source, str(tmp_path / "cal-llava"), calibration_images=str(tmp_path))
    finally:
        calibration.set_calibrator(None)
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
    from meteor_plugin.training import codebases

    eagle = tmp_path / "eagle-x4"
    eagle.mkdir()
    (eagle / "config.json").write_text(json.dumps({"model_type": "eagle_llama"}))
    monkeypatch.setattr(codebases.EAGLE, "convert_weights", f"{__name__}:_fake_eagle_conversion")
    with pytest.raises(ConversionError, match="lacks 'eagle'"):
        convert(str(eagle), str(tmp_path / "x4-meteor"))
    out = convert(str(eagle), str(tmp_path / "eagle-x4-meteor"), MeteorConfig(fusion_keep=0.25))
    with open(os.path.join(out, "config.json")) as fh:
        stored = json.load(fh)
    assert stored["mm_projector_layout"] == "per_encoder" and stored["meteor"]["fusion_keep"] == 0.25
    assert os.path.isfile(os.path.join(out, "per_encoder_projectors.safetensors"))
    assert sorted(os.listdir(eagle)) == ["config.json"]
