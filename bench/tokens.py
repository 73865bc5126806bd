"""Tokenization exactly as the release's Triton ``tokenizer`` model does it.

The settings are read from the release's ``tokenizer/config.pbtxt`` parameters
(``max_length`` for single texts, ``pair_max_length`` for the ranker's (user, item) pairs,
``pad_to_multiple_of``, ``exact_padding_from``), so the PyTorch and ONNX Runtime benchmarks
feed the same token ids as Triton, whatever the release configures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.util import config_parameters


@dataclass(frozen=True)
class TokenizerSpec:
    path: Path  # tokenizer.json of the release
    max_length: int = 128
    pair_max_length: int = 128
    multiple: int = 16
    exact_from: int = 33  # requests of this many texts: padded to their longest, not rounded

    @classmethod
    def of_release(cls, repository: Path) -> TokenizerSpec:
        model = repository / "tokenizer"
        version = max(int(p.name) for p in model.iterdir() if p.name.isdigit())
        params = config_parameters(model)
        max_length = int(params.get("max_length", "128"))
        return cls(
            model / str(version) / "tokenizer" / "tokenizer.json",
            max_length,
            int(params.get("pair_max_length", max_length)),
            int(params.get("pad_to_multiple_of", "16")),
            int(params.get("exact_padding_from", "33")),
        )

    def rounds(self, batch: int | None) -> bool:
        """Whether Triton's tokenizer rounds a request of ``batch`` texts up to the multiple
        (None: a request too small to be exact)."""
        return batch is None or batch < self.exact_from

    def width(self, batch: int, longest: int) -> int:
        """The padded length of a request of ``batch`` texts whose longest has ``longest``
        tokens."""
        width = -(-longest // self.multiple) * self.multiple if self.rounds(batch) else longest
        return min(width, self.max_length)

    def tokenizer(
        self, pairs: bool = False, max_length: int | None = None, batch: int | None = None
    ) -> Any:
        """A ``tokenizers.Tokenizer`` configured like Triton's (texts or pairs) for requests
        of ``batch`` texts."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(self.path))
        default = self.pair_max_length if pairs else self.max_length
        tok.enable_truncation(max_length=max_length or default)
        tok.enable_padding(pad_to_multiple_of=self.multiple if self.rounds(batch) else None)
        return tok


def encode(
    tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """input_ids / attention_mask (/ token_type_ids for pairs) as int64 arrays."""
    if pairs is not None:
        encodings = tokenizer.encode_batch(list(zip(texts, pairs, strict=True)))
    else:
        encodings = tokenizer.encode_batch(list(texts))
    feeds = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }
    if pairs is not None:
        feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
    return feeds


def real_texts(data_dir: Path) -> dict[str, list[str]]:
    """Real item texts and user behaviour texts of the slice (deterministic order)."""
    from core.text import item_texts
    from ops.indexing import user_rows
    from training.data import load_dataset

    dataset = load_dataset(data_dir)
    rng = np.random.default_rng(0)
    items = list(item_texts(dataset.items).values())
    users = [text for _, text in user_rows(dataset) if text]
    return {
        "items": [items[i] for i in rng.permutation(len(items))],
        "users": [users[i] for i in rng.permutation(len(users))],
    }
