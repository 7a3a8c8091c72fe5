"""Conversation templates.

EAGLE's ``conversation.py`` is LLaVA's with a few templates added (Llama-3, Yi-34B ChatML), so the
stand-in re-exports LLaVA's names and values. ``default_conversation`` is bound in this module: the
training script sets ``eagle.conversation.default_conversation``, as EAGLE's does, and that never
reaches ``llava.conversation``.
"""

from llava.conversation import (  # noqa: F401
    Conversation,
    SeparatorStyle,
    conv_templates,
    default_conversation,
)
