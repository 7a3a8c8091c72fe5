"""Stage 3 with a FlashAttention-style implementation (2-D padding mask, no attention weights).

flash_attn needs a GPU, so a CPU function with FlashAttention-2's varlen semantics (unpad by the 2-D
mask, causal aligned bottom-right) is registered under a new name with transformers 5's attention and
mask registries; the plugin treats it as FlashAttention because its mask builder is FA2's.
"""

import pytest
import torch

import meteor_plugin
from meteor_plugin.compat.transformers import generation

if generation() == "5":
    from transformers import AttentionInterface
from meteor_plugin.testing.llava import make_batch

pytestmark = pytest.mark.skipif(
    generation() != "5",
    reason="transformers 4.x picks FlashAttention classes at model init and needs the flash_attn package (GPU)",
)
NAME = "meteor_cpu_varlen"  # no "flash" in the name: transformers would try to import flash_attn


def cpu_flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    b, h, lq, d = query.shape
    lk = key.shape[2]
    rep = h // key.shape[1]
    key = key.repeat_interleave(rep, dim=1)
    value = value.repeat_interleave(rep, dim=1)
    kmask = attention_mask.bool() if attention_mask is not None else torch.ones(b, lk, dtype=torch.bool)
    qmask = kmask[:, -lq:] if lq > 1 else torch.ones(b, 1, dtype=torch.bool)
    out = torch.zeros(b, lq, h, d, dtype=query.dtype)
    scale = scaling if scaling is not None else d ** -0.5
    for i in range(b):
        kv = kmask[i].nonzero().flatten()
        qv = qmask[i].nonzero().flatten()
        nq, nk = len(qv), len(kv)
        scores = query[i][:, qv] @ key[i][:, kv].transpose(-1, -2) * scale
        allowed = torch.arange(nk)[None, :] <= (nk - nq + torch.arange(nq))[:, None]
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[i, qv] = (probs @ value[i][:, kv]).transpose(0, 1)
    return out, None


@pytest.fixture
def flash_registered():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(NAME, cpu_flash_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, flash_attention_mask)
    yield NAME


@pytest.mark.parametrize("proportional", ["off", "on"])
def test_flash_style_attention_matches_sdpa_with_pruning(tiny_llava, flash_registered, proportional, monkeypatch):
    """With proportional attention, both run it through the key column (FlashAttention with its 2-D padding mask,
    SDPA with none); Stage 1 sizes the keys of every layer."""
    ids, mask, images = make_batch([(3, 5), (2, 10)], [True, True], pad_side="left", seed=29)
    widths_seen = []
    monkeypatch.setitem(AttentionInterface._global_mapping, NAME,
                        lambda module, query, *a, **k: widths_seen.append(query.shape[-1]) or
                        cpu_flash_attention(module, query, *a, **k))
    results = {}
    for impl in ("sdpa", flash_registered):
        model = tiny_llava(attn_implementation=impl, padding_side="left")
        model.generation_config.eos_token_id = None
        meteor_plugin.enable(encoder=proportional == "on", encoder_keep=16, fusion=False, llm=True, llm_lambda=30.0,
                             llm_min_keep=6, llm_max_keep=10 if proportional == "on" else 30,
                             proportional_attention=proportional)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, images=images, position_ids=ids.clone()).logits
            run = meteor_plugin.stats(model)
            tokens = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=5, do_sample=False)
        results[impl] = (logits, [s["llm"].detail["kept"] for s in run.stages], run.layer_tokens[-1], tokens)
        meteor_plugin.disable()
    (ref_logits, ref_kept, widths, ref_tokens) = results["sdpa"]
    (logits, kept, _, tokens) = results[flash_registered]
    assert kept == ref_kept and all(len(k) < (16 if proportional == "on" else 64) for k in kept)
    for i, n in enumerate(widths):
        torch.testing.assert_close(logits[i, -n:], ref_logits[i, -n:], atol=1e-5, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)
    assert set(widths_seen) == ({16 + 1} if proportional == "on" else {16})  # the column reached the kernel
