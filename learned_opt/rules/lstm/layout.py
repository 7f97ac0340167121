"""What the LSTM's three execution paths share: the state layout, the at-rest test and pinning.

State layout. Per parameter ``h`` and ``c`` are shaped ``param.shape + (L, H)`` but stored
feature-major: memory laid out as ``(L, H, *param.shape)`` and presented permuted, so that
:func:`feature_rows` views them as ``(L·H, numel)`` rows and element-wise work runs over contiguous
rows. A chunk of ``n`` coordinates is then a block of ``n`` columns.

At rest. A coordinate is at rest when its gradient is zero and its state is exactly the
reference's (the zero-gradient trajectory from a fresh state, kept in the group state); it is
pinned to the reference's new state and a zero step, bit for bit (batched matmuls are not bitwise
batch-size invariant). :func:`at_rest` is the one test, :func:`pin_` the in-place pinning;
:class:`Reference` the per-dtype/device constants both need.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from learned_opt.rules.chunks import Segment, concat, state_dtype


def zero_state(shape: torch.Size | tuple[int, ...], num_layers: int, hidden_size: int, like: Tensor) -> Tensor:
    """Zeros shaped ``shape + (L, H)``, laid out feature-major, in ``like``'s state dtype and device."""
    zeros = torch.zeros((num_layers, hidden_size, *shape), dtype=state_dtype(like), device=like.device)
    return from_feature_rows(zeros, len(shape))


def feature_rows(state: Tensor) -> Tensor:
    """A ``(*shape, L, H)`` state as ``(L·H, numel)`` rows: a view when it is laid out feature-major
    (as ``init_state`` and the fast path make it), else a copy (e.g. a state loaded from a
    contiguous checkpoint)."""
    ndim = state.dim() - 2
    rows = state.permute(ndim, ndim + 1, *range(ndim))
    return rows.contiguous().view(state.shape[-2] * state.shape[-1], -1)


def from_feature_rows(rows: Tensor, ndim: int) -> Tensor:
    """``(L, H, *shape)`` memory presented as the state's ``(*shape, L, H)`` (a permuted view)."""
    return rows.permute(*range(2, ndim + 2), 0, 1)


def rows_to_state(rows: Tensor, num_layers: int, hidden_size: int, shape: torch.Size) -> Tensor:
    """``(L·H, numel)`` rows as a parameter's ``(*shape, L, H)`` state (feature-major)."""
    return from_feature_rows(rows.reshape(num_layers, hidden_size, *shape), len(shape))


def gather_columns(rows: Sequence[Tensor], segments: Sequence[Segment]) -> Tensor:
    """A chunk's columns of ``(L·H, numel)`` row blocks: a view when it is one slice of one tensor."""
    return concat([rows[i][:, a:b] for i, a, b in segments], dim=1)


def dense_at_rest(device: torch.device) -> bool:
    """Whether the at-rest test runs dense (no host sync: GPUs) or on zero-gradient indices (CPU)."""
    return device.type != "cpu"


def at_rest(g: Tensor, h: Sequence[Tensor], c: Tensor, ref_h: Tensor, ref_c: Tensor, *, dense: bool) -> Tensor:
    """A chunk's coordinates at rest: zero gradient and exactly the reference state.

    ``g``: (n,); ``h``: blocks of rows of the (L·H, n) hidden state; ``c``: (L·H, n) rows;
    ``ref_h``, ``ref_c``: (L·H, 1). ``dense`` returns a mask (n,); otherwise their indices, read
    only from zero-gradient columns and dropping those whose first cell-state row already differs
    before the full test (cheap on a CPU, but a host sync).
    """
    if dense:
        rest = (g == 0) & (c == ref_c).all(0)
        for rows, ref in _blocks(h, ref_h):
            rest &= (rows == ref).all(0)
        return rest
    idx = (g == 0).nonzero().squeeze(1)
    if idx.numel():
        idx = idx[c[0, idx] == ref_c[0]]
    if idx.numel():
        keep = (c[:, idx] == ref_c).all(0)
        for rows, ref in _blocks(h, ref_h):
            keep &= (rows[:, idx] == ref).all(0)
        idx = idx[keep]
    return idx


def _blocks(h: Sequence[Tensor], ref_h: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Each block of ``h``'s rows with the matching rows of ``ref_h``."""
    pairs, pos = [], 0
    for rows in h:
        pairs.append((rows, ref_h[pos : pos + rows.shape[0]]))
        pos += rows.shape[0]
    return pairs


def pin_(rest: Tensor, u: Tensor, h_new: Tensor, c_new: Tensor, new_ref_h: Tensor, new_ref_c: Tensor) -> None:
    """In place: coordinates ``rest`` (a mask or indices, from :func:`at_rest`) take a zero update
    and the reference's new state ``new_ref_h``/``new_ref_c`` (L·H, 1), exactly."""
    if rest.dtype == torch.bool:
        u.masked_fill_(rest, 0.0)
        h_new.copy_(torch.where(rest, new_ref_h, h_new))
        c_new.copy_(torch.where(rest, new_ref_c, c_new))
    elif rest.numel():
        u[rest] = 0.0
        h_new[:, rest] = new_ref_h
        c_new[:, rest] = new_ref_c


@dataclass(frozen=True)
class Reference:
    """The reference coordinate on one dtype/device: its output ``out`` (1,), its state ``h``,
    ``c`` and its new state ``new_h``, ``new_c``, all as (L·H, 1) columns."""

    out: Tensor
    h: Tensor
    c: Tensor
    new_h: Tensor
    new_c: Tensor


def references(step: tuple[Tensor, Tensor, Tensor], group_state: Mapping[str, Tensor]) -> Callable[[Tensor], Reference]:
    """``like -> Reference`` on ``like``'s dtype/device (memoised), from ``step`` (the reference's
    output and new h, c from ``LSTMCore.reference_step``) and the group's ``ref_h``/``ref_c``."""
    cache: dict[tuple[torch.dtype, torch.device], Reference] = {}

    def on(like: Tensor) -> Reference:
        key = (like.dtype, like.device)
        if key not in cache:
            opts = {"dtype": like.dtype, "device": like.device}
            out, new_h, new_c = (t.to(**opts) for t in step)
            cache[key] = Reference(out=out, h=group_state["ref_h"].to(**opts).reshape(-1, 1),
                                   c=group_state["ref_c"].to(**opts).reshape(-1, 1),
                                   new_h=new_h.reshape(-1, 1), new_c=new_c.reshape(-1, 1))
        return cache[key]

    return on


def collect(
    params: Sequence[Tensor],
    per_param: Sequence[Mapping[str, Tensor]],
    results: Sequence[tuple[Tensor, Tensor, Tensor] | None],
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """The updates (in each parameter's shape and dtype) and new per-parameter states from each
    parameter's ``(update, h, c)``; ``None`` (a zero-element parameter) keeps its state."""
    updates, new_per_param = [], []
    for p, st, result in zip(params, per_param, results):
        if result is None:
            updates.append(torch.zeros_like(p))
            new_per_param.append(dict(st))
            continue
        u, h, c = result
        updates.append(u.reshape(p.shape).to(p.dtype))
        new_per_param.append({"h": h, "c": c})
    return updates, new_per_param


def new_group(group_state: Mapping[str, Tensor], new_ref_h: Tensor, new_ref_c: Tensor) -> dict[str, Tensor]:
    """The group state with the reference's new ``(1, L, H)`` state."""
    group = dict(group_state)
    group["ref_h"] = new_ref_h.squeeze(0)
    group["ref_c"] = new_ref_c.squeeze(0)
    return group


def split_chunk(segments: Sequence[Segment], results: Sequence[tuple[Tensor, int]]) -> list[tuple[int, tuple[Tensor, ...]]]:
    """A chunk's results split back into its segments: per segment its parameter's index and the
    piece of each ``(tensor, dim)`` in ``results`` (coordinates along ``dim``)."""
    sizes = [b - a for _, a, b in segments]
    split = [t.split(sizes, dim) for t, dim in results]
    return [(i, tuple(s[k] for s in split)) for k, (i, _, _) in enumerate(segments)]
