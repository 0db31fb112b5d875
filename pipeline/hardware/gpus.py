"""Peak dense bf16 TFLOP/s (FP32 accumulate) and memory of the GPUs the profiles and the benchmark name, for MFU and
for scaling a measured speed to another card. Figures from the vendors' data sheets as ANCHORS.md lists them
(GeForce cards run FP32-accumulate matmuls at half their FP16-accumulate rate)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gpu:
    name: str
    match: tuple[str, ...]       # lower-case pieces of torch.cuda.get_device_name() that identify it
    bf16_tflops: float
    memory_gib: float


GPUS = (
    Gpu("RTX 4090", ("4090",), 165.0, 24),
    Gpu("RTX 5090", ("5090",), 209.5, 32),
    Gpu("A100", ("a100",), 312.0, 80),
    Gpu("H100", ("h100",), 989.0, 80),
    Gpu("H200", ("h200",), 989.0, 141),
)


def find(device_name: str) -> Gpu | None:
    """The table's entry for a device name as torch reports it (``NVIDIA H200``, ``NVIDIA GeForce RTX 4090``)."""
    low = device_name.lower()
    return next((g for g in GPUS if any(m in low for m in g.match)), None)
