import json

import pytest

from meteor_plugin import MeteorConfig


def test_defaults_are_valid_and_round_trip_through_json():
    cfg = MeteorConfig(llm_layer=3, llm_max_keep=144, encoder_ranks={"clip": 10.0, "convnext": 20.5})
    again = MeteorConfig.from_json(cfg.to_json())
    assert again == cfg
    assert isinstance(again.llm_max_keep, int) and isinstance(again.llm_min_keep, float)


@pytest.mark.parametrize("field,value,message", [
    ("llm_layer", 0, r"llm_layer=0 is invalid: allowed an int in \[1, inf\)"),
    ("llm_layer", 2.0, "llm_layer=2.0"),
    ("llm_lambda", 0, r"llm_lambda=0 is invalid: allowed a number in \(0"),
    ("llm_max_keep", 1.5, r"llm_max_keep=1.5 is invalid: allowed a ratio in \(0, 1\]"),
    ("llm_min_keep", -3, "llm_min_keep=-3"),
    ("llm_top_heads", 0, "llm_top_heads=0"),
    ("text_query", "first", "text_query='first' is invalid: allowed one of 'all', 'last'"),
    ("llm", "yes", "llm='yes' is invalid: allowed True or False"),
    ("method", "magic", "method='magic'"),
    ("encoder_ranks", {"clip": -1.0}, "encoder_ranks\\['clip'\\]=-1.0"),
    ("fusion_keep", True, "fusion_keep=True"),
    ("fusion_similarity", "dot", "fusion_similarity='dot' is invalid: allowed one of 'cosine', 'centred_cosine'"),
])
def test_bad_values_raise_value_error_naming_field_and_range(field, value, message):
    with pytest.raises(ValueError, match=message):
        MeteorConfig(**{field: value})


def test_min_above_max_is_rejected():
    with pytest.raises(ValueError, match="llm_min_keep=100 is larger than llm_max_keep=50"):
        MeteorConfig(llm_min_keep=100, llm_max_keep=50)


def test_unknown_fields_are_named():
    with pytest.raises(ValueError, match="unknown MeteorConfig field\\(s\\) llm_budget"):
        MeteorConfig.from_dict({"llm_budget": 3})


def test_files_in_json_and_yaml(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"version": 2, "llm_layer": 3, "llm_max_keep": 0.25}))
    (tmp_path / "c.yaml").write_text("llm_layer: 3\nllm_max_keep: 0.25\ntext_query: last\n")
    assert MeteorConfig.from_file(tmp_path / "c.json") == MeteorConfig(llm_layer=3, llm_max_keep=0.25)
    assert MeteorConfig.from_file(tmp_path / "c.yaml").text_query == "last"
    with pytest.raises(ValueError, match="must end in .json, .yaml or .yml"):
        (tmp_path / "c.txt").write_text("{}")
        MeteorConfig.from_file(tmp_path / "c.txt")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        MeteorConfig.from_file(tmp_path / "nope.json")


def test_a_config_without_version_keeps_the_behaviour_it_was_written_for():
    # Version 1 files (every config saved before the version field) lack the fields added since: they get
    # version 1's values, so a checkpoint's stored config prunes as it did when it was saved.
    old = MeteorConfig.from_dict({"llm_layer": 3})
    assert old.version == 1
    assert (old.fusion_similarity, old.text_query, old.llm_budget_signal, old.llm_min_heads) == ("cosine", "all", "mass", 1)
    new = MeteorConfig.from_dict({"llm_layer": 3, "version": 2})
    assert new == MeteorConfig(llm_layer=3)
    assert (new.fusion_similarity, new.text_query, new.llm_budget_signal, new.llm_min_heads) == ("duplicate", "last", "spread", 4)
    # A field a version 1 file does set wins over the legacy value; saving keeps everything explicit.
    assert MeteorConfig.from_dict({"text_query": "last"}).text_query == "last"
    assert MeteorConfig.from_json(old.to_json()) == old
    assert old.default_of("fusion_similarity") == "cosine" and new.default_of("fusion_similarity") == "duplicate"
    with pytest.raises(ValueError, match=r"MeteorConfig.version=3 is invalid"):
        MeteorConfig.from_dict({"version": 3})
