"""Int8 linear layers for the item tower on CPU, with one activation scale per token.

ONNX Runtime's dynamic quantisation scales a whole batch's activations by one number, so a
text's vector depends on the texts that share its batch (measured on MiniLM: up to 2.8e-2
per component), and the indexing job, the gateway's ``UpsertItems`` and a re-index would
write different vectors for one text. Here every token row gets its own scale (its largest
absolute value maps to 127) and every weight column its own; the uint8 x int8 product is
accumulated exactly in int32 and rescaled by ``MatMulIntegerToFloat`` and the row's scale.
Each row is computed from itself alone, so batching and padding cannot change a vector.

Only ``MatMul`` nodes with a 2-D float initializer as their weight are rewritten (a BERT's
query, key, value, attention output and both feed-forward layers); attention scores, softmax,
layer norms and pooling stay fp32. Rows quantised for one input are shared by every layer
that reads it (query, key and value read the same hidden states).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"  # MatMulIntegerToFloat is an ONNX Runtime contrib op
_PREFIX = "rowq/"


def _weight(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The MatMul's constant 2-D float weight, or None when it multiplies two activations."""
    if node.op_type != "MatMul" or node.input[1] not in initializers:
        return None
    tensor = initializers[node.input[1]]
    if len(tensor.dims) != 2 or tensor.data_type != TensorProto.FLOAT:
        return None
    return numpy_helper.to_array(tensor)


def quantize_rowwise(src: Path, out: Path) -> int:
    """Write ``src`` to ``out`` with its weight MatMuls in int8 (module doc); returns how many
    were rewritten. Raises ``ValueError`` when the graph has none."""
    model = onnx.load(str(src))
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    constants: dict[str, np.ndarray] = {
        "eps": np.array(1e-8, np.float32),  # an all-zero row keeps a finite scale
        "127": np.array(127.0, np.float32),
        "offset": np.array(128.5, np.float32),  # uint8 zero point 128; +0.5 as Cast truncates
        "one": np.array(1.0, np.float32),
        "zero_point": np.array(128, np.uint8),
        "axes": np.array([-1], np.int64),
    }
    new_inits = [numpy_helper.from_array(v, _PREFIX + k) for k, v in constants.items()]
    c = {k: _PREFIX + k for k in constants}
    nodes: list[onnx.NodeProto] = []
    rows: dict[str, tuple[str, str]] = {}  # activation -> (its uint8 rows, their scales)
    rewritten = 0
    for node in graph.node:
        weight = _weight(node, initializers)
        if weight is None:
            nodes.append(node)
            continue
        x = node.input[0]
        if x not in rows:
            p = f"{_PREFIX}x{len(rows)}/"
            reduce = (
                helper.make_node("ReduceMax", [p + "abs", c["axes"]], [p + "max"], keepdims=1)
                if opset >= 18  # axes became an input in opset 18
                else helper.make_node("ReduceMax", [p + "abs"], [p + "max"], axes=[-1], keepdims=1)
            )
            nodes += [
                helper.make_node("Abs", [x], [p + "abs"]),
                reduce,
                helper.make_node("Max", [p + "max", c["eps"]], [p + "range"]),
                helper.make_node("Div", [p + "range", c["127"]], [p + "scale"]),
                helper.make_node("Div", [c["127"], p + "range"], [p + "inverse"]),
                helper.make_node("Mul", [x, p + "inverse"], [p + "scaled"]),
                helper.make_node("Add", [p + "scaled", c["offset"]], [p + "shifted"]),
                helper.make_node("Cast", [p + "shifted"], [p + "q"], to=TensorProto.UINT8),
            ]
            rows[x] = (p + "q", p + "scale")
        q, scale = rows[x]
        columns = np.maximum(np.abs(weight).max(axis=0), 1e-12) / 127.0
        p = f"{_PREFIX}w{rewritten}/"
        new_inits += [
            numpy_helper.from_array(
                np.clip(np.round(weight / columns), -127, 127).astype(np.int8), p + "int8"
            ),
            numpy_helper.from_array(columns.astype(np.float32), p + "scales"),
        ]
        nodes += [
            helper.make_node(
                "MatMulIntegerToFloat",
                [q, p + "int8", c["one"], p + "scales", c["zero_point"]],
                [p + "product"],
                domain=MS_DOMAIN,
            ),
            helper.make_node("Mul", [p + "product", scale], [node.output[0]]),
        ]
        rewritten += 1
    if not rewritten:
        raise ValueError(f"{src}: no MatMul with a constant 2-D float weight to quantise")
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for t in new_inits if t.name in used])
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    return rewritten
