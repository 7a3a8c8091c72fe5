"""The benchmarks run and report what they measured consistently (no timing is asserted here)."""

import json

import pytest

from meteor_plugin.cli import main
from meteor_plugin.compat.transformers import generation


def test_quick_benchmarks_report_token_counts_and_counted_flops(capsys):
    assert main(["bench", "all", "--quick", "--repeats", "1", "--json", "--float-mask"]) == 0
    llava, next_, eagle = json.loads(capsys.readouterr().out)
    stage3 = llava["variants"]["stage3"]
    assert stage3["visual_tokens"] == 36 and llava["variants"]["unpruned"]["visual_tokens"] == 144
    assert stage3["layer_tokens"][:2] == llava["variants"]["unpruned"]["layer_tokens"][:2]
    assert stage3["layer_tokens"][2] == stage3["layer_tokens"][1] - (144 - 36)
    assert llava["flops_ratio"] > 1 and 0 < llava["scoring_share_of_pruned_prefill"] < 1
    # LLaVA-1.6 shape: 5 CLIP inputs of 144 patches, half kept in CLIP, 40 after Stage 3, separators kept
    unpruned, pruned = next_["variants"]["unpruned"], next_["variants"]["meteor"]
    assert (unpruned["encoder_tokens"], pruned["encoder_tokens"]) == (720, 360)
    assert (unpruned["visual_tokens"], pruned["visual_tokens"]) == (720, 40) and unpruned["separators"] == 24
    assert unpruned["layer_tokens"] == [10 + 720 + 24] * 4
    assert pruned["layer_tokens"] == [10 + 360 + 24] * 2 + [10 + 40 + 24] * 2
    assert next_["flops_ratio"] > 1
    meteor = eagle["variants"]["meteor"]
    assert meteor["stages"] == {"encoders": 3648, "after stage 1": 1200, "after stage 2": 300, "after stage 3": 100}
    assert sum(k for _, k in meteor["per_encoder"].values()) == 1200
    # The effective rank differs across the four encoders, so Stage 1's split is not uniform (the numerical rank
    # saturated at min(tokens, channels) and split it evenly), and it follows the ranks.
    ranks = eagle["encoder_ranks"]
    assert len({round(r, 1) for r in ranks.values()}) == 4
    shares = {n: k / c for n, (c, k) in meteor["per_encoder"].items()}
    assert max(shares.values()) > 1.2 * min(shares.values())
    by_rank = sorted(ranks, key=ranks.get)
    kept = [meteor["per_encoder"][n][1] for n in by_rank]
    assert kept[-1] >= kept[0]
    assert eagle["flops_ratio"] > 1 and abs(eagle["visual_tokens_reduction"] - (1 - 100 / 1024)) < 1e-9
    # The KV cache read from the prefill's own cache: LLaVA's 4 layers of 2 KV heads x 16 channels in float32 hold
    # 154 tokens each unpruned, and 154, 154, 46, 46 with Stage 3 keeping 36 of 144 from layer 2 on. Those two
    # layers' keys carry the sizes Stage 3 gave the kept tokens (proportional attention's key column: one more
    # channel on this CPU, keys and values alike).
    # (transformers 5; 4.x adds the sizes through a float mask, and its cache has no such channel.)
    per_token, widened = 2 * 2 * 16 * 4, 2 * 2 * (17 if generation() == "5" else 16) * 4
    assert llava["variants"]["unpruned"]["kv_cache_mib"] * 2 ** 20 == per_token * 4 * 154
    assert stage3["kv_cache_mib"] * 2 ** 20 == per_token * 2 * 154 + widened * 2 * 46
    # Needed FLOPs do not depend on how the sizes reach the logits; what is executed beyond them does: nothing in
    # LLaVA's unpruned run (the causal kernel; EAGLE's has Pix2Struct's padding patches, masked), the column's channel
    # on the key column's path, the upper triangle with the float mask.
    assert llava["variants"]["unpruned"]["overhead_gflops"] == 0
    for result, pruned in ((llava, "stage3"), (eagle, "meteor")):
        v = result["variants"]
        assert v["float mask"]["gflops"] == pytest.approx(v[pruned]["gflops"], rel=1e-9)
        if generation() == "5":
            assert v["float mask"]["overhead_gflops"] > v[pruned]["overhead_gflops"] > v["unpruned"]["overhead_gflops"]
        else:  # 4.x runs the float mask in both
            assert v["float mask"]["overhead_gflops"] == pytest.approx(v[pruned]["overhead_gflops"], rel=1e-9)
        assert result["target"] == 0.9 and len(result["round_speedups"]) == 1
    for result in (llava, next_, eagle):
        full, pruned = list(result["variants"].values())[:2]
        assert pruned["kv_cache_mib"] < full["kv_cache_mib"] and pruned["llm_peak_memory_mib"] < full["llm_peak_memory_mib"]
        for variant in result["variants"].values():
            assert variant["seconds"] > 0 and variant["peak_memory_mib"] > 0 and len(variant["runs"]) == 1
            assert variant["overhead_gflops"] >= 0
            assert 0 < variant["llm_peak_memory_mib"] <= variant["peak_memory_mib"]


def test_quick_decode_bench_reads_the_kv_cache_that_stage3_shrank(capsys):
    assert main(["bench", "decode", "--quick", "--repeats", "1", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    unpruned, pruned = result["variants"]["unpruned"], result["variants"]["stage3"]
    assert (unpruned["visual_tokens"], pruned["visual_tokens"]) == (144, 36)
    # Quick shape: 4 layers, 2 KV heads of 16 channels, float32, batch 2. The cache holds the prompt (10 text
    # + 144 visual tokens) and 3 of the 4 new tokens (the last is never fed back); Stage 3 removes 108 visual
    # tokens from layers 2 and 3.
    # Layers 2 and 3 hold proportional attention's key column (one more channel in keys and values on this CPU).
    per_token = 2 * 2 * 2 * 16 * 4  # batch x (keys, values) x heads x channels x bytes
    assert unpruned["kv_cache_mib"] * 2 ** 20 == per_token * 4 * 157
    column = 17 if generation() == "5" else 16  # the key column's channel where it runs (transformers 5)
    assert pruned["kv_cache_mib"] * 2 ** 20 == per_token * 2 * 157 + per_token * column // 16 * 2 * 49
    assert result["kv_cache_ratio"] == unpruned["kv_cache_mib"] / pruned["kv_cache_mib"]
    for variant in (unpruned, pruned):
        assert variant["tokens_per_second"] == 2 * 4 / variant["generate_seconds"] > 0
        assert len(variant["runs"]["full"]) == len(variant["runs"]["first"]) == 1  # timings are not asserted


def test_llm_layers_sets_the_depth_of_the_scaled_shapes_and_is_refused_where_it_cannot_apply(capsys):
    assert main(["bench", "llava", "--quick", "--repeats", "1", "--llm-layers", "6", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["model"]["llm_layers"] == 6
    unpruned, pruned = result["variants"]["unpruned"]["layer_tokens"], result["variants"]["stage3"]["layer_tokens"]
    assert unpruned == [154] * 6 and pruned == [154] * 2 + [46] * 4  # Stage 3 from layer 2 of the six
    # Deeper: more layers run pruned, so the counted FLOPs ratio grows.
    assert main(["bench", "llava", "--quick", "--repeats", "1", "--json"]) == 0
    (shallow,) = json.loads(capsys.readouterr().out)
    assert result["flops_ratio"] > shallow["flops_ratio"]
    assert main(["bench", "llava", "--quick", "--llm-layers", "2"]) == 2
    assert "--llm-layers 2 is invalid: Stage 3 prunes from layer 2" in capsys.readouterr().err
    assert main(["bench", "llava", "--shape", "llava-1.5-7b", "--llm-layers", "8"]) == 2
    assert "--shape llava-1.5-7b has its model's own (32 layers)" in capsys.readouterr().err


def test_profile_splits_the_pruned_prefill_into_parts_that_add_up(capsys):
    assert main(["bench", "eagle", "--quick", "--repeats", "1", "--profile", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    parts = {row["part"]: row for row in result["profile"]["parts"]}
    assert {"stage 1: scoring and selection", "stage 2: scoring, selection, gathering",
            "stage 3: scoring and selection", "LLM decoder layers", "projectors", "LM head"} <= set(parts)
    assert sum(1 for p in parts if p.startswith("encoder ")) == 4
    # Exclusive parts: shares add up to the whole (time: the prefill's own clock around them; FLOPs: all counted).
    assert abs(sum(r["flops_share"] for r in parts.values()) - 1) < 1e-6
    assert 0.9 < sum(r["time_share"] for r in parts.values()) < 1.05
    assert all(r["ms"] >= 0 for r in parts.values())
    # Stage 3's selection runs inside a decoder layer; the layers' FLOPs exclude it, and they still dominate the LLM.
    assert parts["LLM decoder layers"]["flops_share"] > parts["stage 3: scoring and selection"]["flops_share"] > 0
    # The unpruned run profiled alike, and the figure without the encoders both variants run whole.
    unpruned = {row["part"]: row for row in result["profile_unpruned"]["parts"]}
    assert not any(p.startswith("stage ") for p in unpruned)
    rest = result["without_encoders_run_in_full"]
    assert len(rest["parts"]) == 3 and not any("clip-vit" in p for p in rest["parts"])  # CLIP is pruned inside
    assert set(rest["parts"]) <= set(parts) & set(unpruned)

    def left(profile):
        rows = [r for r in profile["parts"] if r["part"] in rest["parts"]]
        return (profile["prefill_ms"] - sum(r["ms"] for r in rows),
                profile["gflops"] * (1 - sum(r["flops_share"] for r in rows)))

    (ms_u, gf_u), (ms_p, gf_p) = left(result["profile_unpruned"]), left(result["profile"])
    assert rest["speedup"] == pytest.approx(ms_u / ms_p) and rest["flops_ratio"] == pytest.approx(gf_u / gf_p)
    assert rest["flops_ratio"] > result["flops_ratio"]  # what pruning changes shrinks more than the whole
    rates = rest["layer_gflops_per_s"]
    for profile, rate in zip((result["profile_unpruned"], result["profile"]), rates):
        row = next(r for r in profile["parts"] if r["part"] == "LLM decoder layers")
        assert rate == pytest.approx(profile["gflops"] * row["flops_share"] / (row["ms"] / 1000))


def test_side_by_side_profiles_interleave_their_timed_runs(monkeypatch):
    """The unpruned and pruned profiles that `without` compares are timed in alternation, as `compare` times
    the variants, so a machine that slows down mid-run slows both alike."""
    import contextlib

    import torch

    from meteor_plugin.bench import profile as prof
    from meteor_plugin.bench.compare import Variant

    monkeypatch.setattr(prof, "watching", lambda model, parts: contextlib.nullcontext())
    state, calls = {}, []
    @contextlib.contextmanager
    def variant(name):
        state.update(v=name)
        yield
        state.update(v=None)  # the prefill runs inside the variant's scope, never after it

    variants = [Variant("a", lambda: variant("a")), Variant("b", lambda: variant("b"))]
    out = prof.profile_side_by_side(None, lambda: calls.append(state["v"]), 3, torch.device("cpu"), variants)
    assert calls == ["a", "b"] + ["a", "b"] * 3 + ["a", "b"]  # warm-ups, timed rounds, the FLOPs-counted runs
    assert [r["repeats"] for r in out] == [3, 3]
    assert [[row["part"] for row in r["parts"]] for r in out] == [[prof.OTHER], [prof.OTHER]]


def test_quick_qwen_vl_bench_prunes_inside_the_tower_and_in_the_language_model(capsys):
    from meteor_plugin.bench.qwen_vl_prefill import unavailable

    if unavailable() is not None:  # transformers 4.x: refused in one line, naming why
        assert main(["bench", "qwen-vl", "--quick", "--repeats", "1"]) == 2
        assert unavailable() in capsys.readouterr().err
        return
    assert main(["bench", "qwen-vl", "--quick", "--repeats", "1", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    unpruned, pruned = result["variants"]["unpruned"], result["variants"]["meteor"]
    # a 16x24-patch image: 96 merged tokens, half kept inside the tower, an eighth (12) after Stage 3's layer
    assert (unpruned["encoder_tokens"], pruned["encoder_tokens"]) == (96, 48)
    assert (unpruned["visual_tokens"], pruned["visual_tokens"]) == (96, 12)
    length = result["sequence_length"]
    assert unpruned["layer_tokens"] == [length] * 4 and pruned["layer_tokens"] == [length - 48] * 2 + [length - 84] * 2
    assert result["flops_ratio"] > 1 and pruned["kv_cache_mib"] < unpruned["kv_cache_mib"]
    assert main(["bench", "qwen-vl", "--quick", "--profile"]) == 2
    assert "the qwen-vl bench has no profile yet" in capsys.readouterr().err

