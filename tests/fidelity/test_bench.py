"""``meteor-plugin bench fidelity`` on the shipped checkpoint, small: the table, the JSON, the PNG, the
tokens each method kept, and the demo that asks the checkpoint a question."""

import json

import pytest
import torch
from PIL import Image

from meteor_plugin import cli, demo
from meteor_plugin.bench import fidelity
from meteor_plugin.fidelity import methods, plot, token_map
from meteor_plugin.fidelity.questions import KINDS


def test_small_bench_reports_every_method_with_its_budget_and_cost(tmp_path, capsys):
    png = tmp_path / "fidelity.png"
    code = cli.main(["bench", "fidelity", "--per-kind", "6", "--val-per-kind", "6", "--budgets", "0.25,0.125",
                     "--methods", "random,avgpool,drop-convnext,fastv,meteor-s3,meteor-s3-fixed,meteor", "--plot", str(png),
                     "--json", "--no-progress", "--flops-questions", "4"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    fastv = [f"fastv:{layer}" for layer in range(1, 8)]  # at every layer: its frontier is read
    assert set(rows) == {("unpruned", 208)} | {(m, k) for k in (52, 26) for m in (
        "random", "avgpool", "drop-convnext", "meteor-s3", "meteor-s3-fixed", "meteor", *fastv)} | {("meteor", 50)}
    assert rows[("unpruned", 208)]["kept"] == 208
    for run in result["runs"]:
        if run["kept_exact"] is not None:
            assert run["kept_exact"] and run["kept"] == run["budget"]
    assert rows[("random", 52)]["seeds"] == [0, 1, 2] and "low" in rows[("random", 52)]
    assert rows[("meteor", 52)]["llm_input"] == 104  # Stages 1-2 pass 2k, Stage 3 keeps k on average
    layers = result["calibration"]["meteor_layer"]
    # What each decoder layer ran on: pre-LLM methods k everywhere, Stage 3 the full input before its layer.
    assert rows[("avgpool", 26)]["visual_per_layer"] == [26] * 8
    assert rows[("meteor", 52)]["visual_per_layer"][:layers] == [104] * layers
    for layer in range(1, 8):
        assert rows[(f"fastv:{layer}", 26)]["visual_per_layer"] == [208] * layer + [26] * (8 - layer)
    # FLOPs counted: fewer tokens cost less, and a method that prunes later costs more at the same final count.
    assert rows[("unpruned", 208)]["gflops"] > rows[("avgpool", 52)]["gflops"] > rows[("avgpool", 26)]["gflops"] > 0
    assert rows[("fastv:3", 52)]["gflops"] > rows[("fastv:2", 52)]["gflops"] > rows[("avgpool", 52)]["gflops"]
    for row in result["rows"]:
        assert set(row["accuracy"]) == {"background", "colour", "digit", "count", "overall", "needs_tokens"}
        assert 0.0 <= row["accuracy"]["overall"] <= 1.0
    # Equal-FLOPs readings: avgpool's curve interpolated at METEOR's cost where that lies inside it.
    for c in result["equal_flops"]:
        m = rows[("meteor", c["budget"])]
        assert c["gflops"] == m["gflops"]
        if c["baseline"] == "fastv":  # read along the frontier of its 14 runs (7 layers, 2 budgets)
            runs = [(r["gflops"], r["accuracy"]["overall"], r["method"]) for r in result["rows"]
                    if r["method"].startswith("fastv:")]
            curve = [p[:2] for p in methods.frontier(runs)]
            assert c["accuracy"]["overall"] == fidelity.read_at(curve, m["gflops"])[0]
            assert c["read"] != "cheapest" or c["frontier_runs"] == [methods.frontier(runs)[0][2]]
            continue
        curve = sorted((rows[(c["baseline"], k)]["gflops"], rows[(c["baseline"], k)]["accuracy"]["overall"])
                       for k in (52, 26))
        if c["read"] == "interpolated":
            (x0, y0), (x1, y1) = curve
            assert c["accuracy"]["overall"] == pytest.approx(y0 + (y1 - y0) * (m["gflops"] - x0) / (x1 - x0))
        elif c["read"] == "cheapest":
            assert m["gflops"] < curve[0][0] and c["accuracy"]["overall"] == curve[0][1]
        else:
            assert m["gflops"] > curve[-1][0] and c["accuracy"]["overall"] is None
    assert set(result["targets"]) == {"meteor_25_keeps_97", "meteor_24_keeps_99", "meteor_beats_baselines_at_equal_flops",
                                      "stage3_adapts", "stage3_adaptive_beats_fixed"}
    fixed = result["targets"]["stage3_adaptive_beats_fixed"]["by_budget"]
    assert [v["fixed_kept"] for v in fixed] == [52, 26]  # the same average, for every question
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (3 * plot.W, 2 * plot.H + 24)
    text = fidelity.report(result)
    assert "At equal prefill FLOPs" in text and "targets (reported, not asserted)" in text


def test_read_at_interpolates_and_never_extrapolates():
    points = [(1.0, 0.5), (3.0, 0.9)]
    assert fidelity.read_at(points, 2.0) == (pytest.approx(0.7), "interpolated")
    assert fidelity.read_at(points, 0.5) == (0.5, "cheapest")
    assert fidelity.read_at(points, 4.0) == (None, "dearer")


def test_meteor_fields_and_ablations_reach_only_the_meteor_runs(capsys):
    code = cli.main(["bench", "fidelity", "--per-kind", "2", "--val-per-kind", "2", "--budgets", "0.25",
                     "--methods", "random,meteor-s2,meteor", "--meteor-set", "fusion_similarity=centred_cosine",
                     "--ablation", "--plot", "none", "--json", "--no-progress", "--test-seed", "5",
                     "--flops-questions", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    similarity = {(r["method"], r["budget"]): r["config"]["fusion_similarity"] for r in result["runs"]}
    assert similarity[("meteor-s2", 52)] == similarity[("meteor", 52)] == similarity[("meteor", 50)] == "centred_cosine"
    assert similarity[("random", 52)] == "duplicate"  # a baseline keeps the defaults: it has no Stage 2
    assert similarity[("meteor:cosine-s2", 26)] == similarity[("meteor:paper", 52)] == "cosine"
    assert {r["method"] for r in result["rows"]} >= {f"meteor:{n}" for n in methods.ABLATIONS}
    assert result["meteor"] == result["calibration"]["meteor"] == {"fusion_similarity": "centred_cosine"}
    assert result["test_seed"] == 5
    assert "fusion_similarity='centred_cosine'" in fidelity.report(result)


def test_meteor_set_pins_any_field_and_calibration_leaves_it_alone(capsys):
    """``--meteor-set llm_layer=2`` (a field the calibration sets too) reaches every METEOR run, and the
    calibration does not choose the layer; lambda pinned likewise is not solved."""
    code = cli.main(["bench", "fidelity", "--per-kind", "1", "--val-per-kind", "1", "--budgets", "0.25",
                     "--methods", "fastv,meteor-s3,meteor-s3-fixed,meteor", "--meteor-set", "llm_layer=2",
                     "--plot", "none", "--json", "--no-progress", "--flops-questions", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["calibration"]["meteor_layer"] == 2
    layers = {r["method"]: r["config"]["llm_layer"] for r in result["runs"] if r["method"] != "unpruned"}
    assert {m: la for m, la in layers.items() if m.startswith("meteor")} == {
        "meteor-s3": 2, "meteor-s3-fixed": 2, "meteor": 2}
    assert {m: la for m, la in layers.items() if m.startswith("fastv")} == {f"fastv:{i}": i for i in range(1, 8)}
    code = cli.main(["bench", "fidelity", "--per-kind", "1", "--val-per-kind", "1", "--budgets", "0.25",
                     "--methods", "meteor-s3", "--meteor-set", "llm_lambda=2.5", "--meteor-set", "llm_layer=3",
                     "--plot", "none", "--json", "--no-progress", "--flops-questions", "1"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["calibration"]["lambdas"] == {}
    run = [r for r in result["runs"] if r["method"] == "meteor-s3"][0]
    assert (run["config"]["llm_lambda"], run["config"]["llm_layer"]) == (2.5, 3)


def test_test_seed_draws_other_questions_than_the_default():
    from meteor_plugin.fidelity import evaluate as ev
    from meteor_plugin.fidelity import llava_format

    tokenizer = llava_format.build_hf_tokenizer()
    a, b = ev.eval_set(tokenizer, 4, "test"), ev.eval_set(tokenizer, 4, "test", seed=5)
    assert not torch.equal(a.images, b.images)
    assert ev.eval_set(tokenizer, 4, "test", seed=5).ids == b.ids


def test_bench_refuses_an_unknown_field_or_value_before_any_work():
    with pytest.raises(ValueError, match="fusion_similarity='dot' is invalid"):
        fidelity.run(fidelity.FidelityBench(per_kind=1, methods=["meteor-s2"], meteor={"fusion_similarity": "dot"},
                                            plot=None))
    with pytest.raises(ValueError, match="unknown ablation"):
        fidelity.run(fidelity.FidelityBench(per_kind=1, methods=["meteor"], ablations=["fancy"], plot=None))
    with pytest.raises(ValueError, match="split='train' is invalid"):
        fidelity.run(fidelity.FidelityBench(per_kind=1, val_per_kind=1, methods=["random"], split="train", plot=None))


def test_validation_split_is_reported_as_such(capsys):
    assert cli.main(["bench", "fidelity", "--per-kind", "2", "--val-per-kind", "2", "--budgets", "0.25",
                     "--methods", "random", "--split", "val", "--plot", "none", "--json", "--no-progress",
                     "--flops-questions", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "val" and "val questions: 2 per kind (after the calibration ones)" in fidelity.report(result)


def test_demo_asks_every_kind_about_its_scenes_and_times_interleaved(tmp_path, capsys):
    png = tmp_path / "map.png"
    assert cli.main(["demo", "--seed", "3", "--scenes", "2", "--repeats", "3", "--save-map", str(png), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [e["seed"] for e in result["scenes"]] == [3, 4]
    kinds = [a["kind"] for a in result["scenes"][0]["answers"]]  # one of each kind the scene answers
    assert kinds == [k for k in KINDS if k in kinds] and {"background", "count"} <= set(kinds)
    answers = [a for e in result["scenes"] for a in e["answers"]]
    for a in answers:
        # Stage 3 may keep all it gets: a question whose attention spreads over the image (background)
        assert a["stages"]["llm"]["out"] <= a["stages"]["fusion"]["out"] < a["stages"]["encoder"]["out"] < 208
    g = result["agreement"]
    assert g["of_questions"] == len(answers) and g["questions"] == sum(a["unpruned"] == a["meteor"] for a in answers)
    assert g["of_scenes"] == 2 and 0 <= g["scenes"] <= 2
    timing = result["timing"]
    assert timing["speedup"]["rounds"] == 3
    assert timing["speedup"]["low"] <= timing["speedup"]["median"] <= timing["speedup"]["high"]
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 3 * 256 and img.height > 2 * 256  # 2 encoders x 3 stages
    text = demo.report_fidelity(result)
    assert f"pruned answers equal to unpruned: {g['questions']} of {g['of_questions']} questions" in text
    assert "interleaved rounds after a warm-up" in text


def test_token_map_chains_each_stage_back_to_encoder_grid_cells():
    stages = {"encoder": {"in": 8, "out": 5, "positions": {"a": [0, 2, 3], "b": [1, 3]},
                          "per_encoder": {"a": [4, 3], "b": [4, 2]}},
              "fusion": {"in": 5, "out": 3, "kept": [0, 2, 4]},  # a0, a3, b3
              "llm": {"in": 3, "out": 2, "kept": [1, 2]}}  # a3, b3
    cells = token_map.kept_cells(stages, ["a", "b"])
    assert cells == {"encoder": {"a": {0, 2, 3}, "b": {1, 3}}, "fusion": {"a": {0, 3}, "b": {3}},
                     "llm": {"a": {3}, "b": {3}}}
    assert token_map.grid_sides(stages["encoder"]["per_encoder"]) == {"a": 2, "b": 2}
    with pytest.raises(ValueError, match="no Stage 1 positions"):
        token_map.kept_cells({"llm": {"kept": [0]}}, ["a"])
