"""Proportional attention through the key column (transformers 5) equals it through the additive float mask, and
runs SDPA's causal kernel with no mask: prefill and cached decoding, left-padded batches, with and without Stage 3,
on the llava package's model, the converted EAGLE stand-in and transformers' LLaVA."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import meteor_plugin
from meteor_plugin.compat import key_column
from meteor_plugin.compat import transformers as compat
from meteor_plugin.core import key_column as core
from meteor_plugin.testing.llava import build_tiny_hf_llava, hf_batch, hf_language_layers, make_batch
from tests.adapters.eagle.test_stages import RANKS

V5 = compat.generation() == "5"
HEAD_DIM = 16  # the tiny language models': width 64, 4 heads (2 KV heads: GQA)
SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def float_mask_reference(q, k, v, bias, valid, scale):
    """Causal attention with ``bias`` added to every query's logit of each key and padding keys masked; a padded query
    sees only itself, as the plugin's masks do."""
    lq, lk = q.shape[-2], k.shape[-2]
    qi = torch.arange(lq)[:, None] + (lk - lq)
    visible = (torch.arange(lk)[None, :] <= qi)[None] & valid[:, None, :]
    visible = visible | (torch.arange(lk)[None, None, :] == qi[None])
    mask = bias[:, None, None, :].masked_fill(~visible[:, None], float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("width", [HEAD_DIM + 1, 24])  # the CPU's width, and a GPU kernel's multiple of 8
def test_the_column_adds_exactly_the_bias_and_masks_the_padding(width):
    torch.manual_seed(0)
    b, h, hkv, length = 2, 4, 2, 9
    q, k, v = torch.randn(b, h, length, HEAD_DIM), torch.randn(b, hkv, length, HEAD_DIM), torch.randn(b, hkv, length,
                                                                                                      HEAD_DIM)
    bias = torch.rand(b, length) * math.log(20.0)
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[0, :3] = False  # left padding
    scale = 0.3  # any scale: the column is written for the one passed
    keys, values = core.widen_keys(k, v, core.with_padding(bias, valid), width)
    out = F.scaled_dot_product_attention(core.widen_query(q, scale, width), keys, values, is_causal=True, scale=scale,
                                         enable_gqa=True)
    assert keys.shape[-1] == values.shape[-1] == width and bool((values[..., HEAD_DIM:] == 0).all())
    reference = float_mask_reference(q, k, v, bias, valid, scale)
    torch.testing.assert_close(out[1, ..., :HEAD_DIM], reference[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[0, :, 3:, :HEAD_DIM], reference[0, :, 3:], atol=1e-5, rtol=1e-5)
    assert bool(out.isfinite().all())  # padded queries too (they see only padding keys)
    # A decoding step: one query over every key, no mask.
    step = F.scaled_dot_product_attention(core.widen_query(q[:, :, -1:], scale, width), keys, values, scale=scale,
                                          enable_gqa=True)
    torch.testing.assert_close(step[..., :HEAD_DIM], reference[:, :, -1:], atol=1e-5, rtol=1e-5)
    assert core.width(HEAD_DIM, torch.device("cpu")) == HEAD_DIM + 1
    assert core.width(128, torch.device("cuda")) == 136 and core.width(64, torch.device("cuda")) == 72


class KernelCalls(TorchDispatchMode):
    """(head width, is_causal, has a mask, queries) of every SDPA CPU kernel call inside ``layers`` (the language
    model's decoder layers)."""

    def __init__(self, layers):
        super().__init__()
        self.calls, self.inside = [], 0
        self.handles = [h for layer in layers for h in (
            layer.register_forward_pre_hook(lambda *a: setattr(self, "inside", self.inside + 1)),
            layer.register_forward_hook(lambda *a: setattr(self, "inside", self.inside - 1)))]

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is SDPA_CPU and self.inside:
            causal = args[4] if len(args) > 4 else kwargs.get("is_causal", False)
            self.calls.append((args[0].shape[-1], bool(causal), kwargs.get("attn_mask") is not None, args[0].shape[-2]))
        return func(*args, **kwargs)


def both_paths(fn, layers):
    """fn() with the key column, the SDPA kernel calls its ``layers`` made, and fn() with the float mask (the
    reference)."""
    with KernelCalls(layers) as kernels:
        column = fn()
    with key_column.float_mask():
        reference = fn()
    return column, kernels.calls, reference


def assert_same(column, reference):
    """Equal logits at every real (not padding) position of a left-padded batch: (B, L, V) prefill logits (of the
    compacted sequence under Stage 3, whose real tokens per row the run's stats give) and the per-step logits of
    generate."""
    prefill, steps, tokens, lengths = column
    ref_prefill, ref_steps, ref_tokens, ref_lengths = reference
    assert lengths == ref_lengths and prefill.shape == ref_prefill.shape
    for row, n in enumerate(lengths):
        torch.testing.assert_close(prefill[row, -n:], ref_prefill[row, -n:], atol=1e-4, rtol=1e-4)
    for step, ref_step in zip(steps, ref_steps):
        torch.testing.assert_close(step, ref_step, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens) and len(steps) == 3


def assert_causal_kernels(calls):
    """Every call of the language model's layers ran widened by one channel with no mask (Stage 1 sized every
    layer's keys): SDPA's causal kernel in the prefills, one query over every key in the decoding steps."""
    assert calls and all(width == HEAD_DIM + 1 and not masked for width, _, masked, _ in calls)
    assert all(causal == (queries > 1) for _, causal, _, queries in calls)
    assert {queries for *_, queries in calls} >= {1}  # decoding steps were seen too


def llava_package_run(model, ids, mask, images):
    def run():
        with torch.no_grad():
            prefill = model(input_ids=ids, attention_mask=mask, images=images).logits
            lengths = meteor_plugin.stats(model).layer_tokens[-1]
            out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=3, do_sample=False,
                                 num_beams=1, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        return prefill, list(out.logits), out.sequences[:, -3:], lengths

    return run


@pytest.mark.skipif(not V5, reason="transformers 4.37/4.44 keep the float mask (attention computed inline)")
@pytest.mark.parametrize("stage3", [False, True])
def test_llava_package_model(tiny_llava, stage3):
    model = tiny_llava(padding_side="left")
    model.generation_config.eos_token_id = None
    ids, mask, images = make_batch([(4, 8), (2, 5)], [True, True], pad_side="left", seed=3)
    meteor_plugin.enable(encoder=True, fusion=False, llm=stage3, encoder_keep=16, llm_min_keep=4, llm_max_keep=8,
                         proportional_attention="on")
    column, calls, reference = both_paths(llava_package_run(model, ids, mask, images),
                                          model.get_model().layers)
    assert_same(column, reference)
    assert_causal_kernels(calls)


@pytest.mark.skipif(not V5, reason="transformers 4.37/4.44 keep the float mask (attention computed inline)")
@pytest.mark.parametrize("stage3", [False, True])
def test_converted_eagle(eagle, stage3):
    model = eagle(converted=True, padding_side="left")
    ids, mask, images = make_batch([(3, 5), (2, 9)], [True, True], pad_side="left", image_size=128, seed=3)
    meteor_plugin.enable(encoder=True, fusion=True, encoder_keep=0.3, fusion_keep=64, encoder_ranks=RANKS,
                         llm=stage3, llm_min_keep=16, llm_max_keep=32, llm_lambda=60.0, proportional_attention="on")
    column, calls, reference = both_paths(llava_package_run(model, ids, mask, images),
                                          model.get_model().layers)
    assert_same(column, reference)
    assert_causal_kernels(calls)


@pytest.mark.skipif(not V5, reason="transformers 4.37/4.44 keep the float mask (attention computed inline)")
@pytest.mark.parametrize("stage3", [False, True])
def test_transformers_llava(stage3):
    model = build_tiny_hf_llava()
    model.generation_config.eos_token_id = None
    ids, mask, pixels = hf_batch([(2, 5), (4, 8)], visual_tokens=64)  # left padded

    def run():
        with torch.no_grad():
            prefill = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
            lengths = meteor_plugin.stats(model).layer_tokens[-1]
            out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=3,
                                 do_sample=False, num_beams=1, output_logits=True, return_dict_in_generate=True)
        return prefill, list(out.logits), out.sequences[:, -3:], lengths

    meteor_plugin.enable(encoder=True, fusion=False, llm=stage3, encoder_keep=16, llm_min_keep=4, llm_max_keep=8,
                         proportional_attention="on")
    column, calls, reference = both_paths(run, hf_language_layers(model))
    assert_same(column, reference)
    assert_causal_kernels(calls)


@pytest.mark.skipif(not V5, reason="the key column runs on transformers 5")
def test_a_layer_whose_attention_skips_the_interface_is_refused():
    column = key_column.KeyColumn(torch.zeros(1, 3), None)
    with pytest.raises(RuntimeError, match="did not go through transformers' AttentionInterface"):
        with key_column.active(column):
            pass  # no attention ran: the sizes and padding were not applied
