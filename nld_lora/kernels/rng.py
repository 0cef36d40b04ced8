"""Counter-based random numbers keyed on (seed, position, lane, stream), identical in PyTorch and Triton.

All arithmetic is on non-negative int64 values masked to 32 bits, so wrap-around behaves the same
everywhere; the uniform has 24 random bits and lies in (0, 1].
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
C_POS = 0x9E3779B1
C_LANE = 0x85EBCA77
C_STREAM = 0xC2B2AE3D
M1 = 0x7FEB352D
M2 = 0x846CA68B
STREAM_ACCEPT = 1
STREAM_RACE = 2


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 finaliser on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * M1) & MASK32
    x = x ^ (x >> 15)
    x = (x * M2) & MASK32
    return x ^ (x >> 16)


def uniform(seed: torch.Tensor, pos: torch.Tensor, lane: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform float32 in (0, 1] for broadcastable int64 (seed, pos, lane)."""
    x = mix32(seed & MASK32)
    x = mix32(x ^ ((pos * C_POS) & MASK32))
    x = mix32(x ^ (((lane + stream * C_STREAM) * C_LANE) & MASK32))
    return ((x >> 8) + 1).to(torch.float32) * (1.0 / 16777216.0)
