"""``--meteor-set FIELD=VALUE`` for every MeteorConfig field, wherever it is taken: the patched entry points
(``entry.enable_from_argv``), ``python -m meteor_plugin.run``, ``python -m meteor_plugin.train`` and ``meteor-plugin
bench fidelity``. A value is read as its field's kind; a mistake is one line naming the option and the field."""

import dataclasses
import json

import pytest

import meteor_plugin
from meteor_plugin import cli, entry
from meteor_plugin.config import ConfigError, MeteorConfig


@pytest.mark.parametrize("text, field, value", [
    # bool
    ("encoder=false", "encoder", False), ("fusion=True", "fusion", True), ("llm=no", "llm", False),
    ("llm=1", "llm", True),
    # int
    ("llm_layer=3", "llm_layer", 3), ("seed=7", "seed", 7), ("llm_min_heads=2.0", "llm_min_heads", 2),
    # float
    ("llm_lambda=2", "llm_lambda", 2.0), ("spread_floor=0.125", "spread_floor", 0.125),
    # budget: a ratio, a count, all
    ("fusion_keep=0.25", "fusion_keep", 0.25), ("encoder_keep=64", "encoder_keep", 64),
    ("llm_max_keep=all", "llm_max_keep", 1.0), ("llm_top_heads=1.0", "llm_top_heads", 1.0),
    # choice
    ("fusion_similarity=cosine", "fusion_similarity", "cosine"), ("method=visionzip", "method", "visionzip"),
    ("proportional_attention=off", "proportional_attention", "off"), ('text_query="all"', "text_query", "all"),
    # dict
    ('encoder_ranks={"clip-448": 3, "convnext-1024": 1}', "encoder_ranks", {"clip-448": 3.0, "convnext-1024": 1.0}),
    ("encoder_ranks={clip-448: 2.5}", "encoder_ranks", {"clip-448": 2.5}), ("encoder_ranks=none", "encoder_ranks", None),
    # optional int
    ("drop_encoder=1", "drop_encoder", 1), ("drop_encoder=null", "drop_encoder", None),
])
def test_a_value_is_read_as_its_fields_kind_and_lands_in_the_config(text, field, value):
    key, parsed = entry.parse_field("--meteor-set", text)
    assert key == field
    assert getattr(MeteorConfig().replace(**{key: parsed}), field) == value


@pytest.mark.parametrize("text, words", [
    ("encoder=maybe", ["encoder takes true or false", "'maybe'"]),
    ("llm_layer=two", ["llm_layer takes an integer"]),
    ("llm_layer=0", ["MeteorConfig.llm_layer=0 is invalid"]),
    ("llm_lambda=big", ["llm_lambda takes a number"]),
    ("fusion_keep=1", ["fusion_keep=1 is invalid", "the integer 1 is refused"]),
    ("fusion_keep=lots", ["fusion_keep takes a ratio"]),
    ("fusion_similarity=cosin", ["fusion_similarity='cosin' is invalid", "'cosine'"]),
    ("encoder_ranks=[1, 2]", ["encoder_ranks=[1, 2] is invalid"]),
    ("drop_encoder=first", ["drop_encoder takes an integer or none"]),
    ("llm_layr=2", ["no field 'llm_layr'", "llm_layer"]),
    ("llm_layer", ["takes FIELD=VALUE"]),
])
def test_a_mistake_names_the_option_and_the_field(text, words):
    with pytest.raises(ConfigError) as info:
        entry.parse_field("--meteor-set", text)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert message.startswith("--meteor-set")


def _as_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


SAMPLES = {"encoder_ranks": {"clip-448": 2.0}, "drop_encoder": 1, "method": "avgpool", "version": 4,
           "llm_lambda": 3.5, "encoder_keep": 48, "fusion_keep": 0.125}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(MeteorConfig)])
def test_every_field_of_the_config_can_be_set(field):
    """Every field (one added later too) is read back as the value it was written from."""
    value = SAMPLES.get(field, getattr(MeteorConfig(), field))
    key, parsed = entry.parse_field("--meteor-set", f"{field}={_as_text(value)}")
    assert key == field and getattr(MeteorConfig().replace(**{key: parsed}), field) == value


def test_patched_entry_points_enable_with_every_kind(monkeypatch):
    argv = ["script.py", "--meteor-set", "encoder=false", "--meteor_set=llm_layer=3", "--meteor-set", "llm_lambda=4",
            "--meteor-set", "fusion_keep=all", "--meteor-set", "text_query=all", "--meteor-set",
            "encoder_ranks={clip-448: 2}", "--meteor-set", "drop_encoder=0", "--meteor-set", "method=drop_encoder",
            "--rest"]
    cfg = entry.enable_from_argv(argv)
    assert argv == ["script.py", "--rest"]
    assert (cfg.encoder, cfg.llm_layer, cfg.llm_lambda, cfg.fusion_keep, cfg.text_query, cfg.encoder_ranks,
            cfg.drop_encoder, cfg.method) == (False, 3, 4.0, 1.0, "all", {"clip-448": 2.0}, 0, "drop_encoder")
    assert meteor_plugin.is_enabled()


@pytest.mark.parametrize("args, words", [
    (["--meteor-set", "llm_layer=zero"], ["--meteor-set llm_layer=zero", "integer"]),
    (["--meteor-set", "llm_min_keep=0.9"], ["llm_min_keep=0.9 is larger than", "llm_max_keep"]),  # with its partner
    (["--meteor-set", "method=drop_encoder"], ["drop_encoder=None is invalid"]),
])
def test_patched_entry_points_end_with_one_line(args, words):
    with pytest.raises(SystemExit) as info:
        entry.enable_from_argv(["script.py", *args])
    message = str(info.value.code)
    assert "\n" not in message and all(w in message for w in words), message
    assert not meteor_plugin.is_enabled()


def test_the_training_entry_checks_the_config_before_it_imports_training_code(monkeypatch, tmp_path):
    from meteor_plugin import adapters, train

    monkeypatch.setattr(adapters, "spec_for_training", lambda choice: pytest.fail("got past the config check"))
    with pytest.raises(SystemExit, match=r"--meteor-set llm_layr=2: MeteorConfig has no field"):
        train.main(["--meteor-set", "llm_layr=2", "--output_dir", str(tmp_path)])
    bad = tmp_path / "bad.json"
    bad.write_text('{"llm_layer": 0}')
    with pytest.raises(SystemExit, match=rf"meteor_plugin.train: error: METEOR config file {bad}: .*llm_layer=0"):
        train.main(["--meteor-config", str(bad)])


def test_bench_fidelity_reads_meteor_set_as_the_entry_points_do(capsys):
    assert cli.main(["bench", "fidelity", "--meteor-set", "llm_layer=two", "--per-kind", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--meteor-set llm_layer=two: llm_layer takes an integer" in err
