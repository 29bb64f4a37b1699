"""What the graph code refuses, and the one-line errors it says instead.

Two kinds of bad input: arguments of the search functions (`SearchInputError`: shapes, NaN, k out of range,
unknown options; a programming or data error), and a graph that cannot be built from the current run (`check_k`:
k larger than the graph, a `ConfigError` naming the knob; `NonFiniteFeatures`: diverged states).
"""

from __future__ import annotations

import numpy as np
import torch

from dcmfg.errors import ConfigError, DcmfgError


class SearchInputError(DcmfgError, ValueError):
    """Inputs to a search that cannot be right: shapes, NaN, k out of range, unknown options."""


class NonFiniteFeatures(DcmfgError):
    """Node features hold NaN/inf (diverged training or broken inputs): no graph can be built from them."""


# ---------------------------------------------------------------------------------------------- graph building


def check_finite(h: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(h).all()):
        bad = (~torch.isfinite(h)).any(1).nonzero().flatten()[:5].tolist()
        raise NonFiniteFeatures(f"{where}: node features hold NaN/inf (first rows {bad})")


def check_k(k: int, n_candidates: int, where: str) -> None:
    """k larger than the graph is a config error the user can fix; say which knob."""
    if k > n_candidates:
        raise ConfigError(
            f"graph.k={k} is larger than the graph: each node of the {where} has only {n_candidates} candidate "
            f"neighbours; lower graph.k or use more nodes (train.batch_size, a larger training split)"
        )


# ---------------------------------------------------------------------------------------------- search arguments


def matrix(x, name: str) -> torch.Tensor:
    """`x` as a detached 2-D float tensor with rows and only finite values, or SearchInputError naming `name`."""
    if not isinstance(x, torch.Tensor):
        raise SearchInputError(f"{name} must be a torch tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise SearchInputError(f"{name} must be 2-D (rows x dim), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise SearchInputError(f"{name} has no rows (shape {tuple(x.shape)})")
    if not x.is_floating_point():
        raise SearchInputError(f"{name} must be float16/float32, got {x.dtype}")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten()[:5].tolist()
        raise SearchInputError(f"{name} {tuple(x.shape)} contains {int(bad.sum())} NaN/inf values (first rows {rows})")
    return x.detach()


def matrix_pair(query, database, qname: str = "query", dname: str = "database") -> tuple[torch.Tensor, torch.Tensor]:
    """Two checked matrices of the same width, the second on the first's device."""
    q, d = matrix(query, qname), matrix(database, dname)
    if q.shape[1] != d.shape[1]:
        raise SearchInputError(
            f"{qname} {tuple(q.shape)} and {dname} {tuple(d.shape)} have different widths ({q.shape[1]} vs {d.shape[1]})"
        )
    return q, d.to(q.device)


def positive_int(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise SearchInputError(f"{name} must be a positive integer, got {k!r}")
    return int(k)


def per_row(m, n: int, name: str, device: torch.device) -> torch.Tensor:
    """One long entry per row (modality, partner, groups): shape (n,), on `device`."""
    if not isinstance(m, torch.Tensor):
        m = torch.as_tensor(m)
    if m.shape != (n,):
        raise SearchInputError(f"{name} must have shape ({n},) (one entry per row), got {tuple(m.shape)}")
    return m.to(device=device, dtype=torch.long)


def chunk_size(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise SearchInputError(f"chunk_size must be a positive integer, got {chunk!r}")
    return chunk
