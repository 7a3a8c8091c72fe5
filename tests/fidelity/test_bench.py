"""``meteor-plugin bench fidelity`` on the shipped checkpoint, small: the table, the JSON, the PNG, the
tokens each method kept, and the demo that asks the checkpoint a question."""

import json

from PIL import Image

from meteor_plugin import cli
from meteor_plugin.bench import fidelity
from meteor_plugin.fidelity import plot


def test_small_bench_reports_every_method_with_its_budget(tmp_path, capsys):
    png = tmp_path / "fidelity.png"
    code = cli.main(["bench", "fidelity", "--per-kind", "6", "--val-per-kind", "6", "--budgets", "0.25",
                     "--methods", "random,avgpool,drop-convnext,fastv,meteor-s3,meteor", "--plot", str(png),
                     "--json", "--no-progress"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["method"], r["budget"]): r for r in result["rows"]}
    assert set(rows) == {("unpruned", 128), ("random", 32), ("avgpool", 32), ("drop-convnext", 32), ("fastv", 32),
                         ("meteor-s3", 32), ("meteor", 32), ("meteor", 31)}
    assert rows[("unpruned", 128)]["kept"] == 128
    for run in result["runs"]:
        if run["kept_exact"] is not None:
            assert run["kept_exact"] and run["kept"] == run["budget"]
    assert rows[("random", 32)]["seeds"] == [0, 1, 2] and "low" in rows[("random", 32)]
    assert rows[("meteor", 32)]["llm_input"] == 64  # Stages 1-2 pass 2k, Stage 3 keeps k on average
    for row in result["rows"]:
        assert set(row["accuracy"]) == {"colour", "count", "digit", "next_to_digit", "overall", "fine", "coarse"}
        assert 0.0 <= row["accuracy"]["overall"] <= 1.0
    assert set(result["targets"]) == {"meteor_24_keeps_99", "meteor_beats_baselines_at_25_or_less",
                                      "stage3_spends_more_on_fine"}
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == (2 * plot.W, plot.H + 24)
    assert "visual tokens retained" not in fidelity.report(result)  # the text report is a table, not the plot
    assert "targets (reported, not asserted)" in fidelity.report(result)


def test_fusion_similarity_reaches_the_stage_2_methods_and_the_report(capsys):
    code = cli.main(["bench", "fidelity", "--per-kind", "4", "--val-per-kind", "4", "--budgets", "0.25",
                     "--methods", "random,meteor-s2,meteor", "--fusion-similarity", "centred_cosine", "--plot", "none",
                     "--json", "--no-progress"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    similarity = {(r["method"], r["budget"]): r["config"]["fusion_similarity"] for r in result["runs"]}
    assert similarity[("meteor-s2", 32)] == similarity[("meteor", 32)] == similarity[("meteor", 31)] == "centred_cosine"
    assert similarity[("random", 32)] == "cosine"  # a baseline has no Stage 2 similarity to change
    assert result["fusion_similarity"] == result["calibration"]["fusion_similarity"] == "centred_cosine"
    assert "Stage 2 similarity (meteor-s2, meteor): centred_cosine" in fidelity.report(result)


def test_bench_refuses_an_unknown_similarity_before_any_work():
    import pytest

    with pytest.raises(ValueError, match="fusion_similarity='dot' is invalid"):
        fidelity.run(fidelity.FidelityBench(per_kind=1, methods=["meteor-s2"], fusion_similarity="dot", plot=None))


def test_demo_asks_the_shipped_model_and_reports_tokens(capsys):
    assert cli.main(["demo", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "expected:" in out and "unpruned:" in out and "meteor:" in out
    assert "prefill:" in out and "llm:" in out
