"""The EAGLE stand-in (meteor_plugin/testing/eagle_like) behaves like EAGLE where the plugin hooks in.

Expected numbers are those of the default TinyEagleSpec (see eagle/model/multimodal_encoder/tiny_configs.py)
and of EAGLE's fusion tower as notes/llava-eagle-anatomy.md section 1.2 describes it.
"""

import math
import os
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from meteor_plugin.testing import eagle_like
from meteor_plugin.testing.eagle_like import TinyEagleSpec, build_tiny_eagle, install, save_tiny_eagle
from meteor_plugin.testing.llava import make_batch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
install()

from eagle.model.language_model.eagle_llama import EagleConfig, EagleLlamaForCausalLM, EagleLlamaModel  # noqa: E402
from eagle.model.multimodal_encoder.hr_clip_encoder import clip_body  # noqa: E402

IMAGE = 128  # the default fusion input size (EAGLE: 1024)
GRID = 32
# Tower class -> (input size, native output shape without the batch), default spec.
NATIVE = {
    "HRCLIPVisionTower": (96, (576, 32)),  # 24x24 patch tokens, CLS dropped
    "ConvNextVisionTower": (128, (1024, 48)),  # last stage map, already 32x32
    "SAMVisionTower": (128, (64, GRID, GRID)),  # 64x64 grid, neck 16 ch, pixel_unshuffle(2)
    "Pix2StructLargeVisionTower": (128, (24, GRID, GRID)),  # 22x22 patches interpolated inside the tower
}
ORDER = ["HRCLIPVisionTower", "ConvNextVisionTower", "SAMVisionTower", "Pix2StructLargeVisionTower"]


@pytest.fixture(scope="module")
def model():
    return build_tiny_eagle()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1))


def batch(pad_side="right"):
    ids, mask, _ = make_batch([(3, 5), (2, 9)], [True, True], pad_side=pad_side, image_size=IMAGE)
    return ids, mask


def resize(x, size):
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


def to_grid(feature):
    """EAGLE's per-tower post-processing, written from the anatomy note: -> (B, 1024, C)."""
    if feature.dim() == 3:
        b, n, c = feature.shape
        if n == GRID * GRID:
            return feature
        side = math.isqrt(n)
        feature = feature.transpose(1, 2).reshape(b, c, side, side)
    if feature.shape[-1] != GRID:
        feature = F.interpolate(feature, size=(GRID, GRID), mode="bilinear", align_corners=True)
    return feature.flatten(2, 3).transpose(1, 2)


# install() and the package layout ----------------------------------------------------------------------
def test_install_is_idempotent_and_makes_eagle_importable():
    first, second = install(), install()
    assert first == second == eagle_like.ROOT
    assert sum(os.path.realpath(p) == os.path.realpath(eagle_like.ROOT) for p in sys.path if p) == 1
    import eagle

    assert os.path.realpath(eagle.__file__).startswith(os.path.realpath(eagle_like.ROOT))
    from meteor_plugin.adapters.eagle import TARGET

    assert TARGET.is_installed()
    assert TARGET.classes() == (EagleLlamaForCausalLM, EagleLlamaModel)


def test_install_refuses_a_different_eagle(tmp_path, monkeypatch):
    other = tmp_path / "eagle"
    other.mkdir()
    (other / "__init__.py").write_text("")
    # A different eagle already imported ...
    fake = types.ModuleType("eagle")
    fake.__path__ = [str(other)]
    monkeypatch.setitem(sys.modules, "eagle", fake)
    with pytest.raises(eagle_like.EagleConflictError, match="different 'eagle'"):
        install()
    # ... or first on the path.
    monkeypatch.delitem(sys.modules, "eagle")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(eagle_like.EagleConflictError, match="different 'eagle'"):
        install()


def test_wrapper_classes_match_eagle():
    from transformers import AutoConfig, LlamaModel

    assert EagleConfig.model_type == "eagle_llama"
    assert isinstance(AutoConfig.for_model("eagle_llama"), EagleConfig)
    assert "forward" not in EagleLlamaModel.__dict__  # Stage 3 patches LlamaModel.forward through it
    assert EagleLlamaModel.forward is LlamaModel.forward
    from llava.model.llava_arch import LlavaMetaForCausalLM

    assert not issubclass(EagleLlamaForCausalLM, LlavaMetaForCausalLM)  # own attributes, as EAGLE's copy


# The towers --------------------------------------------------------------------------------------------------
def test_towers_in_string_order_with_their_native_shapes(model, images):
    vt = model.get_vision_tower()
    assert [type(t).__name__ for t in vt.vision_towers] == ORDER
    for tower in vt.vision_towers:
        size, shape = NATIVE[type(tower).__name__]
        assert tower.input_image_size == size and tower.is_loaded
        with torch.no_grad():
            out = tower(resize(images, size))
        assert tuple(out.shape) == (2,) + shape, type(tower).__name__
        assert tuple(to_grid(out).shape) == (2, GRID * GRID, tower.hidden_size)
        assert torch.isfinite(out).all() and out.std() > 1e-3


def test_fused_features_are_the_towers_side_by_side(model, images):
    vt = model.get_vision_tower()
    with torch.no_grad():
        fused = vt(images)
        parts = [to_grid(t(resize(images, t.input_image_size))) for t in vt.vision_towers]
    assert vt.num_tokens == GRID * GRID and vt.input_image_size == IMAGE
    assert [t.hidden_size for t in vt.vision_towers] == [32, 48, 64, 24]
    assert vt.hidden_size == 168 == model.config.mm_hidden_size == TinyEagleSpec().mm_hidden_size
    assert fused.shape == (2, 1024, 168)
    start = 0
    for part in parts:
        torch.testing.assert_close(fused[..., start:start + part.shape[-1]], part, rtol=1e-5, atol=1e-5)
        start += part.shape[-1]


def test_fusion_tower_keeps_eagles_fragile_spots(model, images, monkeypatch):
    vt = model.get_vision_tower()
    for name in ("dtype", "device", "dummy_feature"):
        with pytest.raises(AttributeError):
            getattr(vt, name)
    assert vt.config is None and not hasattr(vt, "num_patches_per_side")
    clip = vt.vision_towers[0]
    assert "forward" in clip_body(clip.vision_tower).embeddings.__dict__  # instance-level, shadows class patches
    # A pruned encoder output of 400 tokens is silently read as a 20x20 grid and stretched to 32x32.
    pruned = torch.arange(400.0).repeat(2, 32, 1).transpose(1, 2)  # (2, 400, 32): token index as value
    monkeypatch.setattr(clip, "forward", lambda x: pruned)
    with torch.no_grad():
        fused = vt(images)
    assert fused.shape == (2, 1024, 168)
    torch.testing.assert_close(fused[..., :32], to_grid(pruned))
    assert fused[0, -1, 0] == 399  # last token lands in the last grid corner, as if nothing were missing


def test_encoder_list_rules():
    from eagle.model.multimodal_encoder.builder import build_vision_tower

    def config(names):
        return types.SimpleNamespace(mm_vision_tower=names, mm_vision_select_layer=-2)

    two = build_vision_tower(config("clip-448;convnext-1024;not-an-encoder"))
    assert [type(t).__name__ for t in two.vision_towers] == ORDER[:2]  # unknown names skipped silently
    assert two(torch.randn(1, 3, IMAGE, IMAGE)).shape == (1, 1024, 80)
    with pytest.raises(NameError, match="convnext-1024"):
        build_vision_tower(config("clip-448;pix2struct-1024"))
    with pytest.raises(NotImplementedError, match="det-1024"):
        build_vision_tower(config("clip-448;convnext-1024;det-1024"))
    with pytest.raises(ValueError, match="Unknown vision tower"):
        build_vision_tower(config("openai/clip-vit-large-patch14-336"))


def test_encode_images_projects_the_fused_grid(model, images):
    with torch.no_grad():
        encoded = model.encode_images(images)
        expected = model.get_model().mm_projector(model.get_vision_tower()(images))
    assert encoded.shape == (2, 1024, 64)
    torch.testing.assert_close(encoded, expected)
    proj = model.get_model().mm_projector
    assert [type(m).__name__ for m in proj] == ["Linear", "GELU", "Linear"] and proj[0].in_features == 168


def test_initialize_vision_modules_on_a_text_only_model():
    """EAGLE's training path: a plain LLM checkpoint gets its towers and projector from ModelArguments."""
    from eagle.model.multimodal_encoder.tiny_configs import DEFAULT_TOWERS

    config = EagleConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = EagleLlamaForCausalLM(config)
    assert model.get_vision_tower() is None
    args = types.SimpleNamespace(
        vision_tower="convnext-1024;sam-1024", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=None, mm_patch_merge_type="flat", mm_projector_type="mlp2x_gelu",
    )
    model.get_model().initialize_vision_modules(args)
    assert model.config.mm_vision_tower == "convnext-1024;sam-1024" and model.config.mm_hidden_size == 48 + 64
    assert model.config.eagle_like_towers["sam-1024"] == DEFAULT_TOWERS["sam-1024"]  # sizes kept for reloading
    with torch.no_grad():
        assert model.encode_images(torch.randn(1, 3, IMAGE, IMAGE)).shape == (1, 1024, 64)


# The language model -------------------------------------------------------------------------------------------
def test_forward_loss_backward_reach_every_tower_and_the_projector():
    model = build_tiny_eagle().train()  # training: CLIP blocks and ConvNeXt stages run checkpointed
    # As EAGLE's scripts (--gradient_checkpointing True), with the reentrant default of EAGLE's torch.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    ids, mask = batch()
    images = torch.randn(2, 3, IMAGE, IMAGE)
    labels = ids.masked_fill(ids < 0, -100).masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, images=images, labels=labels)
    assert out.logits.shape == (2, 11 + 1024, 256)  # longest row: 11 text tokens + 1024 visual
    assert torch.isfinite(out.loss)
    out.loss.backward()
    # Parameters EAGLE's towers never use: CLIP's post-LN (no post-LN) and ConvNeXt's final norm.
    unused = {"HRCLIPVisionTower": ("post_layernorm.weight", "post_layernorm.bias"),
              "ConvNextVisionTower": ("vision_tower.layernorm.weight", "vision_tower.layernorm.bias")}
    for tower in model.get_vision_tower().vision_towers:
        for name, p in tower.named_parameters():
            if name.endswith(unused.get(type(tower).__name__, ())):
                assert p.grad is None, name
            elif name.endswith("class_embedding"):  # CLS is dropped before the blocks
                assert p.grad is not None and torch.count_nonzero(p.grad) == 0
            else:
                assert p.grad is not None and torch.count_nonzero(p.grad) > 0, f"{type(tower).__name__}.{name}"
    for name, p in model.get_model().mm_projector.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_forward_swallows_cache_position(model, images):
    ids, mask = (t[:1] for t in batch())
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, images=images[:1]).logits
        extra = model(input_ids=ids, attention_mask=mask, images=images[:1],
                      cache_position=torch.arange(ids.shape[1] + 1023)).logits
    torch.testing.assert_close(plain, extra, rtol=0, atol=0)


def test_prepare_inputs_for_generation_carries_images(model, images):
    ids, mask = batch()
    sizes = [(IMAGE, IMAGE)] * 2
    out = model.prepare_inputs_for_generation(ids, attention_mask=mask, images=images, image_sizes=sizes,
                                              cache_position=torch.arange(ids.shape[1]), use_cache=False)
    assert out["images"] is images and out["image_sizes"] is sizes


def greedy_without_cache(model, ids, mask, images, steps):
    """Greedy decoding by full forwards over the spliced embeddings (no KV cache), as generate decodes."""
    _, _, spliced_mask, _, embeds, _ = model.prepare_inputs_labels_for_multimodal(ids, None, mask, None, None, images)
    attn = spliced_mask.long()
    eos, pad = model.generation_config.eos_token_id, model.generation_config.pad_token_id
    done = torch.zeros(ids.shape[0], dtype=torch.bool)
    tokens = []
    for _ in range(steps):
        positions = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 1)
        logits = model(inputs_embeds=embeds, attention_mask=attn, position_ids=positions, use_cache=False).logits
        nxt = logits[:, -1].argmax(-1).masked_fill(done, pad)
        tokens.append(nxt)
        done |= nxt == eos
        if bool(done.all()):
            break
        embeds = torch.cat([embeds, model.get_model().embed_tokens(nxt)[:, None]], dim=1)
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
    return torch.stack(tokens, dim=1)


def test_greedy_generate_with_cache_equals_decoding_without_cache():
    model = build_tiny_eagle(TinyEagleSpec(padding_side="left", seed=3))
    ids, mask = batch(pad_side="left")
    images = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = greedy_without_cache(model, ids, mask, images, steps=6)
        out = model.generate(ids, attention_mask=mask, images=images, max_new_tokens=6, do_sample=False,
                             num_beams=1, use_cache=True)
    # Embeds-only generation returns no prompt; transformers 4.37 starts every row with one BOS.
    extra = out.shape[1] - expected.shape[1]
    assert extra in (0, 1)
    if extra:
        assert torch.all(out[:, 0] == model.config.bos_token_id)
    assert torch.equal(out[:, extra:], expected), (out, expected)


# Checkpoints and the loader ---------------------------------------------------------------------------------
def test_save_and_from_pretrained_give_equal_logits(model, images, tmp_path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {f"model.mm_projector.{i}.weight" for i in (0, 2)} <= keys
    for i in range(4):
        assert any(k.startswith(f"model.vision_tower.vision_towers.{i}.vision_tower.") for k in keys)
    reloaded = EagleLlamaForCausalLM.from_pretrained(tmp_path).eval()
    auto = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(auto) is EagleLlamaForCausalLM
    for (name, a), b in zip(reloaded.state_dict().items(), auto.state_dict().values()):
        assert torch.equal(a, b), name
    ids, mask = batch()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, images=images).logits
        after = reloaded(input_ids=ids, attention_mask=mask, images=images).logits
    assert torch.equal(after, before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny checkpoint with a tokenizer, under a name with "eagle" and one without."""
    root = tmp_path_factory.mktemp("ckpt")
    eagle_dir = save_tiny_eagle(str(root / "tiny-eagle-x5"))
    plain_dir = str(root / "tiny-vlm")
    os.symlink(eagle_dir, plain_dir)
    return eagle_dir, plain_dir


def test_load_pretrained_model_on_an_eagle_folder(saved):
    from PIL import Image

    from eagle.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token
    from eagle.model.builder import load_pretrained_model

    path = saved[0]
    name = get_model_name_from_path(path)
    assert name == "tiny-eagle-x5"
    tokenizer, model, processor, context_len = load_pretrained_model(path, None, name, device="cpu")
    assert type(model) is EagleLlamaForCausalLM and model.dtype == torch.float16 and context_len == 2048
    assert processor is model.get_vision_tower().image_processor  # ConvNeXt's, for the whole fusion tower
    assert len(tokenizer) == model.config.vocab_size
    ids = tokenizer_image_token("w5 w6 <image> w7", tokenizer, return_tensors="pt")
    assert ids.tolist() == [1, 5, 6, -200, 7]
    picture = Image.new("RGB", (200, 120), (250, 10, 10))
    pixels = process_images([picture], processor, model.config)  # 'pad': expand to a square, then resize
    assert pixels.shape == (1, 3, IMAGE, IMAGE)
    # The padded band (top rows) holds the mean colour, i.e. about 0 after normalisation.
    assert pixels[0, :, :5].abs().max() < 0.05 and pixels[0, 0, IMAGE // 2].mean() > 1.0
    with torch.no_grad():
        logits = model(input_ids=ids[None], images=pixels.half()).logits
    assert logits.shape == (1, 4 + 1024, 256) and torch.isfinite(logits).all()


def test_load_pretrained_model_without_eagle_in_the_name_gives_no_image_processor(saved):
    from eagle.mm_utils import get_model_name_from_path
    from eagle.model.builder import load_pretrained_model

    path = saved[1]
    tokenizer, model, processor, _ = load_pretrained_model(path, None, get_model_name_from_path(path), device="cpu")
    assert processor is None
    assert type(model) is EagleLlamaForCausalLM and tokenizer is not None


def test_load_pretrained_model_lora_branch_fails_like_eagle(saved):
    from eagle.model.builder import load_pretrained_model

    with pytest.raises(ImportError, match="eagleConfig"):
        load_pretrained_model(saved[0], saved[0], "tiny-eagle-x5-lora", device="cpu")


def test_load_pretrained_model_without_a_saved_tokenizer(tmp_path):
    from eagle.model.builder import load_pretrained_model

    path = save_tiny_eagle(str(tmp_path / "tiny-eagle-notok"), tokenizer=False)
    tokenizer, model, processor, _ = load_pretrained_model(path, None, "tiny-eagle-notok", device="cpu")
    assert tokenizer is None and processor is not None
    assert model.get_input_embeddings().weight.shape[0] == 256  # nothing resized
