"""Generate ``recsys_client._pb`` from ``proto/recsys/v1/recommender.proto`` (never edit them).

protoc names the messages' import ``recsys.v1``; the client must not put directories on
``sys.path``, so the one generated cross-import is rewritten to the package path. The
descriptor keeps its file name ``recsys/v1/recommender.proto``, so these stubs and the
gateway's (``services.api``, generated from the same file) share one descriptor-pool entry.

Run: python clients/python/generate_stubs.py  (needs grpcio-tools; make client-proto)
"""

from __future__ import annotations

import importlib.resources
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
PROTO_ROOT = HERE.parents[1] / "proto"
PROTO = "recsys/v1/recommender.proto"
OUT = HERE / "src" / "recsys_client" / "_pb"
GENERATED = ("recommender_pb2.py", "recommender_pb2.pyi", "recommender_pb2_grpc.py")
IMPORT_FROM, IMPORT_TO = "from recsys.v1 import", "from recsys_client._pb import"


def generate(proto_root: Path = PROTO_ROOT, out: Path = OUT) -> list[Path]:
    """Run protoc into a scratch directory and move the rewritten stubs into ``out``."""
    includes = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{proto_root}",
            f"-I{includes}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            PROTO,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto_root / PROTO}")
        written = []
        for name in GENERATED:
            text = (Path(tmp) / "recsys" / "v1" / name).read_text()
            target = out / name
            target.write_text(text.replace(IMPORT_FROM, IMPORT_TO))
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate():
        print(f"generated {path}", file=sys.stderr)
