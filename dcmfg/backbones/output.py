"""What every encoder returns."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EncoderOutput:
    globals: torch.Tensor  # (B, D) float32
    tokens: torch.Tensor  # (B, T, D) float32: image regions or text words
    mask: torch.Tensor  # (B, T) bool: True for real tokens (all True for images)


def plain(out: EncoderOutput) -> EncoderOutput:
    """Copies made outside inference mode: inference tensors would fail later in any autograd-tracked use."""
    return EncoderOutput(out.globals.clone(), out.tokens.clone(), out.mask.clone())


def pool_grid(patches: torch.Tensor, grid: tuple[int, int], regions: int) -> torch.Tensor:
    """(B, h*w, D) patch tokens -> (B, r*r, D) by average pooling to an r x r grid (row-major)."""
    b, _, d = patches.shape
    x = patches.transpose(1, 2).reshape(b, d, grid[0], grid[1])
    x = torch.nn.functional.adaptive_avg_pool2d(x, regions)
    return x.flatten(2).transpose(1, 2).contiguous()
