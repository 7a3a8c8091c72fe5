"""Every pruning method of the fidelity benchmark keeps exactly its budget, per sample, on a batch of
the fidelity model, and the language model really runs on that many visual tokens."""

import pytest
import torch

import meteor_plugin
from meteor_plugin.fidelity import evaluate as ev
from meteor_plugin.fidelity import llava_format, methods
from meteor_plugin.fidelity import model as fidelity_model
from meteor_plugin.fidelity.model import pixels


@pytest.fixture(scope="module")
def setup():
    model = fidelity_model.build(seed=1)  # random weights: budgets do not depend on training
    tokenizer = llava_format.build_hf_tokenizer()
    data = ev.eval_set(tokenizer, 2, split="val")  # 8 questions, every kind, different prompt lengths
    cal = methods.Calibration({"clip-448": 30.0, "convnext-1024": 50.0}, meteor_layer=1, fastv_layer=2,
                              numerical_ranks={"clip-448": 64.0, "convnext-1024": 64.0})
    return model, tokenizer, data, cal


def _run(model, data, config):
    """One batch; returns the stats and the visual tokens each decoder layer saw per sample."""
    meteor_plugin.enable(config)
    text = [sum(1 for t in ids if t != -200) for ids in data.ids]
    with torch.no_grad(), ev.left_padded(model):
        width = max(len(r) for r in data.ids)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in data.ids])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in data.ids])
        model(input_ids=ids, attention_mask=mask, images=pixels(data.images), use_cache=False)
    run = meteor_plugin.stats(model)
    visual_per_layer = [[n - t for n, t in zip(layer, text)] for layer in run.layer_tokens]
    return run, visual_per_layer


@pytest.mark.parametrize("method", ["random", "avgpool", "visionzip", "drop-clip", "drop-convnext",
                                    "random+pa", "visionzip+pa", "meteor-s1", "meteor-s2"])
@pytest.mark.parametrize("k", [16, 31, 64])
def test_pre_llm_methods_keep_exactly_k_per_sample(setup, method, k):
    model, _, data, cal = setup
    run, per_layer = _run(model, data, methods.config_for(method, k, cal))
    kept, entered = ev.tokens_from_stats(run, len(data))
    assert kept == [k] * len(data)
    assert entered == [k] * len(data)
    assert all(layer == [k] * len(data) for layer in per_layer)  # every decoder layer saw exactly k
    if method == "meteor-s1":
        per_encoder = run.stages[0]["encoder"].detail["per_encoder"]
        assert sum(v[1] for v in per_encoder.values()) == k
        assert per_encoder["convnext-1024"][1] > per_encoder["clip-448"][1]  # split 30:50 by rank


def test_fixed_stage3_keeps_exactly_k_after_meteors_layer(setup):
    model, _, data, cal = setup
    run, per_layer = _run(model, data, methods.config_for("meteor-s3-fixed", 40, cal))
    assert [s["llm"].left for s in run.stages] == [40] * len(data)
    assert per_layer[0] == [208] * len(data) and per_layer[1] == [40] * len(data)  # meteor_layer = 1


def test_fastv_keeps_exactly_k_after_its_layer(setup):
    model, _, data, cal = setup
    run, per_layer = _run(model, data, methods.config_for("fastv", 32, cal))
    assert [s["llm"].left for s in run.stages] == [32] * len(data)
    assert per_layer[:2] == [[208] * len(data)] * 2 and per_layer[2] == [32] * len(data)  # fastv_layer = 2


@pytest.mark.parametrize("method", ["meteor-s3", "meteor", "meteor:paper", "meteor:cosine-s2"])
def test_adaptive_stage3_keeps_its_per_sample_budget_and_the_calibrated_mean(setup, method):
    model, _, data, cal = setup
    k = 32
    probe, _ = _run(model, data, methods.stage3_probe(method, k, cal))
    masses = methods.signals_from_stats(probe)
    entering = methods.entering_tokens(method, k)
    lam = methods.solve_lambda(masses, k, entering)
    methods.with_lambda(cal, method, k, lam)
    config = methods.config_for(method, k, cal)
    run, per_layer = _run(model, data, config)
    lo, hi = methods.llm_clip(k, entering)
    # The budget written independently of the plugin: clip(round(lambda * signal), lo, hi) per sample.
    expected = [min(max(int(torch.floor(torch.tensor(m * lam, dtype=torch.float64) + 0.5)), lo), hi)
                for m in methods.signals_from_stats(run)]
    assert [s["llm"].left for s in run.stages] == expected
    assert per_layer[cal.meteor_layer] == expected
    assert [s["llm"].entered for s in run.stages] == [entering] * len(data)
    assert sum(expected) / len(expected) == pytest.approx(k, abs=1.0)  # lambda solved on these questions
    if method == "meteor":
        e, f = methods.fusion_share(k)
        assert [(s["encoder"].left, s["fusion"].left) for s in run.stages] == [(e, f)] * len(data)


def test_unpruned_keeps_everything(setup):
    model, _, data, _ = setup
    run, per_layer = _run(model, data, methods.unpruned())
    assert ev.tokens_from_stats(run, len(data))[0] == [208] * len(data)
    assert len(per_layer) == 8 and all(layer == [208] * len(data) for layer in per_layer)


def test_solve_lambda_hits_the_clipped_mean():
    masses = [0.1, 0.2, 0.4, 0.8, 1.6]
    lam = methods.solve_lambda(masses, 20, 128)
    assert methods.clipped_mean(masses, lam, *methods.llm_clip(20, 128)) >= 20
    assert methods.clipped_mean(masses, lam * 0.999, *methods.llm_clip(20, 128)) < 20
    with pytest.raises(ValueError, match="no visual attention mass"):
        methods.solve_lambda([0.0, 0.0], 20, 128)
    with pytest.raises(ValueError, match="unknown method"):
        methods.check_methods(["random", "bogus"])


def test_ablations_switch_exactly_their_choice(setup):
    _, _, _, cal = setup
    cal = methods.Calibration(cal.encoder_ranks, 1, 2, numerical_ranks={"clip-448": 64.0, "convnext-1024": 64.0})
    for name in methods.ABLATIONS:
        methods.with_lambda(cal, f"meteor:{name}", 32, 1.0)
    methods.with_lambda(cal, "meteor", 32, 1.0)
    default = methods.config_for("meteor", 32, cal).to_dict()
    for name, change in methods.ABLATIONS.items():
        config = methods.config_for(f"meteor:{name}", 32, cal).to_dict()
        differs = {k for k in default if default[k] != config[k]}
        expected = {k for k in change if k != "rank"} | ({"encoder_ranks"} if "rank" in change else set())
        assert differs == expected, name
    paper = methods.config_for("meteor:paper", 32, cal)
    assert paper.encoder_ranks == cal.numerical_ranks
    # every field at version 1's value, not at a later version's legacy value for the same field
    assert (paper.llm_budget_signal, paper.fusion_similarity, paper.spread_floor) == ("mass", "cosine", 0.0)
    with pytest.raises(ValueError, match="unknown ablation\\(s\\) fancy"):
        methods.check_ablations(["fancy"])


def test_dropping_an_encoder_is_not_run_above_the_other_encoders_tokens():
    cal = methods.Calibration({"clip-448": 30.0, "convnext-1024": 50.0}, meteor_layer=1, fastv_layer=2)
    runs = [(m, k) for m, k, _, _ in methods.configs(["drop-clip", "drop-convnext", "avgpool"], [104, 52], cal)]
    # without the ConvNeXt only CLIP's 64 tokens remain: no drop-convnext run at 104 (50% of 208)
    assert runs == [("unpruned", 208), ("drop-clip", 104), ("avgpool", 104), ("drop-clip", 52),
                    ("drop-convnext", 52), ("avgpool", 52)]


def test_pinned_fields_reach_every_meteor_run_and_win_over_the_calibration(setup):
    """``--meteor-set`` works for every field: a field the method or the calibration would set (the layer, lambda,
    the clip, the ranks) is the pinned value in every METEOR run, never a second keyword for the same field."""
    _, _, _, cal = setup
    pinned = {"llm_layer": 2, "llm_lambda": 3.5, "llm_min_keep": 4, "encoder_ranks": {"clip-448": 1.0, "convnext-1024": 3.0}}
    cal = methods.Calibration(cal.encoder_ranks, meteor_layer=2, fastv_layer=5, meteor=pinned,
                              numerical_ranks=cal.numerical_ranks)
    assert methods.needed_lambdas(["meteor-s3", "meteor"], [32], pinned=pinned) == []  # lambda pinned: none solved
    for method in ("meteor-s1", "meteor-s2", "meteor-s3-fixed", "meteor-s3", "meteor"):
        config = methods.config_for(method, 32, cal)
        assert (config.llm_layer, config.llm_lambda, config.llm_min_keep) == (2, 3.5, 4), method
        assert config.encoder_ranks == pinned["encoder_ranks"], method
    assert methods.config_for("meteor", 32, cal).llm_max_keep == methods.llm_clip(32, methods.fusion_share(32)[1])[1]
    assert methods.stage3_clip("meteor-s3", 32, cal) == (4, methods.llm_clip(32, 208)[1])
    probe = methods.stage3_probe("meteor-s3", 32, cal)  # the probe keeps every token whatever is pinned
    assert (probe.llm_min_keep, probe.llm_max_keep, probe.llm_lambda, probe.llm_layer) == (1.0, 1.0, 1.0, 2)
    assert methods.config_for("meteor:numerical-rank", 32, cal).encoder_ranks == cal.numerical_ranks  # the switch wins
    assert methods.config_for("fastv", 32, cal).llm_layer == 5  # a baseline never takes them
    assert methods.config_for("random", 32, cal).llm_lambda == methods.base().llm_lambda


def test_fastv_runs_at_every_calibrated_layer_and_is_read_along_its_frontier():
    cal = methods.Calibration({"clip-448": 30.0, "convnext-1024": 50.0}, meteor_layer=1, fastv_layer=2,
                              fastv_layers=[1, 3, 7])
    runs = [(m, k, c.llm_layer, c.llm_max_keep) for m, k, _, c in methods.configs(["fastv"], [52], cal)]
    assert runs[1:] == [("fastv:1", 52, 1, 52), ("fastv:3", 52, 3, 52), ("fastv:7", 52, 7, 52)]
    # cost, accuracy: (0.5, 0.8) is beaten by the cheaper, more accurate (0.4, 0.85); ties keep the cheaper
    points = [(0.6, 0.9, "a"), (0.4, 0.85, "b"), (0.5, 0.8, "c"), (0.7, 0.9, "d"), (0.3, 0.5, "e")]
    assert methods.frontier(points) == [(0.3, 0.5, "e"), (0.4, 0.85, "b"), (0.6, 0.9, "a")]


def _logits(model, data, config):
    meteor_plugin.enable(config)
    with torch.no_grad(), ev.left_padded(model):
        width = max(len(r) for r in data.ids)
        ids = torch.tensor([r + [0] * (width - len(r)) for r in data.ids])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in data.ids])
        return model(input_ids=ids, attention_mask=mask, images=pixels(data.images), use_cache=False).logits


@pytest.mark.parametrize("method", ["random", "visionzip", "fastv"])
def test_a_baseline_with_proportional_attention_keeps_its_tokens_and_attends_as_they_stand_for(setup, method):
    """``<baseline>+pa``: the same selection and budget, run with proportional attention (what METEOR runs with),
    so the answers change while what is kept does not."""
    model, _, data, cal = setup
    config = methods.config_for(method + "+pa", 31, cal)
    assert config.proportional_attention == "on" and config.method == methods.config_for(method, 31, cal).method
    plain_run, plain_layers = _run(model, data, methods.config_for(method, 31, cal))
    pa_run, pa_layers = _run(model, data, config)
    assert pa_layers == plain_layers  # every decoder layer saw as many visual tokens
    assert ev.tokens_from_stats(pa_run, len(data)) == ev.tokens_from_stats(plain_run, len(data))
    plain, with_pa = _logits(model, data, methods.config_for(method, 31, cal)), _logits(model, data, config)
    assert (plain - with_pa).abs().max() > 1e-3


def test_avgpool_with_proportional_attention_is_refused_by_name(setup):
    model, _, data, cal = setup
    with pytest.raises(NotImplementedError, match="avgpool.*means over grid cells"):
        _logits(model, data, methods.config_for("avgpool", 31, cal).replace(proportional_attention="on"))


def test_the_pa_baselines_run_as_their_plain_ones_do_in_the_bench():
    cal = methods.Calibration({"clip-448": 30.0, "convnext-1024": 50.0}, meteor_layer=1, fastv_layer=2,
                              fastv_layers=[1, 3])
    runs = [(m, k, s, c.proportional_attention) for m, k, s, c in
            methods.configs(["random+pa", "fastv+pa"], [52], cal)][1:]
    assert runs == [("random+pa", 52, 0, "on"), ("random+pa", 52, 1, "on"), ("random+pa", 52, 2, "on"),
                    ("fastv+pa:1", 52, 0, "on"), ("fastv+pa:3", 52, 0, "on")]
