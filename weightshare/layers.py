"""Layers that sharing is measured against.

``LocallyConnected2d`` has a convolution's shape without its sharing: every
output position has its own kernel.  It is the unshared contrast to
``nn.Conv2d`` (one kernel shared by all positions) in ``bench digits-arch``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LocallyConnected2d"]


class LocallyConnected2d(nn.Module):
    """y[b, o, p] = Σ_k W[p, o, k] · patch_p(x)[b, k] + bias[o, p]: a kernel per output position p."""

    def __init__(self, in_channels: int, out_channels: int, input_size: tuple[int, int], kernel_size: int,
                 padding: int = 0, stride: int = 1, bias: bool = True):
        super().__init__()
        h, w = input_size
        self.out_size = ((h + 2 * padding - kernel_size) // stride + 1, (w + 2 * padding - kernel_size) // stride + 1)
        if min(self.out_size) < 1:
            raise ValueError(f"LocallyConnected2d: kernel {kernel_size} does not fit input {input_size} "
                             f"with padding {padding}")
        self.kernel_size, self.padding, self.stride = kernel_size, padding, stride
        positions, fan_in = self.out_size[0] * self.out_size[1], in_channels * kernel_size * kernel_size
        bound = 1 / math.sqrt(fan_in)  # as nn.Conv2d initialises each kernel
        self.weight = nn.Parameter(torch.empty(positions, out_channels, fan_in).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(out_channels, positions).uniform_(-bound, bound)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)  # (B, fan_in, positions)
        out = torch.einsum("bkp,pok->bop", cols, self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(x.shape[0], -1, *self.out_size)
