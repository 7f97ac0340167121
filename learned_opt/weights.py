"""Rule weights on disk: ``NAME.safetensors`` (θ) + ``NAME.json`` (the card), never pickle.

The card records what the weights are and where they came from::

    format_version  int, currently 1
    name            the weights' name (a shipped name for files under learned_opt/pretrained/)
    rule            registry name of the Rule (``build_rule(rule, rule_config)`` rebuilds it)
    rule_config     the Rule's ``config()``
    sha256          hex digest of the .safetensors file
    created         UTC ISO-8601 timestamp
    meta_training   config, seed, steps, wall time, machine, command — whatever the trainer records
    metrics         figures, each with the command and results file that produced them

Loading checks everything and names the file and the mismatch: a missing file, a card that is
not JSON or lacks a field, a sha256 that does not match (tampered or truncated weights), weights
that are not valid safetensors, and tensor names/shapes that disagree with the rule and config.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

# Registers every rule in RULES, so cards naming any of them load.
import learned_opt.rules  # noqa: F401
from learned_opt.fileio import atomic_write_bytes, atomic_write_json
from learned_opt.rules.base import Rule, build_rule

FORMAT_VERSION = 1
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
# Names the project promises to ship (meta-trained by the quality work); until a file exists under
# PRETRAINED_DIR, asking for one raises an error saying it is not shipped yet.
PLANNED_NAMES = (
    "default",
    "lstm-general",
    "l2l-mnist",
    "grad-norm-decay-sgd",
    "hypergradient-sgd",
    "hypergradient-adam",
    "learnable-adam",
    "learnable-sgd",
)
CARD_FIELDS = ("format_version", "name", "rule", "rule_config", "sha256", "created", "meta_training", "metrics")


class NotShippedError(FileNotFoundError):
    """A planned pretrained name whose weights are not in this release."""


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _paths(path: str | Path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header's keys sorted, so equal tensors and
    metadata give byte-equal files (safetensors writes its metadata in hash-map order, which
    varies between processes) and hence an equal sha256. Offsets and tensor bytes are unchanged."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the tensor data to 8 bytes
    return len(text).to_bytes(8, "little") + text + data[8 + n :]


def save_weights(
    rule: Rule,
    path: str | Path,
    *,
    name: str,
    meta_training: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``rule``'s θ to ``PATH.safetensors`` and its card to ``PATH.json``, atomically.

    ``path`` may end in ``.safetensors`` or have no suffix. Returns the ``.safetensors`` path.
    The weights are written first, so a card never points at weights that are not on disk.
    """
    weights_path, card_path = _paths(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in rule.state_dict().items()}
    data = canonical_safetensors(st_save(tensors, metadata={"rule": rule.name, "format_version": str(FORMAT_VERSION)}))
    atomic_write_bytes(weights_path, data)
    card = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "rule": rule.name,
        "rule_config": rule.config(),
        "sha256": hashlib.sha256(data).hexdigest(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "meta_training": dict(meta_training),
        "metrics": dict(metrics or {}),
    }
    atomic_write_json(card_path, card)
    return weights_path


def list_pretrained() -> list[str]:
    """Names of the weights shipped with this install (those with a file under pretrained/)."""
    return sorted(p.stem for p in PRETRAINED_DIR.glob("*.safetensors") if p.with_suffix(".json").exists())


def resolve_weights(name_or_path: str | Path) -> Path:
    """The ``.safetensors`` path of a shipped name or a user path; clear errors otherwise."""
    text = str(name_or_path)
    looks_like_path = isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.endswith(".safetensors")
    if not looks_like_path:
        if text in list_pretrained():
            return PRETRAINED_DIR / f"{text}.safetensors"
        if text in PLANNED_NAMES:
            raise NotShippedError(
                f"pretrained weights {text!r} are not shipped yet in this version of learned_opt "
                f"(shipped: {list_pretrained() or 'none'}); pass a .safetensors path, or weights=None "
                "for an explicitly untrained rule"
            )
        if not Path(text).exists():
            raise ValueError(
                f"unknown pretrained weights {text!r}; shipped: {list_pretrained() or 'none'}; "
                "or pass a path to a .safetensors file"
            )
    weights_path, _ = _paths(text)
    return weights_path


def read_card(weights_path: str | Path) -> dict[str, Any]:
    """The JSON card next to ``weights_path``, checked for the required fields."""
    _, card_path = _paths(weights_path)
    if not card_path.exists():
        raise FileNotFoundError(f"weights card {card_path} is missing (every .safetensors needs its .json card)")
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"weights card {card_path} is not valid JSON: {exc}") from exc
    if not isinstance(card, dict):
        raise ValueError(f"weights card {card_path} must hold a JSON object, got {type(card).__name__}")
    missing = [k for k in CARD_FIELDS if k not in card]
    if missing:
        raise ValueError(f"weights card {card_path} lacks fields {missing}")
    if card["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"weights card {card_path} has format_version {card['format_version']!r}; "
            f"this learned_opt reads {FORMAT_VERSION}"
        )
    return card


def load_rule(name_or_path: str | Path) -> tuple[Rule, dict[str, Any]]:
    """Load a shipped name or a ``.safetensors`` path into its Rule; returns ``(rule, card)``.

    Verifies the card, the sha256 and that tensor names and shapes match the rule's config.
    Tensors are read with safetensors (no pickle). The returned rule is in eval mode.
    """
    weights_path = resolve_weights(name_or_path)
    if not weights_path.exists():
        raise FileNotFoundError(f"weights file {weights_path} does not exist")
    card = read_card(weights_path)
    data = weights_path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != card["sha256"]:
        raise ValueError(
            f"weights file {weights_path} has sha256 {digest} but its card says {card['sha256']} "
            "(the file was modified or truncated)"
        )
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors' SafetensorError is not importable on every version
        raise ValueError(f"weights file {weights_path} is not a valid safetensors file: {exc}") from exc
    try:
        rule = build_rule(card["rule"], card["rule_config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"weights card {_paths(weights_path)[1]}: cannot build rule: {exc}") from exc
    expected = rule.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)} vs rule {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"weights file {weights_path} does not match rule {card['rule']!r} with config "
            f"{card['rule_config']}: missing {missing}, unexpected {unexpected}, shape mismatches {shapes}"
        )
    with torch.no_grad():
        rule.load_state_dict(tensors)
    rule.eval()
    return rule, card
