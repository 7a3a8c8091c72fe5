"""Prompt and image helpers.

EAGLE's ``mm_utils.py`` is LLaVA's with ``llava.constants`` renamed to ``eagle.constants`` (same values),
so the stand-in re-exports LLaVA's functions instead of restating them. These names are bound here, so
a later patch of ``llava.mm_utils.X`` does not reach ``eagle.mm_utils.X``, as with the real copy.
"""

from llava.mm_utils import (  # noqa: F401
    KeywordsStoppingCriteria,
    divide_to_patches,
    expand2square,
    get_anyres_image_grid_shape,
    get_model_name_from_path,
    load_image_from_base64,
    process_anyres_image,
    process_images,
    resize_and_pad_image,
    select_best_resolution,
    tokenizer_image_token,
)
