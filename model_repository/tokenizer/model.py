"""Triton python-backend tokenizer: raw text (or text pairs) in, BERT input tensors out.

It stands in front of every BERT model through an ensemble, so clients send strings. The
tokenizer files (``tokenizer.json``) are exported beside this file in each version directory.
Each request is padded to a multiple of ``pad_to_multiple_of`` tokens: requests of similar
length then share a shape, which lets the encoder's dynamic batcher put them in one batch.
A request of at least ``exact_padding_from`` texts (more than half the encoders' largest
batch, as the indexing job sends) shares a batch with no other, so it is padded to its
longest text only: rounded up, MovieLens's length-bucketed batches sent a third more tokens
than their longest texts need.
Pairs (the ranker's input) have their own, shorter budget, ``pair_max_length``: the ranker's
cost grows with candidates x length, and it is trained at that length.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer


def _decode(tensor: np.ndarray) -> list[str]:
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in tensor]


def _tokenizer(path: str, max_length: int, multiple: int | None) -> Tokenizer:
    """The exported tokenizer, truncating at ``max_length`` and padding each request to its
    longest text, rounded up to ``multiple`` (None: not rounded)."""
    tokenizer = Tokenizer.from_file(path)
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_to_multiple_of=multiple)
    return tokenizer


class TritonPythonModel:
    """Tokenizes TEXT (and optional TEXT_PAIR) with the exported fast tokenizer."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        multiple = int(params.get("pad_to_multiple_of", "16"))
        self.exact_from = int(params.get("exact_padding_from", "33"))
        path = str(version_dir / "tokenizer" / "tokenizer.json")
        lengths = {
            False: int(params.get("max_length", "128")),
            True: int(params.get("pair_max_length", "64")),
        }
        # (pairs?, exact?): small requests rounded up to the multiple, large ones not
        self.tokenizers = {
            (pairs, exact): _tokenizer(path, lengths[pairs], None if exact else multiple)
            for pairs in (False, True)
            for exact in (False, True)
        }

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                texts = _decode(
                    pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
                )
                pair_tensor = pb_utils.get_input_tensor_by_name(request, "TEXT_PAIR")
                exact = len(texts) >= self.exact_from
                tokenizer = self.tokenizers[(pair_tensor is not None, exact)]
                if pair_tensor is not None:
                    pairs = _decode(pair_tensor.as_numpy().reshape(-1))
                    if len(pairs) != len(texts):
                        raise ValueError("TEXT_PAIR must have one entry per TEXT")
                    encodings = tokenizer.encode_batch(list(zip(texts, pairs, strict=True)))
                else:
                    encodings = tokenizer.encode_batch(texts)
                ids = np.array([e.ids for e in encodings], dtype=np.int64)
                mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
                types = np.array([e.type_ids for e in encodings], dtype=np.int64)
                responses.append(
                    pb_utils.InferenceResponse(
                        output_tensors=[
                            pb_utils.Tensor("INPUT_IDS", ids),
                            pb_utils.Tensor("ATTENTION_MASK", mask),
                            pb_utils.Tensor("TOKEN_TYPE_IDS", types),
                        ]
                    )
                )
            except Exception as exc:  # one bad request must not fail the whole batch
                responses.append(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(f"tokenizer: {exc}"))
                )
        return responses
