"""Devices and precisions: which torch device a stage runs on and which dtype its weights take.

One place decides, so that generation, labelling, Serve and training agree: ``auto`` is fp16 on
CUDA (every GPU we target runs it at full rate) and :data:`CPU_DEFAULT` on CPU.
"""

from __future__ import annotations

import torch

from synfer_ray.errors import SynferError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Measured with benchmarks/bench_sampler.py (docs/results/benchmarks.md).
CPU_DEFAULT = "fp32"


def device_for(num_gpus: float) -> torch.device:
    """The device of an actor, replica or worker that asked Ray for ``num_gpus`` (fractions too)."""
    if num_gpus > 0:
        if not torch.cuda.is_available():
            raise SynferError("num_gpus", num_gpus, "0 on a machine without CUDA (torch sees no GPU here)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve(precision: str, device: torch.device | str, field: str = "precision") -> torch.dtype:
    """The dtype for ``precision`` on ``device``; fp16 is refused on CPU, where it is emulated and slow."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise SynferError(field, precision, f"one of {list(PRECISIONS)}")
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else CPU_DEFAULT
    if precision == "fp16" and device.type == "cpu":
        raise SynferError(field, precision, "fp32 or bf16 on CPU (fp16 is for GPUs), or auto")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SynferError(field, precision, "fp16 or fp32 on this GPU (it has no bf16)")
    return DTYPES[precision]


def name_of(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]
