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
            by_name = {(r["method"], r["gflops"]): r for r in result["rows"] if r["method"].startswith("fastv:")}
            for kind in ("background", "count"):  # every kind read on the same runs as the overall accuracy
                points = [(x, by_name[(name, x)]["accuracy"][kind]) for x, _, name in methods.frontier(runs)]
                assert c["accuracy"][kind] == fidelity.read_at(points, m["gflops"])[0]
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


def test_demo_asks_every_kind_about_its_scenes_gives_the_mean_kept_per_stage_and_no_speed(tmp_path, capsys):
    png = tmp_path / "map.png"
    assert cli.main(["demo", "--seed", "3", "--scenes", "2", "--save-map", str(png), "--json"]) == 0
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
    # --scenes: the mean tokens in and kept per stage over every question asked
    means = result["mean_stages"]
    assert list(means) == ["encoder", "fusion", "llm"]
    for stage, m in means.items():
        assert m["questions"] == len(answers)
        assert m["out"] == pytest.approx(sum(a["stages"][stage]["out"] for a in answers) / len(answers))
        assert m["in"] == pytest.approx(sum(a["stages"][stage]["in"] for a in answers) / len(answers))
    assert "timing" not in result  # no speed: the README sends users to `bench` for it
    text = demo.report_fidelity(result)
    assert f"pruned answers equal to unpruned: {g['questions']} of {g['of_questions']} questions" in text
    assert f"llm {means['llm']['in']:.1f} in, {means['llm']['out']:.1f} kept" in text
    assert "speed: not measured here" in text and "ms" not in text
    # the map names the encoders as the header does, and carries the question and both answers
    first = result["scenes"][0]["answers"][0]
    assert result["map"]["caption"] == token_map.caption(first["prompt"], first["unpruned"], first["meteor"],
                                                         first["expected"])
    assert all(row in result["model"] for row in result["map"]["rows"]) and len(result["map"]["rows"]) == 2
    with Image.open(png) as img:
        assert img.format == "PNG" and img.width > 3 * 256 and img.height > 2 * 256  # 2 encoders x 3 stages
    assert cli.main(["demo", "--repeats", "3"]) == 2  # timing rounds of a model the demo does not time
    assert "--repeats times the prefill of a LLaVA demo" in capsys.readouterr().err


def test_the_map_has_a_legend_and_its_caption(tmp_path):
    image = torch.full((3, 16, 16), 235, dtype=torch.uint8)
    cells = {"encoder": {"a": {0, 1}}, "llm": {"a": {0}}}
    lines = token_map.caption("What colour is the circle?", "red", "blue", "red")
    assert lines == ["Q: What colour is the circle?", "unpruned: red   METEOR: blue   expected: red"]
    plain = tmp_path / "plain.png"
    token_map.draw_map(image, cells, {"a": 2}, str(plain))
    path = tmp_path / "map.png"
    token_map.draw_map(image, cells, {"a": 2}, str(path), lines, {"a": "a (CLIP ViT at 32 px, 2x2 tokens)"})
    with Image.open(path) as img, Image.open(plain) as without:
        assert img.height == without.height + 2 * token_map.LINE  # the caption's two lines on top
        legend_top = img.height - token_map.LINE * len(token_map.LEGEND) - 4
        (kept_box, kept_text, _), (dropped_box, dropped_text, _) = token_map.legend_boxes(legend_top)
        inside = lambda box: img.getpixel(((box[0] + box[2]) // 2, (box[1] + box[3]) // 2))  # noqa: E731
        assert "kept token" in kept_text and "dropped token: darkened" in dropped_text
        assert sum(inside(dropped_box)) < sum(inside(kept_box)) / 2  # dark = dropped


def test_interleaved_prefill_installs_the_patches_once_and_its_ratio_is_of_the_medians(monkeypatch):
    from meteor_plugin.registry import REGISTRY

    import time

    from meteor_plugin import MeteorConfig
    from meteor_plugin.runtime import pruning_config

    restored, seen = [], []
    real = REGISTRY.restore_all

    def restore_all():
        restored.append(len(seen))
        real()

    monkeypatch.setattr(REGISTRY, "restore_all", restore_all)
    model = type("Model", (), {"config": type("Config", (), {})()})()

    def prefill():
        layer = pruning_config(model).llm_layer
        seen.append(layer)
        time.sleep(0.004 if layer == 1 else 0.001)

    t = demo.interleaved_prefill(prefill, {"unpruned": MeteorConfig(llm_layer=1), "meteor": MeteorConfig(llm_layer=3)},
                                 repeats=3, warmup=1)
    assert seen == [1, 3, 3, 1, 1, 3, 3, 1]  # interleaved, the order reversed every other round
    assert restored == [8]  # the patches went back once, after every round
    assert t["speedup"]["median_ratio"] == t["unpruned"]["median_s"] / t["meteor"]["median_s"] > 1
    assert t["speedup"]["rounds"] == 3 and t["speedup"]["warmup"] == 1
    assert demo._timing_line(t, "batch 1").endswith(f"{t['speedup']['median_ratio']:.2f}x (the ratio of the medians)")


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


class _Bars:
    """Every progress bar drawn, by name, with whether it was shown (tqdm.auto.tqdm recorded)."""

    def __init__(self):
        self.made = []

    def __call__(self, *args, desc="", disable=False, **kwargs):
        import tqdm

        self.made.append((desc, not disable))
        return tqdm.tqdm(*args, desc=desc, disable=True, **kwargs)


@pytest.mark.parametrize("quiet", [False, True])
def test_every_phase_of_the_bench_has_a_bar_and_no_progress_hides_them_all(monkeypatch, capsys, quiet):
    import tqdm.auto

    bars = _Bars()
    monkeypatch.setattr(tqdm.auto, "tqdm", bars)
    args = ["bench", "fidelity", "--per-kind", "1", "--val-per-kind", "1", "--budgets", "0.25", "--methods", "avgpool",
            "--plot", "none", "--json", "--flops-questions", "1"]
    assert cli.main(args + (["--no-progress"] if quiet else [])) == 0
    names = [name for name, _ in bars.made]
    for phase in ("fidelity: loading the checkpoint", "val questions", "encoder ranks", "calibration: llm_layer",
                  "calibration: llm_lambda", "test questions", "fidelity"):
        assert phase in names, names
    assert all(shown is not quiet for _, shown in bars.made)


def _interrupted_bench(monkeypatch, capsys, after):
    """The bench with a stand-in calibration, stopped by Ctrl-C when the run numbered ``after`` begins."""
    from meteor_plugin.fidelity import calibration, evaluate

    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: methods.Calibration({"clip-448": 1.0}, 2, 2))
    real, calls = evaluate.evaluate, []

    def evaluate_until(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate", evaluate_until)
    code = cli.main(["bench", "fidelity", "--per-kind", "1", "--budgets", "0.25", "--methods", "random,avgpool",
                     "--plot", "none", "--flops-questions", "1", "--no-progress"])
    return code, capsys.readouterr()


def test_ctrl_c_prints_the_rows_finished_so_far_in_separated_columns(monkeypatch, capsys):
    code, (out, err) = _interrupted_bench(monkeypatch, capsys, after=2)
    assert code == 130
    assert "INTERRUPTED after 2 of 5 runs" in out
    assert "not run: random@52 seed 1, random@52 seed 2, avgpool@52" in out
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("method"))
    header, rows = lines[at], lines[at + 2:at + 4]
    import re

    columns = re.split(r"\s{2,}", header)
    assert columns == ["method", "budget", "kept", "GFLOPs", "per layer", *KINDS, "overall", "rel."]
    for row, method in zip(rows, ["unpruned", "random"]):
        cells = re.split(r"\s{2,}", row)
        assert cells[0] == method and len(cells) == len(columns), row  # every column stands apart
        assert re.fullmatch(r"(\d+/){7}\d+", cells[4])  # the per-layer counts: one cell
    code, (out, err) = _interrupted_bench(monkeypatch, capsys, after=0)  # nothing finished: nothing to print
    assert code == 130 and out == "" and err.strip().endswith("meteor-plugin bench: interrupted")


def test_table_columns_never_run_together():
    lines = fidelity.table(["method", "budget", "per layer"], [["meteor:deep-similarity", 52, "208/208/104/104"],
                                                                ["random", 26, "26"]])
    assert lines == ["method                  budget  per layer",
                     "-----------------------------------------",
                     "meteor:deep-similarity      52  208/208/104/104",
                     "random                      26  26"]
