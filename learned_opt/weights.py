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

and may add what the optimizer built from the weights runs with::

    defaults        constructor defaults the weights were chosen with (``weight_decay``; a
                    hypergradient rule's blow-up guard); a keyword given to
                    :func:`learned_opt.load_optimizer` replaces them
    untold_weights  the name of a sibling weights file (same folder, no path) that an optimizer
                    not told ``total_steps`` runs instead (its own card, defaults included)

Loading checks everything and names the file and the mismatch: a missing file, a card that is
not JSON or lacks a field (or has one of the wrong type), a sha256 that does not match (tampered or
truncated weights), weights that are not valid safetensors, and tensor names, shapes and dtypes
that disagree with the rule and config. The architecture is built on the meta device and compared
with the file's header before anything is allocated, so a card cannot make the loader allocate
more than the weights file holds.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
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
# The checkout (or, installed, site-packages): paths under it are recorded relative to it.
REPO = PRETRAINED_DIR.parent.parent
CARD_TYPES: dict[str, type] = {
    "format_version": int,
    "name": str,
    "rule": str,
    "rule_config": dict,
    "sha256": str,
    "created": str,
    "meta_training": dict,
    "metrics": dict,
}
CARD_FIELDS = tuple(CARD_TYPES)
CARD_OPTIONAL: dict[str, type] = {"defaults": dict, "untold_weights": str}
# Settings chosen on validation after meta-training (numbers >= 0; the optimizer checks the rest).
CARD_DEFAULT_KEYS = ("weight_decay", "blowup", "smoothing", "blowup_decay", "blowup_recovery", "max_factor")
_SIBLING_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# safetensors' dtype names of the floating dtypes: any of them loads into a floating parameter
# (load_state_dict casts, as it does under torch.set_default_dtype); other dtypes must match exactly.
FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
OTHER_DTYPES = {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
# A tensor as the header of a safetensors file describes it: (dtype name, shape).
TensorSpec = tuple[str, tuple[int, ...]]


def repo_relative(path: str | Path) -> str:
    """``path`` as cards and reports cite it: relative to :data:`REPO` when under it (a committed
    card must not carry the build machine's directories), any other path as given."""
    given = Path(path)
    if given.is_absolute() and given.resolve().is_relative_to(REPO):
        return given.resolve().relative_to(REPO).as_posix()
    return str(path)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _paths(path: str | Path) -> tuple[Path, Path]:
    """``(PATH.safetensors, PATH.json)`` for ``path`` with or without one of those suffixes."""
    given = Path(path)
    stem = given.with_suffix("") if given.suffix in (".safetensors", ".json") else given
    if stem.name in ("", ".", ".."):
        raise ValueError(f"weights path {str(path)!r} names no file; give a shipped name or a path to a .safetensors file")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def _split_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    """A safetensors file's JSON header and the tensor bytes after it; ValueError if malformed."""
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or n > len(data) - 8:
        raise ValueError(f"header length {n} exceeds the file's {len(data)} bytes")
    header = json.loads(data[8 : 8 + n])
    if not isinstance(header, dict):
        raise ValueError(f"header must be a JSON object, got {type(header).__name__}")
    return header, data[8 + n :]


def canonical_safetensors(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its JSON header's keys sorted, so equal tensors and
    metadata give byte-equal files (safetensors writes its metadata in hash-map order, which
    varies between processes) and hence an equal sha256. Offsets and tensor bytes are unchanged."""
    header, tensor_bytes = _split_header(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the tensor data to 8 bytes
    return len(text).to_bytes(8, "little") + text + tensor_bytes


def header_tensors(data: bytes) -> dict[str, TensorSpec]:
    """``{name: (dtype, shape)}`` of a safetensors file's tensors, read from its header alone.

    ValueError if the header is malformed; offsets are left to safetensors' own loader.
    """
    header, _ = _split_header(data)
    try:
        return {k: (str(v["dtype"]), tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"}
    except (TypeError, KeyError) as exc:
        raise ValueError(f"malformed tensor entry in the header: {exc!r}") from exc


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
    wrong = [
        f"{k} ({card[k]!r} is {type(card[k]).__name__}, must be {t.__name__})"
        for k, t in CARD_TYPES.items()
        if not isinstance(card[k], t) or isinstance(card[k], bool)  # JSON true is no format_version
    ]
    if wrong:
        raise ValueError(f"weights card {card_path} has fields of the wrong type: {', '.join(wrong)}")
    if card["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"weights card {card_path} has format_version {card['format_version']!r}; "
            f"this learned_opt reads {FORMAT_VERSION}"
        )
    check_optional_fields(card, card_path)
    return card


def check_optional_fields(card: Mapping[str, Any], card_path: str | Path) -> None:
    """ValueError naming ``card_path`` unless the card's optional fields (``CARD_OPTIONAL``) are valid."""
    for key, kind in CARD_OPTIONAL.items():
        if key in card and not isinstance(card[key], kind):
            raise ValueError(f"weights card {card_path}: {key} must be a JSON {kind.__name__}, got {card[key]!r}")
    defaults = card.get("defaults", {})
    unknown = sorted(set(defaults) - set(CARD_DEFAULT_KEYS))
    if unknown:
        raise ValueError(f"weights card {card_path}: defaults may set {list(CARD_DEFAULT_KEYS)}, not {unknown}")
    for key, value in defaults.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"weights card {card_path}: defaults {key} must be a number >= 0, got {value!r}")
    sibling = card.get("untold_weights")
    if sibling is not None and (not _SIBLING_NAME.fullmatch(sibling) or sibling.endswith(".safetensors")):
        raise ValueError(f"weights card {card_path}: untold_weights must name a weights file in the same folder "
                         f"(a name, no path or suffix), got {sibling!r}")


def untold_weights_path(weights_path: Path, card: Mapping[str, Any]) -> Path | None:
    """The sibling weights ``card`` names as ``untold_weights`` (None if it names none); ValueError
    if those name untold weights of their own, FileNotFoundError if they are missing."""
    sibling = card.get("untold_weights")
    if sibling is None:
        return None
    other = weights_path.with_name(f"{sibling}.safetensors")
    if read_card(other).get("untold_weights") is not None:
        raise ValueError(f"weights card {_paths(other)[1]}: untold weights may not name untold weights of their own")
    return other


def weights_for_run(name_or_path: str | Path, told: bool = False) -> Path:
    """The weights an optimizer runs: ``name_or_path``'s own, or, when it is not told its horizon and
    its card names ``untold_weights``, that sibling's."""
    path = resolve_weights(name_or_path)
    if told or not path.exists():
        return path
    return untold_weights_path(path, read_card(path)) or path


def run_settings(weights_path: Path, card: Mapping[str, Any], told: bool = False) -> dict[str, Any]:
    """What besides θ decides the runs of the optimizer built from ``weights_path`` (whose card is
    ``card``): the card's defaults and, unless the runs are ``told`` their horizon (which never
    load them), the identity of its untold weights, for run caches; empty for weights with neither."""
    out: dict[str, Any] = {"defaults": card["defaults"]} if card.get("defaults") else {}
    other = None if told else untold_weights_path(weights_path, card)
    if other is not None:
        untold = read_card(other)
        out["untold"] = {k: untold[k] for k in ("sha256", "rule", "rule_config")}
        if untold.get("defaults"):
            out["untold"]["defaults"] = untold["defaults"]
    return out


def load_rule(name_or_path: str | Path) -> tuple[Rule, dict[str, Any]]:
    """Load a shipped name or a ``.safetensors`` path into its Rule; returns ``(rule, card)``.

    Verifies the card, the sha256, and that tensor names, shapes and dtypes match the
    architecture the card's rule and config imply, before the rule or any tensor is allocated.
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
        stored = header_tensors(data)
    except ValueError as exc:
        raise ValueError(f"weights file {weights_path} is not a valid safetensors file: {exc}") from exc
    _check_architecture(weights_path, card, stored)
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors' SafetensorError is not importable on every version
        raise ValueError(f"weights file {weights_path} is not a valid safetensors file: {exc}") from exc
    rule = _build(weights_path, card)
    with torch.no_grad():
        rule.load_state_dict(tensors)
    rule.eval()
    return rule, card


def copy_weights(rule: Rule, name_or_path: str | Path) -> str:
    """Set ``rule``'s θ to the weights of a shipped name or path (verified as :func:`load_rule`
    does), which must be of the same rule with the same tensors: a search warm-started from them.
    Returns the verified sha256 of the weights file (what a resumed search checks its start by).

    One exception: the rule may add rows of optional controller inputs that the weights lack (its
    ``input_rows``, e.g. the travel row of the learned relative Adam); those keep the rule's starting
    values; and it may differ in the config keys of its ``form_options`` (how runs use θ, not θ's
    tensors: e.g. ``told_free``). Any other difference (a tensor, a shape, the config) is refused."""
    loaded, card = load_rule(name_or_path)
    theirs, ours = dict(loaded.named_parameters()), dict(rule.named_parameters())
    added = set(ours) - set(theirs)
    free = set(getattr(rule, "form_options", ()))

    def form(r: Rule, params: Mapping[str, torch.Tensor]) -> tuple[Any, ...]:  # all but the starting values
        return r.name, {k: v for k, v in r.config().items() if not k.startswith("init_") and k not in free}, \
            {k: v.shape for k, v in params.items() if k not in added}

    mine, given = form(rule, ours), form(loaded, theirs)
    if given != mine or not added <= set(getattr(rule, "input_rows", ())):
        config = sorted(k for k in {*given[1], *mine[1]} if given[1].get(k) != mine[1].get(k))
        raise ValueError(f"weights {name_or_path!r} ({card['rule']}: {sorted(theirs)}) do not fit rule "
                         f"{rule.name!r} ({sorted(ours)}{'; config differs in ' + str(config) if config else ''}); "
                         "init_weights needs the same rule, architecture and config (set the init_* values instead)")
    with torch.no_grad():
        for key, param in theirs.items():
            ours[key].copy_(param)
    return card["sha256"]


def _build(weights_path: Path, card: Mapping[str, Any]) -> Rule:
    """The card's rule; ValueError naming the card if its rule or config cannot be built."""
    try:
        return build_rule(card["rule"], card["rule_config"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"weights card {_paths(weights_path)[1]}: cannot build rule: {exc}") from exc


def expected_tensors(weights_path: Path, card: Mapping[str, Any]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` of the θ the card's rule and config define, built on the meta
    device so that no storage is allocated whatever sizes the card asks for."""
    with torch.device("meta"):
        rule = _build(weights_path, card)
    return {k: (v.dtype, tuple(v.shape)) for k, v in rule.state_dict().items()}


def _dtype_fits(stored: str, expected: torch.dtype) -> bool:
    """Whether a tensor stored as ``stored`` loads into an ``expected`` one as a value, not as
    reinterpreted bits: any floating width into a floating tensor, otherwise the same dtype."""
    if expected.is_floating_point:
        return stored in FLOAT_DTYPES
    return OTHER_DTYPES.get(stored) == expected


def _check_architecture(weights_path: Path, card: Mapping[str, Any], stored: Mapping[str, TensorSpec]) -> None:
    """ValueError naming the file unless ``stored`` (the file's header) holds exactly the tensors,
    shapes and dtypes of the card's architecture."""
    expected = expected_tensors(weights_path, card)
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    shapes = [
        f"{k}: file {stored[k][1]} vs rule {shape}"
        for k, (_, shape) in expected.items()
        if k in stored and stored[k][1] != shape
    ]
    dtypes = [
        f"{k}: file {stored[k][0]} vs rule {str(dtype).removeprefix('torch.')}"
        for k, (dtype, _) in expected.items()
        if k in stored and not _dtype_fits(stored[k][0], dtype)
    ]
    if missing or unexpected or shapes or dtypes:
        raise ValueError(
            f"weights file {weights_path} does not match rule {card['rule']!r} with config "
            f"{card['rule_config']}: missing {missing}, unexpected {unexpected}, shape mismatches {shapes}, "
            f"dtype mismatches {dtypes}"
        )
