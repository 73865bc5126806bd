"""Every model Triton serves answers what ONNX Runtime computes from the same ONNX file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from transformers import AutoTokenizer

from ops.stack import LocalStack
from services.inference.triton_client import TritonClient
from tests.training.export.served_runner import tower_atol
from training.precision import cpu_has_bf16

pytestmark = pytest.mark.integration

TEXTS = ["Toy Story (1995). Genres: Adventure, Animation", "Heat", "x " * 400]
USERS = ["Recently liked: Heat (Action, Crime)", "Recently liked: Toy Story (Animation)", ""]


def _direct(
    repo: Path, model: str, texts: list[str], pairs: list[str] | None = None
) -> list[np.ndarray]:
    tokenizer = AutoTokenizer.from_pretrained(str(repo / "tokenizer" / "1" / "tokenizer"))
    args = (texts, pairs) if pairs is not None else (texts,)
    limit = 128 if pairs is None else 64  # the tokenizer model's max_length / pair_max_length
    tokens = tokenizer(*args, padding=True, truncation=True, max_length=limit, return_tensors="np")
    session = ort.InferenceSession(str(repo / model / "1" / "model.onnx"))
    feeds = {i.name: tokens[i.name].astype(np.int64) for i in session.get_inputs()}
    return session.run(None, feeds)


def _assert_served_tower(served: np.ndarray, fp32: np.ndarray) -> None:
    """A tower serves ONNX Runtime's fp32 vectors, or OpenVINO's bf16 ones where the CPU has
    bf16 instructions (its config's engine ``auto``): then close to them, not equal."""
    if not cpu_has_bf16():
        assert np.abs(served - fp32).max() < 1e-5
        return
    cosine = (served * fp32).sum(1) / np.linalg.norm(served, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cosine.min() > 0.999 and 1e-4 < np.abs(served - fp32).max() < 0.05


@pytest.fixture()
def triton(stack: LocalStack):  # type: ignore[no-untyped-def]
    client = TritonClient(stack.settings)
    yield client
    client.close()


def test_item_and_user_towers(stack: LocalStack, triton: TritonClient) -> None:
    repo = stack.settings.model_repository
    items = triton.embed_items(TEXTS, 20)
    users = triton.embed_users(USERS, 20)
    assert items.shape == (3, 384) and users.shape == (3, 384)
    _assert_served_tower(items, _direct(repo, "item_encoder", TEXTS)[0])
    _assert_served_tower(users, _direct(repo, "user_encoder", USERS)[0])
    assert np.allclose(np.linalg.norm(items, axis=1), 1, atol=1e-5)


def test_ranker_pairs(stack: LocalStack, triton: TritonClient) -> None:
    repo = stack.settings.model_repository
    served = triton.score(USERS[0], TEXTS, 20)
    logit, probability = _direct(repo, "ranker", [USERS[0]] * 3, TEXTS)
    assert served.shape == (3,)
    assert np.abs(served - probability.reshape(-1)).max() < 1e-5
    assert np.allclose(probability, 1 / (1 + np.exp(-logit)), atol=1e-6)


def test_dynamic_batching_merges_concurrent_requests(
    stack: LocalStack, triton: TritonClient
) -> None:
    """Concurrent single-text requests come back identical to one batched request."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"Movie number {i} (2001). Genres: Drama" for i in range(24)]
    batched = triton.embed_items(texts, 20)
    with ThreadPoolExecutor(8) as pool:
        singles = list(pool.map(lambda t: triton.embed_items([t], 20)[0], texts))
    assert np.abs(np.stack(singles) - batched).max() < tower_atol(1e-5)


def test_a_request_that_fills_a_batch_is_padded_to_its_longest_text_only(
    stack: LocalStack, triton: TritonClient
) -> None:
    """Small requests are rounded up to 16 tokens (a shape to share in the encoders' dynamic
    batcher); one of 33 texts or more (the indexing job's batches) only to its longest, and
    its vectors are still what ONNX Runtime computes."""
    import tritonclient.grpc as grpcclient

    from bench.tokens import TokenizerSpec

    repo = stack.settings.model_repository
    spec = TokenizerSpec.of_release(repo)
    assert (spec.multiple, spec.exact_from) == (16, 33)
    texts = [f"Movie {i} (2001). Genres: Drama" for i in range(40)]
    counter = spec.tokenizer()
    counter.no_padding()
    longest = max(len(e.ids) for e in counter.encode_batch(texts))
    assert longest % 16 != 0  # rounding up shows
    client = grpcclient.InferenceServerClient(stack.settings.triton_url)
    try:
        for n, width in ((3, -(-longest // 16) * 16), (40, longest)):
            data = np.array([t.encode() for t in texts[:n]], dtype=np.object_).reshape(-1, 1)
            text = grpcclient.InferInput("TEXT", list(data.shape), "BYTES")
            text.set_data_from_numpy(data)
            ids = client.infer("tokenizer", [text]).as_numpy("INPUT_IDS")
            assert ids.shape == (n, width) == (n, spec.width(n, longest))
    finally:
        client.close()
    items = triton.embed_items(texts, 20)
    _assert_served_tower(items, _direct(repo, "item_encoder", texts)[0])


def test_sequence_model_serves_what_the_trained_model_scores(
    stack: LocalStack, triton: TritonClient, tiny_sequence_model: str
) -> None:
    """An indexed user's row events through Triton (vocabulary, dropped unknown ids, newest
    ``max_seq_len`` kept) score as the trained PyTorch model scores them."""
    import torch

    from core.sequence_inputs import model_inputs
    from services.vectors.store import VectorStore
    from training.models.sequence import load_sequence_model

    store = VectorStore(stack.settings)
    user = store.get_user("1", 10)
    assert user is not None and len(user["events"]["items"]) > 20  # longer than max_seq_len
    events, size = user["events"], int(user["history_size"])
    served_in = {k: v[0] for k, v in model_inputs(events, size, len(events["items"])).items()}
    served_in["items"][-1] = "not-in-the-vocabulary"  # dropped by the served model
    candidates = [*events["items"][:5], "1", "2", "unknown-item"]
    result = triton.sequence(served_in, candidates, 20)

    model = load_sequence_model(Path(tiny_sequence_model))
    index = model.space.index()
    keep = served_in["items"] != "not-in-the-vocabulary"
    x = {k: v[keep][-model.cfg.max_seq_len :] for k, v in served_in.items()}
    x["items"] = np.array([index[i] for i in x["items"]])
    with torch.no_grad():
        table, bias = model.served_terms()
        tensors = {k: torch.from_numpy(v.astype(np.int64))[None] for k, v in x.items()}
        scores = (model.hidden(tensors, table)[:, -1] @ table.T + bias)[0].numpy()
    cols = [index.get(c, 0) for c in candidates]
    assert np.abs(result.candidate_scores - scores[cols]).max() < 1e-4
    assert result.candidate_scores[-1] == pytest.approx(scores[0], abs=1e-4)  # new-item row
    scores[0] = -np.inf
    scores[x["items"]] = -np.inf  # the inputs are never recommended back
    best = np.argsort(-scores, kind="stable")[: len(result.top_items)]
    assert np.abs(result.top_scores - scores[best]).max() < 1e-4
    assert not set(result.top_items) & set(model.space.item_ids[i - 1] for i in x["items"])
