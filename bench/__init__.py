"""``python -m bench``: benchmarks of the running platform on this machine.

Gateway ``Recommend`` under load (QPS, per-stage latency quantiles) against the same pipeline
run in-process on PyTorch, encoder and ranker throughput through PyTorch, ONNX Runtime
(plain, transformer-optimised, int8) and Triton, achieved FLOP/s against the measured GEMM
peak, Milvus recall@10 against exact search, and Triton's ``perf_analyzer``. Every loop is
bounded in count and in time; results go to ``BENCHMARKS.md`` and a JSON file.
"""
