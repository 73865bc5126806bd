"""The tokenizer's exact-padding threshold is tied to the encoders' batch size, which its
model cannot read: this keeps the two configurations from drifting apart."""

from __future__ import annotations

import re

from core.config import REPO_ROOT

REPOSITORY = REPO_ROOT / "model_repository"
ENCODERS = ("item_encoder", "user_encoder", "ranker")  # what the tokenizer's ensembles feed


def _number(text: str, pattern: str) -> int:
    found = re.findall(pattern, text)
    assert len(found) == 1, pattern
    return int(found[0])


def test_exact_padding_starts_past_half_the_encoders_largest_batch() -> None:
    """A request of more than half an encoder's ``max_batch_size`` texts (the indexing job's
    batches) is padded to its longest text only; smaller ones keep the rounded width the
    dynamic batcher merges. Changing one number without the other fails here, in the CPU and
    the GPU configurations alike."""
    configs = [REPOSITORY / name / "config.pbtxt" for name in ENCODERS]
    configs += [REPOSITORY / name / "configs" / "gpu.pbtxt" for name in ENCODERS]
    batch = max(_number(p.read_text(), r"(?m)^max_batch_size:\s*(\d+)") for p in configs)
    tokenizer = (REPOSITORY / "tokenizer" / "config.pbtxt").read_text()
    exact_from = _number(tokenizer, r'key: "exact_padding_from", value: \{ string_value: "(\d+)"')
    assert exact_from == batch // 2 + 1
    assert f"max_batch_size of {batch}" in tokenizer  # its comment names the number it follows
