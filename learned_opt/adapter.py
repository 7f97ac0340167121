"""``torch.optim`` adapter: any Rule as a drop-in ``torch.optim.Optimizer`` (:class:`LearnedOptimizer`).

The adapter owns the bookkeeping (param groups, state, sparse/complex checks, late-joining
parameters, float32 compute for low-precision parameters) and steps each group under
``torch.no_grad()`` through :func:`learned_opt.rules.transforms.apply_update` — the very function
the meta-training unroll differentiates — which applies ``maximize``, weight decay (coupled or
decoupled), the gradient bound and the non-finite guard around the rule's update, and lets the
rule write its new state over the old (as torch optimizers do).

State layout. Per-parameter rule state lives in ``self.state[p]`` so ``state_dict``, casting on
load, hooks and ``deepcopy`` are torch's own. The rule's *group-wide* state (e.g. an adapted
``lr_factor``, the LSTM's reference trajectory, a step count) is stored under the same keys in the
state of every parameter of the group that has state, kept in sync after each step, so torch's
``state_dict`` round-trips it; :meth:`LearnedOptimizer.group_state` returns it. The adapter adds
``nonfinite_skips`` (steps of the group skipped because a gradient was NaN/inf).

Low-precision parameters (float16, bfloat16: fewer than 32 bits) are stepped in float32: their
state is float32 (as torch's fused Adam keeps it), the update is computed on a float32 copy of the
parameter and gradient, and the sum is rounded once into the parameter.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from learned_opt.rules.base import Rule, RuleState, check_bool, check_nonnegative
from learned_opt.rules.transforms import STEP_DEFAULTS, apply_update

NONFINITE_KEY = "nonfinite_skips"
COMPUTE_DTYPE = torch.float32  # parameters narrower than this are stepped in it
# Where the guard masks on a device, the skip counters are read on the host (for the one-time
# warning) only every this many steps, so a step never waits for the device.
NONFINITE_CHECK_EVERY = 100
LOW_LR_MULTIPLIER = 0.01  # a multiplier below this is almost surely an absolute rate from torch habits (warned)
LOW_LR_WARNING = r"lr=\S+ is a multiplier of the rule's own rate"  # that warning's text, for filters
# Keys every saved param group has, besides the rule's ``hyperparameters`` (decoupled_weight_decay
# may be missing from a state saved before it existed: it defaults to False).
ADAPTER_HPARAMS = ("weight_decay", "maximize")


class LearnedOptimizer(Optimizer):
    """Generic adapter: ``LearnedOptimizer(params, rule, lr=1.0, **hparams)``.

    ``hparams`` are the rule's ``hyperparameters`` (per-group values, like torch's ``betas``;
    defaults: the rule's own, :meth:`Rule.default_hparams`). ``lr`` is a multiplier (default 1.0)
    of the rule's own rate (its learned or hand-set ``init_lr``), so LR schedulers scale that rate. ``weight_decay``: by default
    coupled (L2: ``wd·p`` added to the gradient the rule sees); with
    ``decoupled_weight_decay=True`` AdamW-style instead (the parameter shrinks by ``lr·wd·p`` each
    step, apart from the rule's update; ``lr`` is the group's, so a scheduler scales the decay as
    well). ``maximize`` ascends. ``weights_sha256`` is recorded in ``state_dict`` so a checkpoint
    loaded into an optimizer with different weights warns.

    Gradients whose group norm would overflow the rule's arithmetic are rescaled, and a group with
    a NaN/inf gradient skips its step (counted in ``state[p]["nonfinite_skips"]``, warned once);
    see :mod:`learned_opt.rules.transforms`. On the CPU the warning comes at the skipped step;
    where the check runs on a device (GPUs), it comes within ``NONFINITE_CHECK_EVERY`` steps.
    float16/bfloat16 parameters are stepped in float32 with float32 state (module docstring).
    ``card`` is the weights' card when they were loaded from disk, else None.
    """

    _steps_unchecked = 0  # steps since the skip counters were last read (see _warn_nonfinite)
    card: dict[str, Any] | None = None
    evaluating = False  # the parameters hold the rule's evaluation point (see eval())
    # Instance attributes of the adapter that torch's Optimizer.__getstate__ does not keep.
    _PICKLED = ("rule", "weights_sha256", "card", "_warned_nonfinite", "evaluating")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        rule: Rule,
        lr: float = 1.0,
        *,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = False,
        maximize: bool = False,
        weights_sha256: str | None = None,
        **hparams: Any,
    ) -> None:
        if not isinstance(rule, Rule):
            raise TypeError(f"rule must be a learned_opt Rule, got {type(rule).__name__}")
        unknown = set(hparams) - set(rule.hyperparameters)
        if unknown:
            raise ValueError(
                f"unknown hyperparameters {sorted(unknown)} for rule {rule.name!r}; "
                f"allowed: {sorted(set(rule.hyperparameters) | set(STEP_DEFAULTS))}"
            )
        defaults = {**rule.default_hparams(), **hparams, "lr": lr, "weight_decay": weight_decay,
                    "decoupled_weight_decay": decoupled_weight_decay, "maximize": maximize}
        self.rule = rule
        self.weights_sha256 = weights_sha256
        self._warned_nonfinite = False
        self._group_keys: frozenset[str] | None = None
        self._validate_group(defaults)
        if isinstance(lr, (int, float)) and 0 < lr < LOW_LR_MULTIPLIER:
            warnings.warn(f"lr={lr:g} is a multiplier of the rule's own rate (1.0 = as designed or meta-trained), "
                          f"so each step is {lr:g}× the rule's; an absolute initial rate is init_lr= (alpha= for "
                          "RelativeAdam)", UserWarning, stacklevel=3)
        super().__init__(params, defaults)

    def _validate_group(self, group: Mapping[str, Any]) -> None:
        check_nonnegative("weight_decay", group["weight_decay"])
        check_bool("maximize", group["maximize"])
        self.rule.validate_hparams(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except (TypeError, ValueError):
            self.param_groups.pop()  # a rejected group must not stay behind to be stepped
            raise

    def _check_group(self, group: dict[str, Any]) -> None:
        """ValueError for bad hyperparameters or parameters this optimizer cannot hold."""
        self._validate_group(group)
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(
                    f"{type(self).__name__} does not support complex parameters (got {p.dtype}); "
                    "optimize torch.view_as_real(p) instead"
                )
            if not p.is_floating_point():
                raise ValueError(f"{type(self).__name__} can only optimize floating-point parameters, got {p.dtype}")

    @property
    def hyperparameter_keys(self) -> frozenset[str]:
        """Keys every param group has: the rule's hyperparameters and :data:`ADAPTER_HPARAMS`
        (``self.defaults`` may hold more: torch adds ``differentiable`` on unpickling and loading)."""
        return frozenset(self.rule.hyperparameters) | frozenset(ADAPTER_HPARAMS)

    # --- state bookkeeping -------------------------------------------------------------------
    @property
    def group_keys(self) -> frozenset[str]:
        """Keys of the rule's group-wide state (plus the adapter's ``nonfinite_skips``)."""
        if self._group_keys is None:
            group_state, _ = self.rule.init_state([torch.zeros(1)])
            self._group_keys = frozenset(group_state) | {NONFINITE_KEY}
        return self._group_keys

    def group_state(self, index: int = 0) -> dict[str, Tensor]:
        """The group-wide state of ``param_groups[index]`` (empty before its first step)."""
        return self._group_state_of(self.param_groups[index])

    def _group_state_of(self, group: dict[str, Any]) -> dict[str, Tensor]:
        for p in group["params"]:
            st = self.state.get(p)
            if st:
                return {k: v for k, v in st.items() if k in self.group_keys}
        return {}

    def _ensure_state(self, group: dict[str, Any], params: list[Tensor], work: list[Tensor]) -> None:
        """Fresh state for the parameters without any, built from their compute tensors ``work``."""
        fresh = [(p, w) for p, w in zip(params, work) if not self.state.get(p)]
        if not fresh:
            return
        with torch.no_grad():
            group_state, per_param = self.rule.init_state([w for _, w in fresh])
        existing = self._group_state_of(group)
        if existing:
            with torch.no_grad():
                per_param = self.rule.join_state({k: v for k, v in existing.items() if k != NONFINITE_KEY}, per_param)
        else:
            like = fresh[0][1]
            existing = {**group_state, NONFINITE_KEY: torch.zeros((), dtype=like.dtype, device=like.device)}
        for (p, _), ps in zip(fresh, per_param):
            clash = set(ps) & self.group_keys
            if clash:
                raise RuntimeError(f"rule {self.rule.name!r} uses keys {sorted(clash)} for both group and param state")
            self.state[p].update(ps)
            self.state[p].update(existing)

    # --- evaluation point ---------------------------------------------------------------------
    @property
    def has_eval_point(self) -> bool:
        """Whether the rule evaluates elsewhere than where it takes gradients (schedule-free rules):
        then :meth:`eval` before evaluating or saving the model, :meth:`train` before stepping."""
        return bool(getattr(self.rule, "schedule_free", False))

    @torch.no_grad()
    def eval(self) -> LearnedOptimizer:
        """Put the parameters at the rule's evaluation point (a schedule-free rule's average ``x``);
        a no-op for other rules and when already there. As ``schedulefree``'s optimizers: call it
        before evaluating or checkpointing the model, and :meth:`train` before the next step."""
        if self.has_eval_point and not self.evaluating:
            self._move_params(self.rule.eval_point)
            self.evaluating = True
        return self

    @torch.no_grad()
    def train(self) -> LearnedOptimizer:
        """Put the parameters back where the rule takes gradients (undoes :meth:`eval`)."""
        if self.evaluating:
            self._move_params(self.rule.train_point)
            self.evaluating = False
        return self

    def _move_params(self, point: Callable[..., list[Tensor] | None]) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if self.state.get(p)]
            if not params:
                continue
            work = [_compute_tensor(p) for p in params]
            moved = point(work, self._rule_state(params, work), self._step_hparams(group))
            for p, new in zip(params, moved or work):
                p.copy_(new)

    # --- stepping ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One step for every group; the closure (if any) runs with grad enabled; returns its loss."""
        if self.evaluating:
            raise RuntimeError(f"{type(self).__name__}.step() in eval mode: the parameters hold the evaluation "
                               "point; call optimizer.train() before training (and optimizer.eval() to evaluate)")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skipped = [self._step_group(group) for group in self.param_groups]
        self._warn_nonfinite(skipped)
        return loss

    def _step_group(self, group: dict[str, Any]) -> bool | None:
        """One guarded step of a group: whether it was skipped, None when that is known only on the device."""
        params = self._params_with_grad(group)
        if not params:
            return False
        work = [_compute_tensor(p) for p in params]
        grads = [p.grad.to(w.dtype) for p, w in zip(params, work)]
        self._ensure_state(group, params, work)
        result = apply_update(self.rule, grads, work, self._rule_state(params, work), self._step_hparams(group),
                              inplace=True, move=True)
        skips = self.state[params[0]][NONFINITE_KEY]
        if result.skipped:
            self._write_group_state(group, {NONFINITE_KEY: skips + 1})
            return True
        new_group, new_per_param = result.state
        updates = result.updates if result.updates is not None else [None] * len(params)
        for p, w, u, ps in zip(params, work, updates, new_per_param):
            if u is not None:
                w.add_(u)
            if w is not p:
                p.copy_(w)  # rounded once into the low-precision parameter
            self._store_param_state(p, ps)
        if result.skipped is None:  # masked on the device: count without reading the verdict
            new_group = {**new_group, NONFINITE_KEY: skips + (~result.finite).to(skips.dtype)}
        self._write_group_state(group, new_group)
        return result.skipped

    def _params_with_grad(self, group: dict[str, Any]) -> list[Tensor]:
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return params

    def _step_hparams(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group's rule hyperparameters and step transforms' settings (defaults for groups
        saved before a setting existed)."""
        step = {k: group.get(k, default) for k, default in STEP_DEFAULTS.items()}
        return {**{k: group[k] for k in self.rule.hyperparameters}, **step}

    def _rule_state(self, params: list[Tensor], work: list[Tensor]) -> RuleState:
        """The rule's state of the group, in each parameter's compute dtype (a state that loading
        cast to a low-precision parameter's dtype is brought back to float32)."""
        keys = self.group_keys
        per_param = []
        for p, w in zip(params, work):
            st = self.state[p]
            if w is not p:
                st.update({k: v.to(w.dtype) for k, v in st.items() if v.is_floating_point() and v.dtype != w.dtype})
            per_param.append({k: v for k, v in st.items() if k not in keys})
        group_state = {k: v for k, v in self.state[params[0]].items() if k in keys and k != NONFINITE_KEY}
        return group_state, per_param

    def _store_param_state(self, p: Tensor, new_state: dict[str, Tensor]) -> None:
        st = self.state[p]
        for key in [k for k in st if k not in self.group_keys and k not in new_state]:
            del st[key]  # e.g. a momentum buffer dropped when momentum was set to 0
        grad_storage = p.grad.untyped_storage().data_ptr()
        for key, value in new_state.items():
            # a rule may keep the gradient itself as state, but zero_grad/GradScaler mutate p.grad
            shares_grad = value.untyped_storage().data_ptr() == grad_storage
            st[key] = value.clone() if shares_grad else value

    def _write_group_state(self, group: dict[str, Any], values: dict[str, Tensor]) -> None:
        for p in group["params"]:
            st = self.state.get(p)
            if st:
                st.update(values)

    def _warn_nonfinite(self, skipped: list[bool | None]) -> None:
        """Warn (once) that a step was skipped. A skip known only on the device (None) is read from
        the counters every ``NONFINITE_CHECK_EVERY`` steps, not at each step (that would wait for it)."""
        if self._warned_nonfinite:
            return
        if None in skipped and True not in skipped:
            self._steps_unchecked += 1
            if self._steps_unchecked < NONFINITE_CHECK_EVERY:
                return
            self._steps_unchecked = 0
            skipped = [float(self._group_state_of(g).get(NONFINITE_KEY, 0.0)) > 0 for g in self.param_groups]
        if any(skipped):
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient; skipped the group's step "
                f"(counted in state['{NONFINITE_KEY}']; further skips are not warned)",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned_nonfinite = True

    # --- serialisation -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["learned_opt"] = {"rule": self.rule.name, "weights_sha256": self.weights_sha256,
                             "evaluating": self.evaluating}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's ``load_state_dict``, refusing (ValueError, nothing loaded) a state this optimizer's
        rule cannot step: another rule's, another optimizer class's, or one for other shapes."""
        info = state_dict.get("learned_opt") or {}
        saved_rule, saved_sha = info.get("rule"), info.get("weights_sha256")
        if saved_rule is not None and saved_rule != self.rule.name:
            raise ValueError(f"state_dict is for rule {saved_rule!r}, this optimizer runs {self.rule.name!r}")
        torch_state = {k: v for k, v in state_dict.items() if k != "learned_opt"}
        try:
            self._check_loadable(torch_state)
        except ValueError as exc:
            if saved_sha is None or saved_sha == self.weights_sha256:
                raise
            raise ValueError(
                f"{exc}; the state was saved with other weights (sha256 {saved_sha[:12]}…, these "
                f"{str(self.weights_sha256)[:12]}…): a shipped name whose card names untold_weights, such as "
                "'default', runs other weights told and untold, so build it with the total_steps the state "
                "was saved with") from exc
        if isinstance(torch_state.get("param_groups"), list):  # keys added since the state was saved
            defaults = {k: v for k, v in self.rule.hyperparameters.items() if k in self.rule.added_keys}
            torch_state["param_groups"] = [{**defaults, **g} for g in torch_state["param_groups"]]
        if saved_sha != self.weights_sha256:
            warnings.warn(
                f"loading optimizer state saved with weights sha256 {saved_sha} into an optimizer "
                f"whose weights have sha256 {self.weights_sha256}",
                UserWarning,
                stacklevel=2,
            )
        super().load_state_dict(torch_state)
        # a state saved in eval mode belongs with parameters saved at the evaluation point
        self.evaluating = bool(info.get("evaluating", False)) and self.has_eval_point

    def _check_loadable(self, state_dict: Mapping[str, Any]) -> None:
        """ValueError unless ``state_dict`` (torch's layout) could come from this optimizer: each
        group has its hyperparameter keys with valid values, and each parameter's state has the keys
        and shapes ``rule.init_state`` gives that parameter (plus the group state and
        ``nonfinite_skips``). A mismatch in the number or sizes of groups is left to torch's check."""
        saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, Mapping):
            raise ValueError("state_dict must hold 'state' and 'param_groups' as torch.optim.Optimizer.state_dict() gives")
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            return
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            where = f"state_dict param group {index}"
            missing = sorted(self.hyperparameter_keys - set(saved) - self.rule.added_keys)
            if missing:
                raise ValueError(
                    f"{where} lacks hyperparameters {missing} of {type(self).__name__} "
                    f"(rule {self.rule.name!r}); is it another optimizer's state?"
                )
            try:
                self._validate_group({**self.rule.hyperparameters, **saved})
            except ValueError as exc:
                raise ValueError(f"{where}: {exc}") from None
            for pid, p in zip(saved["params"], group["params"]):
                self._check_param_state(f"{where}, parameter {pid}", saved_state.get(pid), p)

    def _check_param_state(self, where: str, loaded: Any, p: Tensor) -> None:
        """ValueError unless ``loaded`` is no state or the state the rule keeps for ``p``.

        Keys the rule adds per coordinate beyond ``init_state`` (a momentum buffer when momentum is
        non-zero) may be present; they must be shaped like ``p``."""
        if not loaded:
            return
        if not isinstance(loaded, Mapping):
            raise ValueError(f"{where}: state must be a dict of tensors, got {type(loaded).__name__}")
        with torch.no_grad():  # on the meta device: shapes without allocating the rule's state
            group_state, (fresh,) = self.rule.init_state([torch.empty_like(p, device="meta")])
        expected = {k: tuple(v.shape) for k, v in {**fresh, **group_state}.items()}
        expected[NONFINITE_KEY] = ()
        wanted = {**{k: tuple(p.shape) for k in loaded}, **expected}
        missing = sorted(set(expected) - set(loaded) - self.rule.added_keys)
        shapes = [
            f"{k}: {_shape_of(loaded[k])} vs {shape}"
            for k, shape in wanted.items()
            if k in loaded and _shape_of(loaded[k]) != shape
        ]
        if missing or shapes:
            raise ValueError(
                f"{where}: not a state of rule {self.rule.name!r} for a parameter of shape {tuple(p.shape)}: "
                f"missing keys {missing}, shape mismatches (loaded vs expected) {shapes}"
            )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update({key: getattr(self, key) for key in self._PICKLED})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key in self._PICKLED:
            if key in state:
                setattr(self, key, state.pop(key))
        self._group_keys = None
        super().__setstate__(state)

    def __repr__(self) -> str:
        base = super().__repr__()
        sha = f", weights_sha256={self.weights_sha256[:12]}" if self.weights_sha256 else ""
        return f"{base[:-1]}Rule: {self.rule.name}{sha}\n)"


def _compute_tensor(p: Tensor) -> Tensor:
    """The tensor a rule steps for ``p``: ``p`` itself, or a float32 copy of a low-precision one."""
    if torch.finfo(p.dtype).bits < torch.finfo(COMPUTE_DTYPE).bits:
        return p.detach().to(COMPUTE_DTYPE)
    return p


def _shape_of(value: Any) -> tuple[int, ...] | str:
    """A loaded state value's shape, or its type's name when it is not a tensor."""
    return tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
