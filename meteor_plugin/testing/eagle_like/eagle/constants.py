"""Token and label constants, with EAGLE's values (shared with LLaVA)."""

CONTROLLER_HEART_BEAT_EXPIRATION = 30
WORKER_HEART_BEAT_INTERVAL = 15

LOGDIR = "."

IGNORE_INDEX = -100  # label of positions the loss skips (image slots, instruction in SFT)
IMAGE_TOKEN_INDEX = -200  # placeholder id that prepare_inputs_labels_for_multimodal replaces by features
DEFAULT_IMAGE_TOKEN = "<image>"
DEFAULT_IMAGE_PATCH_TOKEN = "<im_patch>"
DEFAULT_IM_START_TOKEN = "<im_start>"
DEFAULT_IM_END_TOKEN = "<im_end>"
IMAGE_PLACEHOLDER = "<image-placeholder>"
