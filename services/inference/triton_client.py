"""The one Triton client of the platform: text in, vectors or click probabilities out, and
the feature ranker's numbers in, click probabilities out.

It speaks KServe v2 gRPC through ``tritonclient`` to the ensembles of the model repository
(tokenizer in front of each BERT model), so callers never tokenize. Every call takes the
caller's remaining deadline and passes it on as the request timeout.

A pinned release N (``RECSYS_TRITON_MODEL_VERSION``, an experiment arm's ``model_version``)
is served by that release's own ensemble, ``<ensemble>_r<N>`` version N, whose steps name
release N's tokenizer, encoder and ranker. Asking the shared ensemble for version N cannot
roll back: Triton reads one config per model, not per version, so its steps
(``model_version: -1``) run the newest composing models whichever ensemble version is asked
for (and under its default version policy only its newest version is loaded at all). The
exporter (``training/export/repository.py``) writes those ensembles; unpinned calls use the
shared ensemble, which follows the newest release. The feature ranker is no ensemble: a
pinned call asks for version N of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from core.config import Settings
from core.releases import pinned_model_name

MAX_BATCH = 64  # max_batch_size of the ensembles in model_repository/
FEATURE_BATCH = 1024  # max_batch_size of model_repository/feature_ranker


class InferenceUnavailable(RuntimeError):
    """Triton could not answer (down, not ready, model missing, or past the deadline)."""


@dataclass(frozen=True)
class SequenceResult:
    """The sequence model's answer for one user: its best items (ids, best first) with their
    scores, and the scores of the candidates asked about (in their order)."""

    top_items: list[str]
    top_scores: np.ndarray
    candidate_scores: np.ndarray


def channel_args(url: str) -> list[tuple[str, int | str]] | None:
    """gRPC options for ``url``: a ``dns:///`` target (a headless Service: every Triton pod)
    gets the round_robin policy, so calls spread over all pods instead of sticking to the
    first; tritonclient's own message-size options are kept. None: tritonclient's defaults."""
    if not url.startswith("dns:///"):
        return None
    return [
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.max_send_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", grpcclient.MAX_GRPC_MESSAGE_SIZE),
    ]


class TritonClient:
    """Embeds texts with the towers and scores (user, item) text pairs with the ranker."""

    def __init__(self, settings: Settings) -> None:
        self.url = settings.triton_url
        self.item_model = settings.triton_item_model
        self.user_model = settings.triton_user_model
        self.ranker_model = settings.triton_ranker_model
        self.feature_ranker_model = settings.triton_feature_ranker_model
        self.sequence_model = settings.triton_sequence_model
        self._ensembles = {self.item_model, self.user_model, self.ranker_model}
        self.version = settings.triton_model_version
        self.batch = min(settings.triton_batch_size, MAX_BATCH)
        self._client = grpcclient.InferenceServerClient(
            self.url, channel_args=channel_args(self.url)
        )

    def close(self) -> None:
        self._client.close()

    # --- health ------------------------------------------------------------------------
    def ready(self, models: Sequence[str] | None = None, timeout_s: float = 1.0) -> bool:
        """True when the server and the given models (default: both towers) are ready."""
        names = models if models is not None else (self.item_model, self.user_model)
        try:
            if not self._client.is_server_ready(client_timeout=timeout_s):
                return False
            return all(
                self._client.is_model_ready(*self.target(m), client_timeout=timeout_s)
                for m in names
            )
        except InferenceServerException:
            return False

    def repository_index(self, timeout_s: float = 1.0) -> dict[tuple[str, str], str]:
        """``(model, version) -> state`` (``READY``, ``UNAVAILABLE``, ...) of every model
        version Triton knows: which releases it serves and which models each one has."""
        try:
            index = self._client.get_model_repository_index(client_timeout=timeout_s)
        except InferenceServerException as exc:
            raise InferenceUnavailable(f"triton at {self.url}: {exc.message()}") from exc
        return {(m.name, m.version): m.state for m in index.models}

    def model_version(
        self,
        model: str,
        timeout_s: float = 1.0,
        index: Mapping[tuple[str, str], str] | None = None,
    ) -> str:
        """The version that answers for ``model`` (the pinned one, else the newest ready),
        from ``index`` (:meth:`repository_index`) when given."""
        if self.version:
            return self.version
        if index is None:
            index = self.repository_index(timeout_s)
        ready = [
            int(v) for (name, v), state in index.items() if name == model and state == "READY" and v
        ]
        return str(max(ready)) if ready else ""

    def target(self, model: str, version: str | None = None) -> tuple[str, str]:
        """The ``(model name, version)`` that serves ``model`` at ``version`` (default: the
        client's pin): the release's own ensemble when pinned, else the shared one's newest;
        for a model that is no ensemble, that version of it."""
        pinned = self.version if version is None else version
        if pinned and model in self._ensembles:
            return pinned_model_name(model, pinned), pinned
        return model, pinned or ""

    # --- inference -----------------------------------------------------------------------
    def embed_items(self, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        return self._embed(self.item_model, texts, timeout_s)

    def embed_users(self, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        return self._embed(self.user_model, texts, timeout_s)

    def score(
        self, query: str, documents: Sequence[str], timeout_s: float, version: str | None = None
    ) -> np.ndarray:
        """Click probability of each document for one user text, shape ``(len(documents),)``.

        ``version`` pins a release for this call (an experiment arm); default the client's."""
        out = []
        for start in range(0, len(documents), self.batch):
            chunk = documents[start : start + self.batch]
            inputs = [
                _text_input("QUERY", [query] * len(chunk)),
                _text_input("DOCUMENT", chunk),
            ]
            result = self._infer(self.ranker_model, inputs, "PROBABILITY", timeout_s, version)
            out.append(result.reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def rank_features(
        self, features: np.ndarray, timeout_s: float, version: str | None = None
    ) -> np.ndarray:
        """The feature ranker's click probability of each row of ``features`` (``(n, F)``,
        :data:`core.ranking_features.FEATURES`), shape ``(n,)``; one request per 1,024 rows."""
        rows = np.ascontiguousarray(features, dtype=np.float32)
        out = []
        for start in range(0, len(rows), FEATURE_BATCH):
            chunk = rows[start : start + FEATURE_BATCH]
            tensor = grpcclient.InferInput("features", list(chunk.shape), "FP32")
            tensor.set_data_from_numpy(chunk)
            result = self._infer(
                self.feature_ranker_model, [tensor], "probability", timeout_s, version
            )
            out.append(result.reshape(-1))
        return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)

    def sequence(
        self,
        inputs: Mapping[str, np.ndarray],
        candidates: Sequence[str],
        timeout_s: float,
        version: str | None = None,
    ) -> SequenceResult:
        """The sequence model on one user's events (:func:`core.sequence_inputs.model_inputs`
        arrays, ``items`` as strings): its best items outside them, with scores, and the
        score of each of ``candidates``."""
        tensors = [_text_input("items", [str(i) for i in inputs["items"]], flat=True)]
        for name in ("tokens", "gaps", "ranks"):
            data = np.ascontiguousarray(inputs[name], dtype=np.int64).reshape(-1)
            tensor = grpcclient.InferInput(name, list(data.shape), "INT64")
            tensor.set_data_from_numpy(data)
            tensors.append(tensor)
        tensors.append(_text_input("candidates", list(candidates), flat=True))
        outputs = ("top_items", "top_scores", "candidate_scores")
        top, top_scores, scores = self._infer_all(
            self.sequence_model, tensors, outputs, timeout_s, version, allow_empty=True
        )
        return SequenceResult(
            [bytes(i).decode("utf-8") for i in top.reshape(-1)],
            top_scores.reshape(-1).astype(np.float32),
            scores.reshape(-1).astype(np.float32),
        )

    def _embed(self, model: str, texts: Sequence[str], timeout_s: float) -> np.ndarray:
        chunks = [
            self._infer(
                model, [_text_input("TEXT", texts[i : i + self.batch])], "EMBEDDING", timeout_s
            )
            for i in range(0, len(texts), self.batch)
        ]
        if not chunks:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(chunks).astype(np.float32, copy=False)

    def _infer(
        self,
        model: str,
        inputs: list[grpcclient.InferInput],
        output: str,
        timeout_s: float,
        version: str | None = None,
    ) -> np.ndarray:
        return self._infer_all(model, inputs, (output,), timeout_s, version)[0]

    def _infer_all(
        self,
        model: str,
        inputs: list[grpcclient.InferInput],
        outputs: Sequence[str],
        timeout_s: float,
        version: str | None = None,
        allow_empty: bool = False,
    ) -> list[np.ndarray]:
        if timeout_s <= 0:
            raise InferenceUnavailable(f"no time left for {model} before the deadline")
        name, pinned = self.target(model, version)
        try:
            result = self._client.infer(
                name,
                inputs,
                model_version=pinned,
                outputs=[grpcclient.InferRequestedOutput(o) for o in outputs],
                client_timeout=timeout_s,
            )
        except InferenceServerException as exc:
            raise InferenceUnavailable(f"{name} on {self.url}: {exc.message()}") from exc
        arrays = []
        for output in outputs:
            array = result.as_numpy(output)
            if array is None or (array.size == 0 and not allow_empty):
                raise InferenceUnavailable(f"{model} returned an empty {output}")
            arrays.append(array)
        return arrays


def _text_input(name: str, texts: Sequence[str], flat: bool = False) -> grpcclient.InferInput:
    data = np.array([t.encode("utf-8") for t in texts], dtype=np.object_)
    data = data.reshape(-1) if flat else data.reshape(-1, 1)
    tensor = grpcclient.InferInput(name, list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor
