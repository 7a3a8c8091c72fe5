"""LLaVA-1.6 in the llava package: anyres images with spatial merges (base image + crops, unpad, newlines).

Stage 1 prunes inside CLIP on the base image and every crop, and upstream's grid merge still runs; the
row separators are never pruned; stats say what came from the base image and from the crops.
"""

import pytest
import torch

import meteor_plugin
from meteor_plugin.adapters.shared import anyres
from meteor_plugin.testing.llava import make_batch

PATCHES = 64  # per CLIP input of the tiny LLaVA
SIZES = [(64, 48), (30, 60), (64, 64)]  # (width, height): 2x2 crops unpadded, 1x2 crops, 2x2 crops


def anyres_batch(lengths, seed=0, pad_side="left"):
    """input_ids, mask, 5-D images (base + 4 crops each; a 1x2 grid uses the first 2 crops) and sizes."""
    ids, mask, _ = make_batch(lengths, [True] * len(lengths), pad_side=pad_side, seed=seed)
    images = torch.randn(len(lengths), 5, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return ids, mask, images, SIZES[:len(lengths)]


def as_list(images, sizes):
    """The list form upstream also takes: each image only its own crops (2x2 grid: 5 inputs, 1x2: 3)."""
    from llava.mm_utils import get_anyres_image_grid_shape

    out = []
    for image, size in zip(images, sizes):
        w, h = get_anyres_image_grid_shape(size, [[32, 64], [64, 32], [64, 64]], 32)
        out.append(image[:1 + w * h])
    return out


def run(model, ids, mask, images, sizes):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, images=images, image_sizes=sizes).logits


def newline_count(model, ids, mask, images, sizes):
    """Row separators in the unpruned splice (one per row of the unpadded crop map)."""
    out = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, images, sizes)
    return int(anyres.newline_rows(model, out[4]).sum())


@pytest.mark.parametrize("merge", ["spatial_unpad", "spatial"])
def test_pruning_off_matches_unpatched(tiny_llava, merge):
    model = tiny_llava(merge=merge)
    ids, mask, images, sizes = anyres_batch([(3, 7)], pad_side="right")
    images = as_list(images, sizes)
    reference = run(model, ids, mask, images, sizes)
    meteor_plugin.enable(encoder=False, fusion=False, llm=False)
    assert torch.equal(run(model, ids, mask, images, sizes), reference)


def test_default_config_runs_keeps_every_row_separator_and_counts_base_and_crops(tiny_llava):
    model = tiny_llava(merge="spatial_unpad")
    ids, mask, images, sizes = anyres_batch([(3, 7)])
    images = as_list(images, sizes)
    rows = newline_count(model, ids, mask, images, sizes)
    assert rows > 0
    cfg = meteor_plugin.enable()  # the default config: Stage 1 (which upstream's assert stopped) and Stage 3
    seen = {}
    handles = [layer.self_attn.k_proj.register_forward_hook(
        lambda mod, inp, out, i=i: seen.setdefault(i, []).append(inp[0].shape[1]))
        for i, layer in enumerate(model.model.layers)]
    try:
        run(model, ids, mask, images, sizes)
    finally:
        for h in handles:
            h.remove()
    stats = meteor_plugin.stats(model).stages[0]
    text = ids.shape[1] - 1
    encoder, layout, llm = stats["encoder"], stats["anyres"], stats["llm"]
    assert (encoder.entered, encoder.left) == (5 * PATCHES, 5 * int(cfg.encoder_keep * PATCHES))
    # the base image's kept patches all reach the LLM; the crops' lose their padding rows to unpad
    assert layout.detail["base"] == int(cfg.encoder_keep * PATCHES)
    assert 0 < layout.detail["crops"] <= 4 * int(cfg.encoder_keep * PATCHES)
    assert layout.detail["newlines"] == rows and llm.entered == layout.left
    # every layer from llm_layer on runs on the text, Stage 3's kept tokens and every row separator
    last = len(model.model.layers) - 1
    assert seen[0] == [text + layout.left + rows]
    assert seen[last] == [text + llm.left + rows] and llm.left < llm.entered


def test_stage3_alone_never_prunes_a_row_separator(tiny_llava):
    model = tiny_llava(merge="spatial_unpad")
    ids, mask, images, sizes = anyres_batch([(3, 7)])
    images = as_list(images, sizes)
    rows = newline_count(model, ids, mask, images, sizes)
    meteor_plugin.enable(encoder=False, fusion=False, llm=True, llm_min_keep=4, llm_max_keep=4)
    captured = []
    handle = model.model.layers[-1].register_forward_pre_hook(lambda mod, args, kwargs: captured.append(
        kwargs.get("hidden_states", args[0] if args else None)), with_kwargs=True)
    try:
        run(model, ids, mask, images, sizes)
    finally:
        handle.remove()
    stats = meteor_plugin.stats(model).stages[0]
    assert stats["llm"].left == 4 and stats["anyres"].detail["newlines"] == rows
    assert captured[0].shape[1] == ids.shape[1] - 1 + 4 + rows


def test_batch_generate_equals_each_sample_alone(tiny_llava):
    model = tiny_llava(merge="spatial_unpad", padding_side="left")
    ids, mask, images, sizes = anyres_batch([(3, 4), (5, 9), (2, 6)], seed=4)
    images = as_list(images, sizes)
    meteor_plugin.enable(llm_lambda=40.0, llm_min_keep=8, llm_max_keep=0.5)
    steps = 4
    batch = greedy_generate_sized(model, ids, mask, images, sizes, steps)
    kept = [s["llm"].left for s in meteor_plugin.stats(model).stages]
    for i in range(3):
        row = ids[i][mask[i].bool()].unsqueeze(0)
        alone = greedy_generate_sized(model, row, torch.ones_like(row), images[i:i + 1], sizes[i:i + 1], steps)
        assert torch.equal(batch[i:i + 1], alone), f"sample {i}"
        assert meteor_plugin.stats(model).stages[0]["llm"].left == kept[i]


def test_cached_generate_equals_greedy_without_cache(tiny_llava):
    model = tiny_llava(merge="spatial_unpad", padding_side="left")
    ids, mask, images, sizes = anyres_batch([(4, 8), (2, 5)], seed=3)
    images = as_list(images, sizes)
    meteor_plugin.enable(llm_min_keep=12, llm_max_keep=20, llm_lambda=30.0)
    cached = greedy_generate_sized(model, ids, mask, images, sizes, 5)
    reference = greedy_without_cache_sized(model, ids, mask, images, sizes, 5)
    assert torch.equal(cached, reference)


@pytest.mark.parametrize("method", ["random", "avgpool", "visionzip"])
def test_pre_llm_baselines_keep_fusion_keep_of_every_clip_input_and_every_row_separator(tiny_llava, method):
    """The baselines keep ``fusion_keep`` of the base image's and each crop's tokens, at their patches, so upstream's
    merge (unpad, row separators) runs on them as on Stage 1's."""
    model = tiny_llava(merge="spatial_unpad")
    ids, mask, images, sizes = anyres_batch([(2, 3)])
    images = as_list(images, sizes)
    rows = newline_count(model, ids, mask, images, sizes)
    meteor_plugin.enable(method=method, encoder=True, fusion=True, llm=False, fusion_keep=0.25)
    seen = {}
    handle = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda mod, args, kwargs: seen.update({0: kwargs.get("hidden_states", args[0] if args else None)}),
        with_kwargs=True)
    try:
        run(model, ids, mask, images, sizes)
    finally:
        handle.remove()
    stats = meteor_plugin.stats(model).stages[0]
    baseline, layout = stats["baseline"], stats["anyres"]
    assert (baseline.entered, baseline.left) == (5 * PATCHES, 5 * PATCHES // 4) and "encoder" not in stats
    assert layout.detail["base"] == PATCHES // 4 and 0 < layout.detail["crops"] <= 4 * PATCHES // 4
    assert layout.detail["newlines"] == rows
    assert seen[0].shape[1] == ids.shape[1] - 1 + layout.left + rows


def test_drop_pruned_rows_repads_embeddings_masks_labels_and_positions():
    class Config:
        tokenizer_padding_side = "left"

    class Model:
        config = Config()

    nan = float("nan")
    embeds = torch.tensor([[[0., 0.], [1., 1.], [nan, nan], [2., 2.]],
                           [[3., 3.], [nan, nan], [nan, nan], [4., 4.]]])
    mask = torch.ones(2, 4, dtype=torch.bool)
    labels = torch.tensor([[-100, 5, -100, 6], [7, -100, -100, 8]])
    positions = torch.arange(4).expand(2, 4)
    out, removed = anyres.drop_pruned_rows(Model(), (None, positions, mask, None, embeds, labels))
    assert removed == 3
    _, pos, mask2, _, emb, lab = out
    assert emb.shape == (2, 3, 2)
    assert torch.equal(emb[0], torch.tensor([[0., 0.], [1., 1.], [2., 2.]]))
    assert torch.equal(emb[1, 1:], torch.tensor([[3., 3.], [4., 4.]])) and mask2.tolist() == [[True] * 3, [False, True, True]]
    assert lab.tolist() == [[-100, 5, 6], [-100, 7, 8]] and pos.tolist() == [[0, 1, 2], [0, 0, 1]]
    partly = embeds.clone()
    partly[0, 2, 1] = 0.0  # a row only partly NaN is a real NaN, not a pruned patch: kept
    assert anyres.drop_pruned_rows(Model(), (None, None, mask, None, partly, None))[1] == 2


def greedy_generate_sized(model, ids, mask, images, sizes, steps):
    model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images, image_sizes=sizes, max_new_tokens=steps,
                             do_sample=False, num_beams=1, use_cache=True, pad_token_id=0)
    return out[:, -steps:]


def greedy_without_cache_sized(model, ids, mask, images, sizes, steps):
    prompt = ids.shape[1]
    for _ in range(steps):
        labels = torch.full_like(ids, -100)
        labels[:, prompt:] = ids[:, prompt:]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, images=images, image_sizes=sizes, labels=labels,
                           use_cache=False).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids[:, prompt:]


def test_proportional_attention_on_spatial_merges_is_refused_under_on_and_off_under_auto(tiny_llava):
    model = tiny_llava(merge="spatial_unpad")
    ids, mask, images, sizes = anyres_batch([(2, 5)])
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=16, proportional_attention="on")
    with pytest.raises(NotImplementedError, match="proportional_attention='on' does not run on LLaVA-1.6's spatial"):
        run(model, ids, mask, images, sizes)
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=16, proportional_attention="off")
    reference = run(model, ids, mask, images, sizes)
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=16)
    with pytest.warns(UserWarning, match="proportional attention is off for this model: it does not run on LLaVA"):
        torch.testing.assert_close(run(model, ids, mask, images, sizes), reference, atol=0, rtol=0)
    # Stage 3 alone runs with it there: with nothing pruned it is the unpruned model, and generate continues the
    # sizes Stage 3 handed out.
    model = tiny_llava(merge="spatial_unpad", padding_side="left")
    ids, mask, images, sizes = anyres_batch([(4, 8), (2, 5)], seed=3)
    images = as_list(images, sizes)
    stage3 = dict(encoder=False, fusion=False, llm=True, proportional_attention="on")
    meteor_plugin.enable(encoder=False, fusion=False, llm=False)
    reference = run(model, ids, mask, images, sizes)
    meteor_plugin.enable(**stage3, llm_min_keep=1.0, llm_max_keep=1.0)
    # left padded: the last 5 positions are real text in both rows (the padded ones' positions differ, harmlessly)
    torch.testing.assert_close(run(model, ids, mask, images, sizes)[:, -5:], reference[:, -5:], atol=1e-4, rtol=1e-4)
    meteor_plugin.enable(**stage3, llm_min_keep=12, llm_max_keep=20, llm_lambda=30.0)
    sized = run(model, ids, mask, images, sizes)
    assert torch.equal(greedy_generate_sized(model, ids, mask, images, sizes, 4),
                       greedy_without_cache_sized(model, ids, mask, images, sizes, 4))
    meteor_plugin.enable(**{**stage3, "proportional_attention": "off"}, llm_min_keep=12, llm_max_keep=20,
                         llm_lambda=30.0)
    assert not torch.allclose(run(model, ids, mask, images, sizes), sized, atol=1e-3)  # the sizes are used
