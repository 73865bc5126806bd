"""Triton python-backend model for the sequence recommender (see ``config.pbtxt``).

One request is one user: ``items`` (ids as strings) with ``tokens``, ``gaps`` and ``ranks``
per event, oldest first, and ``candidates`` (ids) to score. Ids are mapped to the model's
vocabulary (``items.json``, model index = position + 1); history events on ids the model does
not know are dropped, and unknown candidates score as a new item without content (index 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

HISTORY = ("items", "tokens", "gaps", "ranks")


class TritonPythonModel:
    """Runs ``<version>/model.onnx`` on one user's events per request."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        version_dir = Path(args["model_repository"]) / args["model_version"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(version_dir / "model.onnx"), options, providers=["CPUExecutionProvider"]
        )
        self.length = int(self.session.get_inputs()[0].shape[1])
        ids = json.loads((version_dir / "items.json").read_text())
        self.ids = np.array(["", *ids], dtype=object)
        self.index = {item.encode(): n + 1 for n, item in enumerate(ids)}

    def _inputs(self, request) -> dict[str, np.ndarray]:  # request: Triton's InferenceRequest
        get = pb_utils.get_input_tensor_by_name
        raw = {name: get(request, name).as_numpy().reshape(-1) for name in HISTORY}
        items = np.array([self.index.get(bytes(i), 0) for i in raw["items"]], dtype=np.int64)
        known = items > 0
        feeds = {}
        for name in HISTORY:
            values = items[known] if name == "items" else raw[name].astype(np.int64)[known]
            values = values[-self.length :]
            row = np.zeros((1, self.length), dtype=np.int64)  # left padding
            row[0, self.length - len(values) :] = values
            feeds[name] = row
        candidates = get(request, "candidates").as_numpy().reshape(-1)
        feeds["candidates"] = np.array(
            [[self.index.get(bytes(c), 0) for c in candidates]], dtype=np.int64
        ).reshape(1, -1)
        return feeds

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                feeds = self._inputs(request)
                user, top, top_scores, scores = self.session.run(None, feeds)
            except Exception as exc:  # any failure is this request's error
                error = pb_utils.TritonError(f"sequence_recommender: {exc}")
                responses.append(pb_utils.InferenceResponse(error=error))
                continue
            finite = np.isfinite(top_scores[0])
            tensors = [
                pb_utils.Tensor("user_vector", user[0].astype(np.float32)),
                pb_utils.Tensor("top_items", self.ids[top[0][finite]].astype(np.object_)),
                pb_utils.Tensor("top_scores", top_scores[0][finite].astype(np.float32)),
                pb_utils.Tensor("candidate_scores", scores[0].astype(np.float32)),
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
