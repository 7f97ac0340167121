"""Meta-training checkpoints: one safetensors file, written atomically, never unpickled.

A checkpoint is a tree of dicts, lists, tuples, JSON scalars and tensors (θ, the meta-optimizer's
``state_dict``, RNG states, in-flight inner runs). :func:`flatten` splits it into a JSON tree, in
which each tensor is replaced by ``{"__tensor__": key}``, and a flat dict of tensors; both go into
one ``.safetensors`` file (the JSON in its metadata) with a SHA-256 over everything else the file
holds (every metadata entry, the JSON tree included, and every tensor's name, dtype, shape and
bytes), so a torn, corrupted or edited file is detected on load and reported, never silently used.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from learned_opt.fileio import atomic_write_bytes

FORMAT = "learned_opt.meta_checkpoint"
VERSION = 2  # 2: the digest covers the metadata (RNG states, step, counters), not only tensors
CHECKPOINT_NAME = "checkpoint.safetensors"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: corrupt, truncated, or not a checkpoint."""


class OutputWriteError(CheckpointError, OSError):
    """Writing a checkpoint or another output failed (disk full, permissions); the last checkpoint is
    intact. A ValueError for the command lines' one-line errors, an OSError for callers catching those."""


@contextmanager
def output_write_errors(path: str | os.PathLike[str]) -> Iterator[None]:
    """Turn an OSError raised while writing ``path`` into an :class:`OutputWriteError` naming it."""
    try:
        yield
    except OutputWriteError:
        raise
    except OSError as exc:
        raise OutputWriteError(f"cannot write {path}: {exc.strerror or exc}; the run's last checkpoint is intact: "
                               "free space (or fix permissions), then continue with --resume") from exc


def flatten(obj: Any, tensors: dict[str, Tensor], prefix: str = "t") -> Any:
    """JSON-able copy of ``obj`` with tensors moved (cloned to CPU) into ``tensors``."""
    if isinstance(obj, Tensor):
        key = f"{prefix}#{len(tensors)}"
        tensors[key] = obj.detach().to("cpu", copy=True).contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and "__tensor__" not in obj and "__items__" not in obj:
            return {k: flatten(v, tensors, f"{prefix}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, flatten(v, tensors, f"{prefix}.{i}")] for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a value of type {type(obj).__name__} at {prefix}")


def unflatten(tree: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(unflatten(v, tensors) for v in tree["__tuple__"])
        if "__items__" in tree:
            return {k: unflatten(v, tensors) for k, v in tree["__items__"]}
        return {k: unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    return tree


def _digest(meta: dict[str, str], tensors: dict[str, Tensor]) -> str:
    """SHA-256 over every metadata entry but the digest itself, then every tensor; each part is
    length-prefixed, so no edit can move bytes from one part to another unnoticed."""
    h = hashlib.sha256()
    for key in sorted(k for k in meta if k != "sha256"):
        h.update(f"{len(key)}:{key}={len(meta[key])}:".encode())
        h.update(meta[key].encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{len(key)}:{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def encode(payload: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint file holding ``payload``."""
    tensors: dict[str, Tensor] = {}
    tree = flatten(payload, tensors)
    meta = {"format": FORMAT, "version": str(VERSION), "tree": json.dumps(tree)}
    return st_save(tensors, metadata={**meta, "sha256": _digest(meta, tensors)})


def decode(data: bytes, source: str | os.PathLike[str] = "<bytes>") -> dict[str, Any]:
    """The payload of checkpoint bytes; :class:`CheckpointError` if they are not a sound checkpoint."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        meta = header.get("__metadata__") or {}
        tensors = st_load(data)
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise TypeError("metadata is not a table of strings")
    except Exception as exc:  # safetensors raises its own error type, which moved between versions
        raise CheckpointError(f"{source}: not a readable checkpoint (corrupt or truncated): {exc}") from exc
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not a learned_opt meta-training checkpoint (format {meta.get('format')!r})")
    if meta.get("version") != str(VERSION):
        raise CheckpointError(f"{source}: checkpoint version {meta.get('version')!r}, this code reads {VERSION}")
    if meta.get("sha256") != _digest(meta, tensors):
        raise CheckpointError(f"{source}: checkpoint checksum mismatch (file corrupted)")
    try:
        return unflatten(json.loads(meta["tree"]), tensors)
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{source}: checkpoint structure is damaged: {exc}") from exc


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` atomically: a crash or a failed write (:class:`OutputWriteError`) leaves the
    previous checkpoint or this one."""
    data = encode(payload)
    with output_write_errors(path):
        return atomic_write_bytes(path, data)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    return decode(data, path)


def remove_stale_temp_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Delete temp files an interrupted atomic write left in ``directory`` (names ``.NAME.*.tmp``)."""
    removed = []
    for p in Path(directory).glob(".*.tmp"):
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed
