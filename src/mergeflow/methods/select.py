"""Exact order statistics over data streamed in chunks (two histogram passes, no sort).

Float32 values map to 32-bit keys whose integer order is the float order. Pass 1 counts the high
16 bits, which fixes the bucket holding each requested rank; pass 2 counts the low 16 bits inside
those buckets, which fixes the exact key, i.e. the exact value. Memory: two 65 536-bin histograms
per (row, rank); never a copy of the data. Same value as ``torch.kthvalue`` on the concatenation.
Data that fits in one chunk (a small tensor's statistics) is held and selected by ``kthvalue``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch

from mergeflow.methods import chunks as _chunks

_BINS = 1 << 16
_HALF = 1 << 31


def order_keys(x: torch.Tensor) -> torch.Tensor:
    """Monotone map float32 -> int64 key in ``[0, 2³²)`` (``a < b ⇔ key(a) < key(b)``)."""
    bits = x.to(torch.float32).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + _HALF, _HALF - 1 - (bits & 0x7FFFFFFF))


def key_to_value(key: int) -> float:
    """Inverse of :func:`order_keys` for one key."""
    bits = key - _HALF if key >= _HALF else (_HALF - 1 - key) - _HALF
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def _check_ranks(ranks: Sequence[int], n: int) -> None:
    for k in ranks:
        if not 0 <= k < n:
            raise ValueError(f"rank {k} outside [0, {n})")


def select_ranks(
    chunks: Callable[[], Iterable[torch.Tensor]],
    n_rows: int,
    ranks: Sequence[int],
    hold: int | None = None,
) -> torch.Tensor:
    """Values at 0-based ascending ``ranks`` of every row of a matrix seen in column chunks.

    When the matrix has at most ``hold`` columns, the first call's chunks are kept and the
    values taken by ``torch.kthvalue`` (one pass); otherwise two histogram passes (module doc).

    Args:
        chunks: Called once or twice; each call yields ``(n_rows, m_i)`` float tensors that
            together form the ``(n_rows, N)`` matrix (same chunks in the same order both times).
        n_rows: Number of rows.
        ranks: 0-based ranks in ``[0, N)``, the same for every row.
        hold: Most columns selected in memory; default :data:`mergeflow.methods.chunks.CHUNK`.

    Returns:
        ``(n_rows, len(ranks))`` float32 tensor; entry ``[r, j]`` equals
        ``torch.kthvalue(row_r, ranks[j] + 1)``.

    Raises:
        ValueError: If a rank is outside ``[0, N)``.

    """
    hold = _chunks.CHUNK if hold is None else hold  # read at call time: tests shrink CHUNK
    stream = iter(chunks())
    held: list[torch.Tensor] = []
    n = 0
    for c in stream:
        held.append(c.reshape(n_rows, -1))
        n += held[-1].shape[1]
        if n > hold:
            break
    else:  # small: select in memory, exactly as torch.kthvalue
        _check_ranks(ranks, n)
        x = torch.cat(held, dim=1).to(torch.float32)
        return torch.stack([torch.kthvalue(x, k + 1, dim=1).values for k in ranks], dim=1)
    hi = torch.zeros(n_rows, _BINS, dtype=torch.int64)

    def count(c: torch.Tensor) -> None:
        for r in range(n_rows):
            hi[r] += torch.bincount(order_keys(c[r]) >> 16, minlength=_BINS)

    for c in held:
        count(c)
    del held
    for c in stream:
        c = c.reshape(n_rows, -1)
        n += c.shape[1]
        count(c)
    _check_ranks(ranks, n)
    cum = hi.cumsum(dim=1)
    rank_t = torch.tensor(list(ranks), dtype=torch.int64)
    # bucket b with cum[b-1] <= k < cum[b]
    bucket = torch.searchsorted(cum, rank_t.expand(n_rows, -1).contiguous(), right=True)
    before = torch.where(bucket > 0, cum.gather(1, (bucket - 1).clamp_min(0)), 0)
    lo = torch.zeros(n_rows, len(ranks), _BINS, dtype=torch.int64)
    for c in chunks():
        c = c.reshape(n_rows, -1)
        for r in range(n_rows):
            keys = order_keys(c[r])
            top = keys >> 16
            for j in range(len(ranks)):
                sel = keys[top == bucket[r, j]] & 0xFFFF
                if sel.numel():
                    lo[r, j] += torch.bincount(sel, minlength=_BINS)
    out = torch.empty(n_rows, len(ranks), dtype=torch.float32)
    for r in range(n_rows):
        for j, k in enumerate(ranks):
            inner = k - int(before[r, j])
            low = int(torch.searchsorted(lo[r, j].cumsum(0), torch.tensor(inner), right=True))
            out[r, j] = key_to_value((int(bucket[r, j]) << 16) | low)
    return out
