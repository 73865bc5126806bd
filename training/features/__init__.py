"""Text features shared by training and serving (pure Python; no torch)."""

from training.features.text import (
    item_text,
    normalize_text,
    user_histories,
    user_text,
    user_text_for_tokens,
)

__all__ = ["item_text", "normalize_text", "user_histories", "user_text", "user_text_for_tokens"]
