"""The FLOPs counter counts the attention that is needed (causal: the lower triangle), against hand computations, and
keeps what a kernel executes beyond it (a mask's full square, the key column's channel) apart."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

import meteor_plugin
from meteor_plugin import flops
from meteor_plugin.compat import key_column
from meteor_plugin.compat.transformers import generation
from meteor_plugin.testing.llava import TinyLlavaSpec, build_tiny_llava, make_batch

SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
B, H, D = 2, 3, 8


def per_pair(dk=D, dv=D):
    """FLOPs of one (query, key) pair of one head: q.k and the weighted value, 2 FLOPs per multiply-add."""
    return 2 * (dk + dv)


def counted(fn):
    with flops.flop_counter() as counter:
        fn()
    return counter.get_total_flops(), counter.overhead


def test_sdpa_causal_counts_the_triangle_and_a_mask_counts_what_it_lets_through():
    torch.manual_seed(0)
    L = 10
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, H, L, D), torch.randn(B, H, L, D)
    triangle, square = L * (L + 1) // 2, L * L  # pairs (i, j <= i), and every pair
    assert counted(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)) == (B * H * triangle * per_pair(), 0)
    assert counted(lambda: F.scaled_dot_product_attention(q, k, v)) == (B * H * square * per_pair(), 0)
    # The same causal pattern as a mask: the same needed FLOPs, and the square SDPA computes for it is overhead.
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    additive = torch.zeros(L, L).masked_fill(~causal, torch.finfo(torch.float32).min)
    for mask in (causal, additive, additive.masked_fill(~causal, float("-inf"))):
        assert counted(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) == (
            B * H * triangle * per_pair(), B * H * (square - triangle) * per_pair())
    # Left padding in a mask: row 0's first 3 keys are padding, not needed (its padded queries see nothing).
    padded = causal.expand(B, 1, L, L).clone()
    padded[0, :, :, :3] = False
    n = L - 3
    needed = H * (triangle + n * (n + 1) // 2) * per_pair()
    assert counted(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=padded)) == (
        needed, 2 * H * square * per_pair() - needed)


def test_a_query_block_at_the_end_counts_the_keys_each_query_sees():
    torch.manual_seed(0)
    lq, lk = 3, 10
    q, k, v = torch.randn(B, H, lq, D), torch.randn(B, H, lk, D), torch.randn(B, H, lk, D)
    # A decoding step: one query sees every cached key.
    assert counted(lambda: F.scaled_dot_product_attention(q[:, :, -1:], k, v)) == (B * H * lk * per_pair(), 0)
    # Three queries at the end of ten keys, causal: 8 + 9 + 10 pairs (the mask a decoding block gets).
    mask = torch.arange(lk)[None, :] <= (torch.arange(lq)[:, None] + lk - lq)
    assert counted(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)) == (
        B * H * 27 * per_pair(), B * H * (30 - 27) * per_pair())
    # FlashAttention-2's causal aligns the block at the end too: the same 27 pairs; its variable-length call counts
    # each sequence's own.
    counter = flops.Counter()
    assert counter.attention(B, H, lq, lk, D, D, "bottom-right") == B * H * 27 * per_pair()
    assert counter.attention(1, H, 0, 0, D, D, "bottom-right", per_sequence=[(4, 4), (1, 6)]) == \
        H * (10 + 6) * per_pair()
    assert counter.overhead == 0


def test_a_widened_kernel_call_counts_its_original_width_and_real_keys():
    """Proportional attention's key column: the kernel runs one channel wider and keeps padding keys out through the
    column, with no mask; needed is the original width over the real keys, the rest is overhead."""
    torch.manual_seed(0)
    L, wide = 6, D + 1
    q, k, v = torch.randn(B, H, L, wide), torch.randn(B, H, L, wide), torch.randn(B, H, L, wide)
    valid = torch.ones(B, L, dtype=torch.bool)
    valid[1, :2] = False  # left padding: 4 real tokens in row 1
    with flops.attention_needs(D, valid):
        needed, overhead = counted(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    pairs = 21 + 10  # 6 * 7 / 2 and 4 * 5 / 2
    assert needed == H * pairs * per_pair()
    assert overhead == 2 * H * 21 * per_pair(wide, wide) - needed


def layer_attention_flops(counter, prefix, layers):
    counts = counter.get_flop_counts()
    return [counts[f"{prefix}.{i}"][SDPA_CPU] for i in range(layers)]


def test_a_causal_llama_layer_counts_its_projections_and_its_triangle():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=50)
    config._attn_implementation = "sdpa"
    model = LlamaModel(config).eval()
    L, d, kv = 12, 8, 16  # 4 heads of 8 channels; 2 KV heads: 16 key and value channels
    ids = torch.randint(3, 50, (1, L))
    projections = 2 * L * (32 * 32 + 32 * kv + 32 * kv + 32 * 32 + 3 * 32 * 64)
    rotary = 2 * (d // 2) * L if generation() == "4.44" else 0  # 4.44 computes its rotary table with a matmul

    def run(mask=None):
        with flops.flop_counter() as counter, torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        counts = dict(counter.get_flop_counts()["Global"])
        return counts.pop(SDPA_CPU), sum(counts.values()), counter.overhead

    assert run() == (4 * (L * (L + 1) // 2) * per_pair(d, d), projections + rotary, 0)
    # Left padding: the 4 padding keys are not needed, whatever the mask makes the kernel compute. (4.37's mask lets a
    # padded query see every key, rather than leave its row empty; the counter counts what a mask lets through.)
    mask = torch.ones(1, L, dtype=torch.long)
    mask[0, :4] = 0
    padded_rows = 4 * L if generation() == "4.37" else 0
    attention, rest, overhead = run(mask)
    assert (attention, rest) == (4 * (8 * 9 // 2 + padded_rows) * per_pair(d, d), projections + rotary)
    assert overhead == 4 * L * L * per_pair(d, d) - attention  # a mask: SDPA computes the square


@pytest.mark.skipif(generation() != "5", reason="layer names of transformers 5's module tracker")
def test_a_pruned_prefill_counts_each_layer_s_own_triangle():
    """Stage 3 from layer 2: every layer's attention is the triangle of the tokens it ran on, whether the sizes of
    proportional attention reach it through the key column (one channel wider: overhead) or a float mask (the
    square: overhead), or there are none."""
    spec = TinyLlavaSpec()
    model = build_tiny_llava(spec)
    ids, _, images = make_batch([(3, 5)], [True], seed=0)
    d, heads = spec.llm_hidden // spec.llm_heads, spec.llm_heads
    runs = {}
    for name, proportional, around in (("none", "off", contextlib.nullcontext),
                                       ("column", "on", contextlib.nullcontext), ("float mask", "on", key_column.float_mask)):
        meteor_plugin.enable(encoder=False, fusion=False, llm=True, llm_min_keep=10, llm_max_keep=10,
                             proportional_attention=proportional)
        with flops.flop_counter() as counter, torch.no_grad(), around():
            model(input_ids=ids, images=images)
        lengths = meteor_plugin.stats(model).layer_seq_len
        runs[name] = (layer_attention_flops(counter, "LlavaLlamaForCausalLM.model.layers", spec.llm_layers),
                      counter.overhead, lengths)
    lengths = runs["none"][2]
    text = ids.shape[1] - 1  # the image token becomes 64 visual tokens, 10 kept from layer 2
    assert lengths[:2] == [text + 64] * 2 and lengths[2:] == [text + 10] * 2
    expected = [heads * (n * (n + 1) // 2) * per_pair(d, d) for n in lengths]
    for name, (per_layer, overhead, seen) in runs.items():
        assert seen == lengths and per_layer == expected, name
    assert runs["none"][1] == 0
    # The column's channel on keys and values in the two compacted layers (layers 0-1 carry no sizes: size 1 each).
    n = text + 10
    assert runs["column"][1] == 2 * heads * (n * (n + 1) // 2) * (per_pair(d + 1, d + 1) - per_pair(d, d))
    assert runs["float mask"][1] == 2 * heads * (n * n - n * (n + 1) // 2) * per_pair(d, d)
