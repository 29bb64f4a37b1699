"""What every metric takes, checked once: embeddings or hash codes, multi-hot labels, and the switches.

`_prepare(query, database, query_labels, database_labels, distance)` turns the four arrays (anything
`torch.as_tensor` reads) into a `_Prepared` on the query's device:

    query (Q, D), database (N, D)  float32; unit rows for distance="cosine", +-1 for distance="hamming"
                                   (hash codes may come as {-1,+1} or {0,1}, any dtype, or bool)
    query_labels (Q, C), database_labels (N, C)  float32 0/1 (multi-hot; bool accepted)

Anything that cannot be right (not 2-D, no rows, mismatched rows or widths, NaN/inf, non-binary codes or labels,
float embeddings missing for cosine) raises `MetricInputError` with one line naming the argument and its shape.
`_check_choice` and `_check_ks` check the string switches and the lists of K the same way. `DEFAULT_KS` are the K
at which P, R and NDCG are reported unless the caller names others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dcmfg.errors import DcmfgError

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 50, 100, 500, 1000, 5000)


class MetricInputError(DcmfgError, ValueError):
    """Inputs to a metric that cannot be right: mismatched shapes, NaN, non-binary codes or labels."""


@dataclass(frozen=True)
class _Prepared:
    query: torch.Tensor  # (Q, D) float32: unit rows for cosine, +-1 for hamming
    database: torch.Tensor  # (N, D)
    query_labels: torch.Tensor  # (Q, C) float32 0/1
    database_labels: torch.Tensor  # (N, C)
    distance: str

    @property
    def n_query(self) -> int:
        return self.query.shape[0]

    @property
    def n_database(self) -> int:
        return self.database.shape[0]

    @property
    def device(self) -> torch.device:
        return self.query.device


def _as_tensor(x, name: str, device: torch.device | None = None) -> torch.Tensor:
    try:
        t = torch.as_tensor(x)
    except Exception as exc:  # noqa: BLE001 - report what the argument was
        raise MetricInputError(f"{name}: cannot convert {type(x).__name__} to a tensor ({exc})") from None
    if device is not None:
        t = t.to(device)
    return t


def _check_2d(t: torch.Tensor, name: str) -> None:
    if t.ndim != 2:
        raise MetricInputError(f"{name} must be 2-D (rows x columns), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise MetricInputError(f"{name} has no rows (shape {tuple(t.shape)})")


def _check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            rows = torch.nonzero(bad.any(dim=1)).flatten()[:5].tolist()
            raise MetricInputError(
                f"{name} {tuple(t.shape)} contains {int(bad.sum())} NaN/inf values (first rows {rows})"
            )


def _binary_codes(t: torch.Tensor, name: str) -> torch.Tensor:
    """{-1,+1} or {0,1} codes (any dtype) -> float32 +-1."""
    if t.dtype == torch.bool:
        return t.float() * 2 - 1
    plus_minus = bool(((t == 1) | (t == -1)).all())
    if plus_minus:
        return t.float()
    zero_one = bool(((t == 0) | (t == 1)).all())
    if zero_one:
        return t.float() * 2 - 1
    bad = t[(t != 1) & (t != -1) & (t != 0)]
    example = bad[:3].tolist() if bad.numel() else "a mix of -1 and 0"
    raise MetricInputError(
        f"{name} {tuple(t.shape)}: hash codes must be binary, all in {{-1,+1}} or all in {{0,1}}; "
        f"found {example} (apply torch.sign to real-valued outputs first)"
    )


def _labels(x, name: str, rows: int, rows_name: str, device: torch.device) -> torch.Tensor:
    t = _as_tensor(x, name, device)
    if t.ndim == 1:
        raise MetricInputError(
            f"{name} must be 2-D multi-hot (rows x labels), got shape {tuple(t.shape)}; "
            "for single-label data pass one-hot rows"
        )
    _check_2d(t, name)
    if t.shape[0] != rows:
        raise MetricInputError(f"{name} has {t.shape[0]} rows {tuple(t.shape)} but {rows_name} has {rows} rows")
    if t.dtype == torch.bool:
        return t.float()
    _check_finite(t, name)
    if not bool(((t == 0) | (t == 1)).all()):
        raise MetricInputError(f"{name} {tuple(t.shape)} must be multi-hot 0/1 label vectors")
    return t.float()


def _prepare(query, database, query_labels, database_labels, distance: str) -> _Prepared:
    if distance not in ("cosine", "hamming"):
        raise MetricInputError(f"distance must be 'cosine' or 'hamming', got {distance!r}")
    q = _as_tensor(query, "query")
    d = _as_tensor(database, "database", q.device)
    _check_2d(q, "query")
    _check_2d(d, "database")
    if q.shape[1] != d.shape[1]:
        raise MetricInputError(
            f"query {tuple(q.shape)} and database {tuple(d.shape)} have different widths ({q.shape[1]} vs {d.shape[1]})"
        )
    ql = _labels(query_labels, "query_labels", q.shape[0], "query", q.device)
    dl = _labels(database_labels, "database_labels", d.shape[0], "database", q.device)
    if ql.shape[1] != dl.shape[1]:
        raise MetricInputError(
            f"query_labels {tuple(ql.shape)} and database_labels {tuple(dl.shape)} have different label widths "
            f"({ql.shape[1]} vs {dl.shape[1]})"
        )
    if distance == "hamming":
        q, d = _binary_codes(q, "query"), _binary_codes(d, "database")
    else:
        if not q.is_floating_point() or not d.is_floating_point():
            raise MetricInputError(
                f"cosine distance needs float embeddings, got query {q.dtype} and database {d.dtype} "
                "(pass distance='hamming' for hash codes)"
            )
        _check_finite(q, "query")
        _check_finite(d, "database")
        q = torch.nn.functional.normalize(q.float(), dim=1)
        d = torch.nn.functional.normalize(d.float(), dim=1)
    return _Prepared(q.contiguous(), d.contiguous(), ql, dl, distance)


def _check_choice(value, name: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise MetricInputError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_ks(ks: Iterable[int | None], name: str, allow_none: bool = False) -> list[int | None]:
    out: list[int | None] = []
    for k in ks:
        if k is None and allow_none:
            out.append(None)
            continue
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise MetricInputError(f"{name} must hold positive integers{' or None' if allow_none else ''}, got {k!r}")
        out.append(int(k))
    if not out:
        raise MetricInputError(f"{name} is empty")
    return out
