"""``proportional_attention``: kept visual tokens keep their unpruned positions and attend with their size."""

import math

import pytest
import torch
import torch.nn.functional as F

import meteor_plugin
from meteor_plugin.stages.vision import ImageTokens
from meteor_plugin.compat import transformers as compat
from meteor_plugin.core.token_sizes import kept_sizes
from meteor_plugin.stages.layout import unpruned_geometry
from meteor_plugin.testing.llava import make_batch
from tests.stages.test_decoder_llava import greedy_without_cache
from tests.adapters.eagle.test_stages import RANKS, batch, forward

PRUNED = dict(encoder=True, fusion=True, encoder_keep=0.3, fusion_keep=256, encoder_ranks=RANKS,
              proportional_attention="on")


def test_a_dropped_token_adds_its_size_to_the_kept_token_most_like_it():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.05], [0.05, 1.0], [0.7, 0.7]]])
    sizes = kept_sizes(x, torch.tensor([[0, 1]]))
    assert sizes.tolist() == [[3.0, 2.0]]  # (0.7, 0.7) is a tie: the lower slot wins, deterministically
    assert kept_sizes(x, torch.tensor([[0, 1]]), torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]])).sum() == 15.0
    # Within its own group while that group keeps a token: token 2 goes to token 1, not to its twin 0.
    group = torch.tensor([0, 1, 1, 1, 1])
    assert kept_sizes(x, torch.tensor([[0, 1]]), group=group).tolist() == [[1.0, 4.0]]
    # A group that keeps nothing gives its tokens to the closest kept token of any group.
    assert kept_sizes(x, torch.tensor([[1, 3]]), group=torch.tensor([0, 1, 0, 1, 1])).tolist() == [[1.0, 4.0]]


def test_only_valid_tokens_give_or_take_size_and_a_row_that_keeps_none_is_left_alone():
    from meteor_plugin.core.token_sizes import absorbed_sizes

    x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [1.0, 0.0]]]).repeat(2, 1, 1)
    keep = torch.tensor([[False, True, True, False], [False, False, False, True]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, False]])  # token 3: text, say
    sizes = torch.tensor([[2.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    out = absorbed_sizes(x, keep, sizes, valid=valid)
    assert out[0].tolist() == [0.0, 3.0, 1.0, 1.0]  # token 0 goes to 1, never to the invalid twin 3
    assert out[1].tolist() == [1.0, 1.0, 1.0, 1.0]  # no valid token kept: nothing moves


def test_positions_skip_what_was_pruned_and_the_bias_is_the_log_size():
    # Row 0: left padding (2), 2 text tokens, an image of 8 tokens that kept 3, 2 text tokens.
    # Row 1: no padding, 1 text token, image of 8 that kept 3 at the end... then 5 text tokens.
    visual = torch.zeros(2, 9, dtype=torch.bool)
    visual[0, 4:7] = True
    visual[1, 1:4] = True
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[0, :2] = False
    images = [ImageTokens(torch.tensor([1, 4, 6]), torch.tensor([2.0, 4.0, 2.0]), 8),
              ImageTokens(torch.tensor([0, 1, 7]), torch.tensor([1.0, 6.0, 1.0]), 8)]
    positions, bias = unpruned_geometry(visual, valid, [0, 1], images)
    assert positions[0, 2:].tolist() == [0, 1, 2 + 1, 2 + 4, 2 + 6, 10, 11]
    assert positions[1].tolist() == [0, 1 + 0, 1 + 1, 1 + 7, 9, 10, 11, 12, 13]
    assert torch.allclose(bias[0, 4:7], torch.tensor([2.0, 4.0, 2.0]).log())
    assert bias[1, 1:4].tolist() == pytest.approx([0.0, math.log(6.0), 0.0])
    assert bias[0, :4].abs().sum() == 0 and bias[1, 4:].abs().sum() == 0
    with pytest.raises(RuntimeError, match="2 images were encoded but 1 spliced"):
        unpruned_geometry(visual, valid, [0], images)


def test_a_size_bias_attends_like_copies_of_the_key():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    valid = torch.ones(1, 4, dtype=torch.bool)
    bias = torch.tensor([[0.0, math.log(3.0), 0.0, 0.0]])
    mask = compat.build_mask(compat.MASK_BOOL, valid[:, -1:], valid, torch.float32, bias)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    copies = [0, 1, 1, 1, 2, 3]  # key 1 three times
    reference = F.scaled_dot_product_attention(q, k[:, :, copies], v[:, :, copies])
    torch.testing.assert_close(out, reference)
    with pytest.raises(NotImplementedError, match="proportional attention adds a bias.*FlashAttention-2"):
        compat.build_mask(compat.MASK_2D, valid, valid, torch.float32, bias)


@pytest.mark.parametrize("pad", ["left", "right"])
def test_with_nothing_pruned_it_is_the_unpruned_model(eagle, pad):
    model = eagle(converted=True, padding_side=pad)
    ids, mask, images = batch(pad=pad)
    meteor_plugin.enable(encoder=False, fusion=False, llm=False, proportional_attention="off")
    reference = forward(model, ids, mask, images)
    meteor_plugin.enable(encoder=False, fusion=False, llm=False, proportional_attention="on")
    assert_close_but_padding(forward(model, ids, mask, images), reference, mask, pad)


def assert_close_but_padding(out, reference, mask, pad):
    """Equal logits wherever a row is not padding (a padded query's row of the mask is its own business)."""
    visual = reference.shape[1] - (mask.shape[1] - 1)  # one image per row
    for row, length in enumerate((mask.sum(dim=1) - 1 + visual).tolist()):
        span = slice(reference.shape[1] - length, None) if pad == "left" else slice(0, length)
        torch.testing.assert_close(out[row, span], reference[row, span], atol=1e-5, rtol=1e-5)


def test_each_kept_token_sits_where_it_sat_unpruned(eagle):
    model = eagle(converted=True)
    ids, mask, images = batch()
    seen = []
    first = model.get_model().layers[0]  # every transformers version hands the decoder layers position_ids
    handle = first.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["position_ids"].clone()),
                                             with_kwargs=True)
    meteor_plugin.enable(**PRUNED, llm=False)
    with_sizes = forward(model, ids, mask, images)
    handle.remove()
    positions = seen[-1]
    names = ["clip-448", "convnext-1024", "sam-1024", "pix2struct-1024"]
    offsets = dict(zip(names, [0, 576, 1600, 2624]))  # the stand-in's tokens per encoder: 576, 1024, 1024, 1024
    for row, sample in enumerate(meteor_plugin.stats(model).stages):
        kept = sample["encoder"].detail["positions"]
        everywhere = [offsets[n] + p for n in names if n in kept for p in kept[n]]
        after_stage2 = [everywhere[j] for j in sample["fusion"].detail["kept"]]
        text_before = int((ids[row] == -200).nonzero()) if (ids[row] == -200).any() else None
        assert positions[row, text_before:text_before + 256].tolist() == [text_before + p for p in after_stage2]
        assert positions[row, text_before + 256].item() == text_before + 3648  # the text goes on after all of them
    meteor_plugin.enable(**{**PRUNED, "proportional_attention": "off"}, llm=False)
    assert not torch.allclose(forward(model, ids, mask, images), with_sizes, atol=1e-3)


@pytest.mark.parametrize("llm", [False, True])
def test_generate_continues_from_the_unpruned_positions_with_the_sizes(eagle, llm):
    model = eagle(converted=True, padding_side="left")
    ids, mask, images = batch(pad="left", seed=3)
    meteor_plugin.enable(**PRUNED, llm=llm, llm_min_keep=16, llm_max_keep=64, llm_lambda=60.0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=4, do_sample=False)
    # Each full forward of the reference computes the positions and sizes afresh for the whole sequence.
    assert torch.equal(out[:, -4:], greedy_without_cache(model, ids, mask, images, 4))


def test_llava_stage_1_keeps_positions_and_sizes(tiny_llava):
    model = tiny_llava()
    ids, mask, images = make_batch([(3, 5), (2, 7)], [True, True], seed=2)
    meteor_plugin.enable(encoder=False, fusion=False, llm=False)
    reference = forward(model, ids, mask, images)
    meteor_plugin.enable(encoder=True, fusion=False, llm=False, encoder_keep=1.0, proportional_attention="on")
    assert_close_but_padding(forward(model, ids, mask, images), reference, mask, "right")
    model = tiny_llava(padding_side="left")  # batched generate re-pads on the left
    ids, mask, images = make_batch([(4, 8), (2, 5)], [True, True], pad_side="left", seed=3)
    meteor_plugin.enable(encoder=True, fusion=False, llm=True, encoder_keep=16, llm_min_keep=4, llm_max_keep=8,
                         proportional_attention="on")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, -3:], greedy_without_cache(model, ids, mask, images, 3))


def test_on_refuses_what_it_cannot_run_on_and_auto_runs_without_it_with_a_warning(eagle):
    ids, mask, images = batch()
    meteor_plugin.enable(method="avgpool", encoder=False, fusion=False, llm=False, fusion_keep=64,
                         proportional_attention="on")
    with pytest.raises(NotImplementedError, match="avgpool.*means over grid cells"):
        forward(eagle(converted=True), ids, mask, images)
    meteor_plugin.enable(method="random", encoder=False, fusion=False, llm=False, fusion_keep=64)
    plain = forward(eagle(converted=True), ids, mask, images)  # "auto": baselines run as their papers do, silently
    meteor_plugin.enable(method="random", encoder=False, fusion=False, llm=False, fusion_keep=64,
                         proportional_attention="on")  # asked: the same draw, at its places and sizes
    assert (forward(eagle(converted=True), ids, mask, images) - plain).abs().max() > 1e-4
    fastv = dict(method="fastv", encoder=False, fusion=False, llm=True, llm_max_keep=64)
    model = eagle(converted=True)
    meteor_plugin.enable(**fastv, proportional_attention="off")
    reference = forward(model, ids, mask, images)
    meteor_plugin.enable(**fastv)  # FastV too under "auto": the same tokens and logits as without it
    torch.testing.assert_close(forward(model, ids, mask, images), reference, atol=0, rtol=0)
    meteor_plugin.enable(**fastv, proportional_attention="on")  # asked: FastV runs it as Stage 3 does
    assert (forward(model, ids, mask, images) - reference).abs().max() > 1e-4
    unconverted = eagle()
    meteor_plugin.enable(encoder=True, fusion=True, llm=False, proportional_attention="on")
    with pytest.raises(NotImplementedError, match="proportional_attention='on' needs the tokens each encoder keeps"):
        forward(unconverted, ids, mask, images)
    meteor_plugin.enable(encoder=True, fusion=True, llm=False, proportional_attention="off")
    reference = forward(unconverted, ids, mask, images)
    meteor_plugin.enable(encoder=True, fusion=True, llm=False, proportional_attention="auto")
    with pytest.warns(UserWarning, match="proportional attention is off for this model: it needs the tokens"):
        torch.testing.assert_close(forward(unconverted, ids, mask, images), reference, atol=0, rtol=0)


@pytest.mark.parametrize("setting", ["on", "auto"])
def test_flash_attention_runs_it_through_the_key_column_and_4x_refuses_on_and_drops_it_under_auto(eagle, setting):
    """transformers 5: FlashAttention-2 takes the sizes in the key column (no warning, the layout kept; the kernel
    itself is checked in tests/stages/test_decoder_flash.py). 4.37/4.44 compute attention inline: a float mask
    FlashAttention-2 cannot take, so "on" refuses and "auto" runs without it, with a warning."""
    import warnings
    from meteor_plugin.registry import REGISTRY
    from meteor_plugin.stages.decoder import DecoderPruner
    from meteor_plugin.stages.layout import VisualLayout
    from meteor_plugin.stats import RunStats

    model = eagle(converted=True)
    llm = model.get_model()
    llm.config._attn_implementation = "flash_attention_2"  # only the decision is checked: no kernel runs
    visual = torch.zeros(1, 6, dtype=torch.bool)
    visual[0, 2:4] = True
    valid = torch.ones(1, 6, dtype=torch.bool)
    layout = VisualLayout(visual, valid.clone(), valid, RunStats(1), positions=torch.tensor([[0, 1, 2, 5, 8, 9]]),
                          key_bias=torch.zeros(1, 6))
    cfg = meteor_plugin.MeteorConfig(llm=False, proportional_attention=setting)
    pruner = DecoderPruner.attach(llm, REGISTRY)
    with meteor_plugin.percall.new_call():
        if compat.generation() == "5":
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                pruner.begin(cfg, layout, 1, 6, None, None, torch.device("cpu"))
            assert layout.positions is not None and pruner.prefix is not None
            return
        if setting == "on":
            with pytest.raises(NotImplementedError, match="FlashAttention-2 cannot take"):
                pruner.begin(cfg, layout, 1, 6, None, None, torch.device("cpu"))
            return
        with pytest.warns(UserWarning, match="FlashAttention-2 cannot take"):
            pruner.begin(cfg, layout, 1, 6, None, None, torch.device("cpu"))
    assert layout.positions is None and layout.key_bias is None and pruner.prefix is None


def test_decoding_by_hand_after_a_proportional_prefill_is_refused(eagle):
    model = eagle(converted=True)
    ids, mask, images = batch(n=1)
    meteor_plugin.enable(**PRUNED, llm=False)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, images=images, use_cache=True)
        if isinstance(out.past_key_values, (tuple, list)):
            pytest.skip("this transformers returns legacy tuple caches, which cannot carry the mark (documented)")
        step = out.logits[:, -1:].argmax(-1)
        grown = torch.cat([torch.ones(1, out.logits.shape[1], dtype=mask.dtype), torch.ones_like(step)], dim=1)
        with pytest.raises(NotImplementedError, match="proportional attention.*outside the generate call"):
            model(input_ids=step, attention_mask=grown, past_key_values=out.past_key_values, use_cache=True)


def test_stage_3_hands_a_dropped_token_s_size_to_the_kept_token_most_like_it():
    from meteor_plugin.stages.decoder import _absorbed_bias

    states = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [1.0, 0.1], [0.1, 1.0], [0.0, 1.0]]])  # text, 3 visual, text
    visual = torch.tensor([[False, True, True, True, False]])
    kept = torch.tensor([[False, True, False, True, False]])
    bias = torch.tensor([[0.0, math.log(2.0), math.log(3.0), 0.0, 0.0]])  # sizes 2, 3, 1 from Stages 1-2
    out = _absorbed_bias(bias, states, visual, kept)
    assert out[0].tolist() == pytest.approx([0.0, math.log(5.0), 0.0, 0.0, 0.0])  # the text is never a target


def test_stage_3_alone_on_llava_starts_every_token_at_size_1(tiny_llava):
    model = tiny_llava(padding_side="left")
    model.generation_config.eos_token_id = None  # the reference below never stops
    ids, mask, images = make_batch([(4, 8), (2, 5)], [True, True], pad_side="left", seed=3)
    stage3 = dict(encoder=False, fusion=False, llm=True, llm_min_keep=1.0, llm_max_keep=1.0)  # keeps them all
    meteor_plugin.enable(**stage3, proportional_attention="off")
    reference = forward(model, ids, mask, images)
    meteor_plugin.enable(**stage3, proportional_attention="on")
    assert_close_but_padding(forward(model, ids, mask, images), reference, mask, "left")
    few = {**stage3, "llm_min_keep": 4, "llm_max_keep": 8}
    meteor_plugin.enable(**few, proportional_attention="on")
    sized = forward(model, ids, mask, images)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=3, do_sample=False)
    assert torch.equal(out[:, -3:], greedy_without_cache(model, ids, mask, images, 3))
    meteor_plugin.enable(**few, proportional_attention="off")
    compact = forward(model, ids, mask, images)
    assert not torch.allclose(compact[:, -1], sized[:, -1], atol=1e-4)  # the dropped tokens' sizes moved


def test_image_tokens_with_a_leading_cls_put_it_first_with_size_1():
    (image,) = ImageTokens.batch(torch.tensor([[0, 3]]), torch.tensor([[2.0, 2.0]]), 4, leading_cls=True)
    assert image.positions.tolist() == [0, 1, 4] and image.sizes.tolist() == [1.0, 2.0, 2.0] and image.total == 5
    (plain,) = ImageTokens.batch(torch.tensor([[0, 3]]), torch.tensor([[2.0, 2.0]]), 4)
    assert plain.positions.tolist() == [0, 3] and plain.total == 4
