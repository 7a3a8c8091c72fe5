"""Tiny sizes for the encoders EAGLE downloads from the hub. Stand-in only: EAGLE has no such file.

Keyed by EAGLE's encoder-name strings. Each tiny encoder reaches EAGLE's 32x32 fusion grid the way the
real one does, from a 128-pixel image standing for EAGLE's 1024 (sizes scaled by 1/8):

=================  ==============================  =======================================================
name               real EAGLE                      tiny stand-in (default)
=================  ==============================  =======================================================
clip-448           CLIP-L/14 at 336: 24x24 = 576   CLIP ViT at 96, patch 4: 24x24 = 576, 32 ch, 3 blocks
convnext-1024      ConvNeXt-XXL, last stage 32x32  ConvNeXt, patch 2, 2 stages: 64x64 then 32x32, 48 ch
sam-1024           SAM-L, 64x64, 256 ch, unshuffle SAM ViT, patch 2: 64x64, window 8 + 1 global block,
                                                   neck 16 ch, pixel_unshuffle(2): 32x32 x 64 ch
pix2struct-1024    2048 patches -> 45x45, 1536 ch  512 patches of 4 px -> 22x22 = 484, 24 ch, 3 blocks
=================  ==============================  =======================================================

The sizes travel in the model config (``eagle_like_input_image_size``, ``eagle_like_towers``), so
``from_pretrained`` rebuilds the same towers; a config without them gets these defaults. Pure data: no
imports, so ``meteor_plugin.testing.eagle_like`` can read it without importing ``eagle``.
"""

DEFAULT_INPUT_IMAGE_SIZE = 128  # stands for the 1024 that EAGLE's fusion tower hard-codes

DEFAULT_TOWERS = {
    "clip-448": {
        "input_image_size": 96, "patch_size": 4, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 2,
    },
    "convnext-1024": {
        "input_image_size": 128, "patch_size": 2, "hidden_sizes": [16, 48], "depths": [1, 1],
    },
    "sam-1024": {
        "input_image_size": 128, "patch_size": 2, "hidden_size": 16, "num_hidden_layers": 2,
        "num_attention_heads": 1, "mlp_dim": 32, "window_size": 8, "global_attn_indexes": [1],
        "output_channels": 16,
    },
    "pix2struct-1024": {
        "input_image_size": 128, "patch_size": 4, "max_patches": 512, "hidden_size": 24, "d_ff": 48,
        "d_kv": 12, "num_hidden_layers": 3, "num_attention_heads": 2,
    },
}

CONFIG_KEYS = ("eagle_like_input_image_size", "eagle_like_towers")


def tiny_settings(args):
    """(input image size, {name: tiny config}) from a model config or training arguments."""
    import copy

    size = getattr(args, "eagle_like_input_image_size", None) or DEFAULT_INPUT_IMAGE_SIZE
    towers = copy.deepcopy(DEFAULT_TOWERS)
    for name, overrides in (getattr(args, "eagle_like_towers", None) or {}).items():
        towers[name] = {**towers.get(name, {}), **overrides}
    return int(size), towers
