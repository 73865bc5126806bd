"""bf16 products for training's BERT encoding passes, where the CPU has bf16 instructions.

The catalogue vectors (``training.train.CatalogueVectors``) and hard-negative mining encode
thousands of texts with the trained towers. On a CPU with AVX-512 BF16 or AMX, PyTorch's bf16
matrix products (fp32 accumulation, under ``torch.autocast``) encoded MovieLens' catalogue
in 17.1 s against 36.2 s in fp32 (two quiet ``make train`` runs on an AMD EPYC host, where
MKL's fp32 is slow), at a cosine of 0.99998 to it: about what the served towers compute
there too (``model_repository/item_encoder/model.py``, engine ``auto``).
Without those instructions PyTorch emulates bf16, slower than fp32 (47 against 254 GFLOP/s
on an earlier Intel host), so the check reads the CPU's flags, not PyTorch's support.
Training itself (the gradient steps) stays in fp32.
"""

from __future__ import annotations

from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")


def cpu_has_bf16(cpuinfo: Path = CPUINFO) -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 BF16 or AMX), by the kernel's flags."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def use_bf16(allowed: bool, device: torch.device | str) -> bool:
    """Whether an encoding pass on ``device`` runs bf16 products: where ``allowed``, on a CPU
    with bf16 instructions; fp32 elsewhere (a GPU pass stays as it is)."""
    return allowed and torch.device(device).type == "cpu" and cpu_has_bf16()
