"""Batching helpers for coordinate-wise rules: pack a group's coordinates into bounded chunks.

A coordinate-wise rule (one small network shared by every coordinate) runs fastest as a few large
batched calls, yet its temporary memory must stay bounded. :func:`plan_chunks` packs small tensors
together and splits large ones so each chunk holds at most ``chunk_size`` coordinates of one
dtype/device; :func:`gather` reads a chunk's rows from the flattened tensors (a view when the
chunk is one slice of one tensor). :func:`cast_parameters` gives θ on a chunk's dtype/device, so
the rule module itself may stay on the CPU.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
from torch import Tensor, nn

# (tensor index, start, stop) over the tensor's flattened coordinates.
Segment = tuple[int, int, int]


def plan_chunks(sizes: Sequence[int], kinds: Sequence[Hashable], chunk_size: int) -> list[list[Segment]]:
    """Chunks of at most ``chunk_size`` coordinates, in order; a chunk holds one kind only.

    ``sizes[i]`` is tensor ``i``'s number of coordinates and ``kinds[i]`` its kind (e.g. its
    ``(dtype, device)``). Zero-size tensors appear in no chunk; no chunk is empty.
    """
    if chunk_size < 1:
        raise ValueError(f"invalid chunk_size: {chunk_size!r} (must be >= 1)")
    chunks: list[list[Segment]] = []
    filled = chunk_size  # forces a new chunk for the first coordinates
    kind: Hashable = object()
    for idx, (n, this_kind) in enumerate(zip(sizes, kinds)):
        start = 0
        while start < n:
            if filled == chunk_size or this_kind != kind:
                chunks.append([])
                filled = 0
                kind = this_kind
            take = min(n - start, chunk_size - filled)
            chunks[-1].append((idx, start, start + take))
            filled += take
            start += take
    return chunks


def gather(flat: Sequence[Tensor], segments: Sequence[Segment]) -> Tensor:
    """The chunk's rows of the flattened tensors ``flat``: a view when it is one slice of one tensor."""
    return concat([flat[i][a:b] for i, a, b in segments])


def concat(pieces: Sequence[Tensor], dim: int = 0) -> Tensor:
    """``torch.cat`` along ``dim`` that returns a lone piece itself (no copy)."""
    return pieces[0] if len(pieces) == 1 else torch.cat(list(pieces), dim=dim)


def cast_parameters(module: nn.Module, like: Tensor, cache: dict[tuple, dict[str, Tensor]]) -> dict[str, Tensor]:
    """``module``'s named parameters on ``like``'s dtype and device (differentiable casts, memoised in ``cache``)."""
    key = (like.dtype, like.device)
    if key not in cache:
        cache[key] = {k: v.to(dtype=like.dtype, device=like.device) for k, v in module.named_parameters()}
    return cache[key]


def state_dtype(p: Tensor) -> torch.dtype:
    """A coordinate-wise rule's state dtype: the parameter's own floating dtype (float64 stays float64)."""
    return p.dtype if p.is_floating_point() else torch.get_default_dtype()
