"""Optimizer specs: what ``--optimizers`` accepts, turned into factories with a cache identity.

A spec string is ``NAME`` or ``NAME[key=value,...]``: fixed hyperparameters, whose values are
numbers, ``true``/``false``, tuples ``(0.9,0.99)``, quoted text or bare text. Four keys are the
benchmark's own: ``lr`` fixes the learning rate (so the spec is never tuned), ``tune=true|false``
overrides whether ``--tune`` searches its lr, ``horizon=true`` passes each run's length as
``total_steps=`` (for optimizers that take it, such as ``RelativeAdam`` and the shipped
``default``), and ``name=...`` sets its label in reports (default: the spec string). Every spec is
built and stepped once on a tiny parameter before any run, so a bad key or a broken factory is
reported first. ``NAME`` is one of:

- a torch baseline: ``sgd``, ``momentum`` (SGD, momentum 0.9), ``nesterov``, ``adam``, ``adamw``,
  ``rmsprop``, ``adagrad`` — tuned under ``--tune``; ``NAME-cosine`` (``adam-cosine``, …) is the same
  optimizer with its lr decayed to 0 over the run's horizon by a cosine (tuned: its peak lr);
- a hand-set class of this library: ``GradNormDecaySGD``, ``GradNormDecayAdam``, ``HypergradientSGD``,
  ``HypergradientAdam``, ``RelativeAdam`` — run at their documented (hand-set) defaults;
  ``[tune=true]`` tunes ``lr`` (the multiplier of the class's initial rate);
- a shipped weights name or a ``.safetensors`` path, loaded with :func:`learned_opt.load_optimizer`
  and run untuned; the cache identity holds the weights' sha256 and the card's rule settings;
- ``module:factory`` or ``path/to/file.py:factory``: ``factory(params, **kwargs)`` returns an
  optimizer; tunable when the factory takes ``lr``;
- ``schedulefree-adamw`` (package ``schedulefree``; put in eval mode before every evaluation) and
  ``prodigy`` (package ``prodigyopt``, at its conventional lr = 1, untuned), when installed.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learned_opt import optim
from learned_opt.adapter import LOW_LR_WARNING
from learned_opt.optim import load_optimizer
from learned_opt.weights import file_sha256, list_pretrained, load_rule, read_card, resolve_weights, run_settings

# build(params, lr, **more) -> optimizer; lr None means "the optimizer's own default"; ``more`` holds
# ``total_steps`` for horizon-aware specs.
Builder = Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer to benchmark.

    ``key`` identifies the optimizer for the run cache (everything but the learning rate, which
    is keyed separately so ``adam[lr=0.001]`` reuses the tuning grid's runs at 1e-3).
    ``fixed_lr`` is the lr given in the spec; ``tunable`` says whether ``--tune`` may search it.
    """

    label: str
    build: Builder = field(compare=False, repr=False)
    key: dict[str, Any]
    tunable: bool = False
    fixed_lr: float | None = None
    horizon: bool = False

    @property
    def tuned_by_default(self) -> bool:
        return self.tunable and self.fixed_lr is None

    def factory(self, lr: float | None, steps: int) -> Callable[[list[Tensor]], torch.optim.Optimizer]:
        """``params -> optimizer`` at ``lr`` for a run of ``steps`` steps (told to horizon-aware specs).

        The learned optimizers warn on a small ``lr`` (an absolute rate from torch habits, where they
        take a multiplier); a tuning grid's small multipliers are meant, so that warning is muted for
        them (not for an lr the spec itself fixes)."""
        more = {"total_steps": steps} if self.horizon else {}
        grid = lr is not None and lr != self.fixed_lr

        def make(params: list[Tensor]) -> torch.optim.Optimizer:
            with warnings.catch_warnings():
                if grid:
                    warnings.filterwarnings("ignore", message=LOW_LR_WARNING, category=UserWarning)
                return self.build(params, lr=lr, **more)

        return make


@dataclass(frozen=True)
class _TorchBaseline:
    cls: str
    kwargs: dict[str, Any]


TORCH_BASELINES: dict[str, _TorchBaseline] = {
    "sgd": _TorchBaseline("SGD", {}),
    "momentum": _TorchBaseline("SGD", {"momentum": 0.9}),
    "nesterov": _TorchBaseline("SGD", {"momentum": 0.9, "nesterov": True}),
    "adam": _TorchBaseline("Adam", {}),
    "adamw": _TorchBaseline("AdamW", {}),
    "rmsprop": _TorchBaseline("RMSprop", {}),
    "adagrad": _TorchBaseline("Adagrad", {}),
}
HANDSET_CLASSES = ("GradNormDecaySGD", "GradNormDecayAdam", "HypergradientSGD", "HypergradientAdam", "RelativeAdam")
OPTIONAL_PACKAGES = {"schedulefree-adamw": "schedulefree", "prodigy": "prodigyopt"}

_SPEC_RE = re.compile(r"^(?P<name>[^\[\]]+?)(?:\[(?P<args>[^\[\]]*)\])?$")


def parse_spec_string(spec: str) -> tuple[str, dict[str, Any]]:
    """Split ``NAME[k=v,...]`` into the name and its keyword arguments.

    A value is a number, ``true``/``false``, a tuple ``(v, ...)`` of values, a quoted string
    (``'...'`` or ``"..."``, which may hold commas and brackets of its own) or bare text."""
    match = _SPEC_RE.match(spec.strip())
    if not match:
        raise ValueError(f"malformed optimizer spec {spec!r}; expected NAME or NAME[key=value,...]")
    kwargs: dict[str, Any] = {}
    for item in _split_top_level(match["args"] or "", spec):
        if "=" not in item:
            raise ValueError(f"optimizer spec {spec!r}: {item!r} is not key=value")
        key, value = (s.strip() for s in item.split("=", 1))
        if not key.isidentifier():
            raise ValueError(f"optimizer spec {spec!r}: {key!r} is not a valid keyword")
        if key in kwargs:
            raise ValueError(f"optimizer spec {spec!r}: {key!r} is given twice")
        kwargs[key] = _parse_value(value, spec)
    return match["name"].strip(), kwargs


def _split_top_level(text: str, spec: str) -> list[str]:
    """``text`` split at the commas outside parentheses and quotes; empty items dropped."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise ValueError(f"optimizer spec {spec!r}: unbalanced ')'")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if quote or depth:
        raise ValueError(f"optimizer spec {spec!r}: unclosed {quote or '('}")
    items.append(text[start:])
    return [s.strip() for s in items if s.strip()]


def _parse_value(text: str, spec: str) -> Any:
    if text.startswith("(") and text.endswith(")"):
        return tuple(_parse_value(v, spec) for v in _split_top_level(text[1:-1], spec))
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if not text or any(c in text for c in "()'\""):
        raise ValueError(f"optimizer spec {spec!r}: cannot read the value {text!r}; quote text, e.g. 'a b'")
    return text


def _split_lr(spec: str, kwargs: dict[str, Any]) -> tuple[float | None, dict[str, Any]]:
    kwargs = dict(kwargs)
    lr = kwargs.pop("lr", None)
    if lr is not None and (not isinstance(lr, (int, float)) or isinstance(lr, bool) or not lr >= 0):
        raise ValueError(f"optimizer spec {spec!r}: lr must be a number >= 0, got {lr!r}")
    return (None if lr is None else float(lr)), kwargs


def _with_lr(lr: float | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return dict(kwargs) if lr is None else {**kwargs, "lr": lr}


def resolve_optimizer(spec: str | OptimizerSpec) -> OptimizerSpec:
    """Turn a spec string (see module docstring) into an :class:`OptimizerSpec`."""
    if isinstance(spec, OptimizerSpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"optimizer spec must be a string or OptimizerSpec, got {type(spec).__name__}")
    name, kwargs = parse_spec_string(spec)
    tune = kwargs.pop("tune", None)
    horizon = kwargs.pop("horizon", False)
    for key, value in (("tune", tune), ("horizon", horizon)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"optimizer spec {spec!r}: {key} must be true or false, got {value!r}")
    label = kwargs.pop("name", spec.strip())
    if not isinstance(label, str) or not label.strip():
        raise ValueError(f"optimizer spec {spec!r}: name must be non-empty text (quote it: name='...'), "
                         f"got {label!r}")
    resolved = _resolve_named(label.strip(), name, *_split_lr(spec, kwargs), told=bool(horizon))
    if horizon:
        resolved = replace(resolved, horizon=True, key={**resolved.key, "horizon": True})
    return resolved if tune is None else replace(resolved, tunable=tune)


def _resolve_named(label: str, name: str, fixed_lr: float | None, extra: dict[str, Any], *,
                   told: bool = False) -> OptimizerSpec:
    lowered = name.lower()
    cosine = lowered.endswith("-cosine") and lowered[: -len("-cosine")] in TORCH_BASELINES
    if lowered in TORCH_BASELINES or cosine:
        base = TORCH_BASELINES[lowered[: -len("-cosine")] if cosine else lowered]
        cls = getattr(torch.optim, base.cls)
        options = {**base.kwargs, **extra}

        def build_torch(params: list[Tensor], lr: float | None, **more: Any) -> torch.optim.Optimizer:
            opt = cls(params, **_with_lr(lr, options))
            return with_cosine_decay(opt, more["total_steps"]) if cosine else opt

        key = {"torch": base.cls, "kwargs": options, **({"schedule": "cosine"} if cosine else {})}
        return OptimizerSpec(label, build_torch, key, tunable=True, fixed_lr=fixed_lr, horizon=cosine)
    handset = {c.lower(): c for c in HANDSET_CLASSES}
    if lowered in handset:
        return _handset_spec(label, handset[lowered], fixed_lr, extra)
    if lowered in OPTIONAL_PACKAGES:
        return _optional_spec(label, lowered, fixed_lr, extra)
    if name.endswith(".safetensors") or name in list_pretrained():
        return _learned_spec(label, name, fixed_lr, extra, told)
    if ":" in name:
        return _factory_spec(label, name, fixed_lr, extra)
    raise ValueError(
        f"unknown optimizer {name!r}; expected a torch baseline {sorted(TORCH_BASELINES)}, one of "
        f"{list(HANDSET_CLASSES)}, {sorted(OPTIONAL_PACKAGES)}, a shipped name "
        f"{list_pretrained()}, a .safetensors path or module:factory"
    )


def with_cosine_decay(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.Optimizer:
    """``optimizer`` whose lr follows ``0.5 (1 + cos(π t / total_steps))`` of its initial value,
    stepped by a post-step hook (so a plain ``optimizer.step()`` loop runs the schedule)."""
    horizon = max(int(total_steps), 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, horizon) / horizon)))
    optimizer.register_step_post_hook(lambda *_: scheduler.step())
    optimizer.cosine_scheduler = scheduler  # type: ignore[attr-defined]  # keeps it alive with the optimizer
    return optimizer


def _handset_spec(label: str, cls_name: str, fixed_lr: float | None, extra: dict[str, Any]) -> OptimizerSpec:
    cls = getattr(optim, cls_name)

    def build(params: list[Tensor], lr: float | None, **more: Any) -> torch.optim.Optimizer:
        return cls(params, **_with_lr(lr, extra), **more)

    return OptimizerSpec(label, build, {"learned_opt": cls_name, "kwargs": extra, "defaults": _defaults(build)},
                         False, fixed_lr)


def _defaults(build: Builder) -> dict[str, Any] | None:
    """The hyperparameters an optimizer is built with (its ``defaults``), for the run cache's key:
    a changed default of a hand-set class then reruns its runs instead of reusing stale ones.
    None when it cannot be built (the spec's build check reports why)."""
    try:
        return dict(build([torch.zeros(1, requires_grad=True)], None).defaults)
    except (TypeError, ValueError):
        return None


def _optional_spec(label: str, name: str, fixed_lr: float | None, extra: dict[str, Any]) -> OptimizerSpec:
    package = OPTIONAL_PACKAGES[name]
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ValueError(
            f"optimizer {name!r} needs the optional package {package!r} (pip install {package})"
        ) from exc
    if name == "prodigy":
        def build_prodigy(params: list[Tensor], lr: float | None, **more: Any) -> torch.optim.Optimizer:
            return module.Prodigy(params, **_with_lr(1.0 if lr is None else lr, extra), **more)

        key = {"package": package, "version": getattr(module, "__version__", "?"), "kwargs": extra}
        return OptimizerSpec(label, build_prodigy, key, tunable=False, fixed_lr=1.0 if fixed_lr is None else fixed_lr)

    def build_sf(params: list[Tensor], lr: float | None, **more: Any) -> torch.optim.Optimizer:
        return module.AdamWScheduleFree(params, **_with_lr(lr, extra), **more)

    key = {"package": package, "version": getattr(module, "__version__", "?"), "kwargs": extra}
    return OptimizerSpec(label, build_sf, key, tunable=True, fixed_lr=fixed_lr)


def _learned_spec(label: str, name: str, fixed_lr: float | None, extra: dict[str, Any],
                  told: bool = False) -> OptimizerSpec:
    """A shipped name or weights path, run untuned (``told``: every run is given its horizon)."""
    if name.endswith(".safetensors"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ValueError(f"optimizer weights file {str(path)!r} does not exist")
        sha = file_sha256(path)
        source: str = str(path.resolve())
        card = read_card(path)
    else:
        _, card = load_rule(name)
        sha, source, path = str(card["sha256"]), name, resolve_weights(name)

    def build(params: list[Tensor], lr: float | None, **more: Any) -> torch.optim.Optimizer:
        return load_optimizer(source, params, **_with_lr(lr, extra), **more)

    # the card's rule settings are part of the optimizer: the same θ with another setting is another run
    key = {"weights_sha256": sha, "rule": card.get("rule"), "rule_config": card.get("rule_config"), "kwargs": extra,
           **run_settings(path, card, told)}
    return OptimizerSpec(label, build, key, False, fixed_lr)


def _load_factory(target: str) -> tuple[Callable[..., torch.optim.Optimizer], str | None]:
    module_name, _, attr = target.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"optimizer factory {target!r} must be module:factory or file.py:factory")
    if module_name.endswith(".py"):
        path = Path(module_name).expanduser()
        if not path.is_file():
            raise ValueError(f"optimizer factory file {str(path)!r} does not exist")
        mod_spec = importlib.util.spec_from_file_location(f"_bench_factory_{path.stem}", path)
        assert mod_spec is not None and mod_spec.loader is not None
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: any error in it is bad input, not our bug
            raise ValueError(f"optimizer factory file {str(path)!r} failed to load: {_one_line(exc)}") from exc
    else:
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise ValueError(f"cannot import module {module_name!r} for optimizer {target!r}: "
                             f"{_one_line(exc)}") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (optimizer {target!r})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"optimizer factory {target!r} is not callable")
    source = getattr(module, "__file__", None)
    digest = hashlib.sha256(Path(source).read_bytes()).hexdigest() if source and Path(source).is_file() else None
    return obj, digest


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (an error report is one line; some messages span several)."""
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())


_PROBE_STEPS = 10  # the horizon a horizon-aware spec is told in the pre-run check


def check_spec_builds(spec: OptimizerSpec, lr: float | None, device: str | torch.device = "cpu") -> None:
    """Build ``spec`` at ``lr`` on a tiny parameter on ``device`` and take one step: a bad setting
    (``sgd[foo=1]``), a factory that raises or returns something other than an optimizer, is a
    ValueError naming the spec before any run, instead of a traceback minutes into a benchmark."""
    from learned_opt.bench.runner import set_eval_mode

    param = torch.zeros(2, 2, device=device, requires_grad=True)
    try:
        optimizer = spec.factory(lr, _PROBE_STEPS)([param])
    except Exception as exc:
        raise ValueError(f"optimizer {spec.label!r}: cannot build it: {_one_line(exc)}") from exc
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(f"optimizer {spec.label!r}: its factory returned {type(optimizer).__name__} "
                         f"{optimizer!r:.60}, not a torch.optim.Optimizer")
    param.grad = torch.ones_like(param)
    try:
        set_eval_mode(optimizer, False)
        optimizer.step()
    except Exception as exc:
        raise ValueError(f"optimizer {spec.label!r}: its first step() failed: {_one_line(exc)}") from exc


def _accepts_lr(fn: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "lr" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _factory_spec(label: str, target: str, fixed_lr: float | None, extra: dict[str, Any]) -> OptimizerSpec:
    factory, digest = _load_factory(target)

    def build(params: list[Tensor], lr: float | None, **more: Any) -> torch.optim.Optimizer:
        return factory(params, **_with_lr(lr, extra), **more)

    key = {"factory": target, "source_sha256": digest, "kwargs": extra}
    return OptimizerSpec(label, build, key, tunable=_accepts_lr(factory), fixed_lr=fixed_lr)


def spec_from_factory(
    label: str,
    factory: Callable[..., torch.optim.Optimizer],
    *,
    tunable: bool | None = None,
    lr: float | None = None,
) -> OptimizerSpec:
    """Wrap a Python factory ``factory(params[, lr=...])`` for :func:`learned_opt.benchmark`.

    Its cache identity is ``label`` plus the factory's qualified name: change the label when you
    change what the factory builds, or benchmark without ``out`` (no cache).
    """
    can_tune = _accepts_lr(factory) if tunable is None else tunable

    def build(params: list[Tensor], lr: float | None, **more: Any) -> torch.optim.Optimizer:
        return factory(params, **more) if lr is None else factory(params, lr=lr, **more)

    key = {"python": f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', repr(factory))}",
           "label": label}
    return OptimizerSpec(label, build, key, tunable=can_tune, fixed_lr=lr)


def resolve_optimizers(
    specs: Sequence[str | OptimizerSpec] | Mapping[str, Callable[..., torch.optim.Optimizer] | str | OptimizerSpec],
) -> list[OptimizerSpec]:
    """Resolve a list of spec strings/specs, or a ``{label: factory, spec string or spec}`` mapping."""
    if isinstance(specs, Mapping):
        out = [
            resolve_optimizer(v) if isinstance(v, (str, OptimizerSpec)) else spec_from_factory(k, v)
            for k, v in specs.items()
        ]
        out = [s if s.label == k else _relabel(s, k) for s, k in zip(out, specs)]
    else:
        out = [resolve_optimizer(s) for s in specs]
    labels = [s.label for s in out]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise ValueError(f"optimizer labels must be unique; repeated: {dupes}")
    return out


def _relabel(spec: OptimizerSpec, label: str) -> OptimizerSpec:
    return replace(spec, label=label)


TUNED_ADAM = "adam (tuned)"
ADAM_1E3 = "adam (lr=1e-3)"


def reference_specs() -> tuple[OptimizerSpec, OptimizerSpec]:
    """The yardsticks every report needs: Adam tuned per task, and Adam at lr = 1e-3."""
    adam = resolve_optimizer("adam")
    return _relabel(adam, TUNED_ADAM), OptimizerSpec(ADAM_1E3, adam.build, adam.key, True, 1e-3)
