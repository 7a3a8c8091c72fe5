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
    ("proportional_attention", True, "proportional_attention=True is invalid: allowed one of 'auto', 'on', 'off'"),
    ("llm_selection", "best", "llm_selection='best' is invalid: allowed one of 'top', 'coverage'"),
    ("llm_signal_layers", "all", "llm_signal_layers='all' is invalid: allowed one of 'own', 'up_to'"),
    ("llm_score_layers", "last", "llm_score_layers='last' is invalid: allowed one of 'own', 'up_to'"),
    ("llm_coverage_share", 0.0, r"llm_coverage_share=0.0 is invalid: allowed a number in \(0.0, 1.0\]"),
    ("llm_budget_signal", "tokens", "llm_budget_signal='tokens' is invalid: allowed one of 'mass', 'spread', "
                                    "'regions', 'coverage'"),
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
    (tmp_path / "c.json").write_text(json.dumps({"version": 6, "llm_layer": 3, "llm_max_keep": 0.25}))
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
    assert old.llm_lambda == 64.0 and MeteorConfig().llm_lambda == 11.8
    assert old.spread_floor == 0.0
    assert (old.llm_selection, old.llm_signal_layers) == ("top", "own")
    v5_stage3 = {"llm_selection": "top", "llm_signal_layers": "own", "llm_score_layers": "own"}  # before version 6
    v2 = MeteorConfig.from_dict({"llm_layer": 3, "version": 2})
    assert v2 == MeteorConfig(llm_layer=3, spread_floor=0.0, llm_budget_signal="spread", llm_lambda=0.6,
                              proportional_attention="off", version=2, **v5_stage3)
    assert (v2.fusion_similarity, v2.text_query, v2.llm_budget_signal, v2.llm_min_heads) == ("duplicate", "last", "spread", 4)
    v3 = MeteorConfig.from_dict({"llm_layer": 3, "version": 3})
    assert v3 == MeteorConfig(llm_layer=3, llm_budget_signal="spread", llm_lambda=0.6, proportional_attention="off",
                              version=3, **v5_stage3)
    assert v3.spread_floor == 0.375 and v2.default_of("spread_floor") == 0.0
    v4 = MeteorConfig.from_dict({"llm_layer": 3, "version": 4})
    assert v4 == MeteorConfig(llm_layer=3, proportional_attention="off", version=4, llm_budget_signal="regions",
                              llm_lambda=11.0, **v5_stage3)
    v5 = MeteorConfig.from_dict({"llm_layer": 3, "version": 5})
    assert v5 == MeteorConfig(llm_layer=3, llm_budget_signal="regions", llm_lambda=11.0, version=5, **v5_stage3)
    assert v5.proportional_attention == "auto" and v4.default_of("proportional_attention") == "off"
    assert v3.default_of("llm_budget_signal") == "spread" and v5.default_of("llm_budget_signal") == "regions"
    new = MeteorConfig.from_dict({"llm_layer": 3, "version": 6})
    assert new == MeteorConfig(llm_layer=3) and (new.llm_budget_signal, new.llm_lambda) == ("coverage", 11.8)
    assert (new.llm_selection, new.llm_signal_layers, new.llm_score_layers, new.llm_coverage_share) == (
        "coverage", "up_to", "up_to", 0.75)
    assert v5.default_of("llm_selection") == "top" and new.default_of("llm_selection") == "coverage"
    # A field a version 1 file does set wins over the legacy value; saving keeps everything explicit.
    assert MeteorConfig.from_dict({"text_query": "last"}).text_query == "last"
    assert MeteorConfig.from_json(old.to_json()) == old
    assert old.default_of("fusion_similarity") == "cosine" and new.default_of("fusion_similarity") == "duplicate"
    with pytest.raises(ValueError, match=r"MeteorConfig.version=7 is invalid"):
        MeteorConfig.from_dict({"version": 7})


def _like_jq(text):
    """Re-print JSON the way jq does: a float with no fraction loses its decimal (1.0 -> 1)."""
    data = json.loads(text, parse_float=lambda s: int(float(s)) if float(s).is_integer() else float(s))
    return json.dumps(data)


@pytest.mark.parametrize("field", ["encoder_keep", "fusion_keep", "llm_top_heads", "llm_max_keep"])
def test_a_budget_keeps_its_meaning_through_a_json_tool_that_drops_the_decimal(field):
    cfg = MeteorConfig(**{field: 1.0, "llm_min_keep": 0.05})
    again = MeteorConfig.from_json(_like_jq(cfg.to_json()))
    assert again == cfg and getattr(again, field) == 1.0 and isinstance(getattr(again, field), float)
    assert MeteorConfig.from_json(_like_jq(json.dumps({field: 2.0, "version": 6}))) == MeteorConfig(**{field: 2})
    assert MeteorConfig(**{field: "all"}) == cfg


def test_the_ambiguous_integer_1_is_refused_by_name(tmp_path):
    message = r'llm_min_keep=1 is invalid: allowed 1.0 or "all" for all the tokens, or a count >= 2'
    with pytest.raises(ValueError, match=message):
        MeteorConfig(llm_min_keep=1)
    # A hand-written 1.0 that went through jq, or a config saved by 0.1 where 1 meant one token: loud.
    path = tmp_path / "old.json"
    path.write_text(_like_jq(json.dumps({"llm_min_keep": 1.0})))
    with pytest.raises(ValueError, match=f"METEOR config file {path}: MeteorConfig.{message}"):
        MeteorConfig.from_file(path)


def test_crossed_limits_name_both_fields():
    with pytest.raises(ValueError, match="llm_min_keep=0.5 is larger than llm_max_keep=0.25"):
        MeteorConfig(llm_min_keep=0.5, llm_max_keep=0.25)
    with pytest.raises(ValueError, match="llm_min_keep=3 is larger than llm_max_keep=2"):
        MeteorConfig(llm_min_keep=3.0, llm_max_keep=2)  # 3.0 is the count 3
    with pytest.raises(ValueError, match="llm_max_keep=1 is invalid"):
        MeteorConfig(llm_min_keep=0.5, llm_max_keep=1)  # the case: a ratio 1.0 printed as 1


def test_a_config_is_frozen_and_changes_are_validated():
    import dataclasses

    cfg = MeteorConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.llm_max_keep = 5.0
    assert cfg.llm_max_keep == 0.5
    with pytest.raises(ValueError, match="llm_max_keep=1.5 is invalid"):
        cfg.replace(llm_max_keep=1.5)
    with pytest.raises(ValueError, match="llm_max_keep=1.5 is invalid"):
        dataclasses.replace(cfg, llm_max_keep=1.5)
    assert cfg.replace(llm_max_keep=0.25).llm_max_keep == 0.25 and cfg.llm_max_keep == 0.5


@pytest.mark.parametrize("name,text,message", [
    ("empty.json", "", "is empty"),
    ("blank.yaml", "\n  \n", "is empty"),
    ("null.json", "null", "holds null, not a mapping"),
    ("null.yaml", "~\n", "holds null, not a mapping"),
    ("list.json", "[1, 2]", "holds list, not a mapping"),
    ("bad.json", '{"llm_layer": 3,}', "is not valid JSON: .*line 1 column"),
    ("bad.yaml", "llm_layer: [3\n", "is not valid YAML"),
    ("value.yaml", "llm_layer: 0\n", r"MeteorConfig.llm_layer=0 is invalid"),
    ("field.json", '{"llm_budget": 3}', r"unknown MeteorConfig field\(s\) llm_budget"),
])
def test_every_config_file_error_names_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=f"METEOR config file {path}:? {message}"):
        MeteorConfig.from_file(path)
