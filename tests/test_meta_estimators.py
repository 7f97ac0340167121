"""Meta-gradient estimators against finite differences and against each other (float64, tiny problem)."""

from __future__ import annotations

import torch

from learned_opt.meta.estimators import PES, AntitheticES, TruncatedBPTT
from learned_opt.meta.losses import MetaLoss, normalized_loss
from learned_opt.meta.unroll import InnerRun, TruncationData, unroll
from meta_toys import ToyMomentum, ToyQuadratic


def _rule() -> ToyMomentum:
    return ToyMomentum(log_lr=-1.2, logit_beta=0.3).double()


def _run(rule: ToyMomentum, noise: float = 0.0, horizon: int = 100) -> InnerRun:
    return InnerRun.start(rule, ToyQuadratic(seed=3, noise=noise), label="toy", seed=7, horizon=horizon)


def _truncation_loss(rule: ToyMomentum, steps: int, objective: MetaLoss, noise: float) -> torch.Tensor:
    run = _run(rule, noise)
    run.train_without_graph(_rule(), 3)  # start mid-run (non-zero momentum), from a state fixed for all θ
    data = run.draw_data(steps, heldout=objective.kind == "heldout")
    out = unroll(rule, run.task, run.params, run.state, data, mode="second")
    return objective(out.losses, out.heldout, steps, run.initial_loss)


def test_second_order_bptt_matches_finite_differences() -> None:
    for kind in ("mean", "final", "heldout"):
        objective = MetaLoss(kind=kind, cap=3.0)
        rule = _rule()
        run = _run(rule, noise=0.3)
        run.train_without_graph(_rule(), 3)
        est = TruncatedBPTT(second_order=True).estimate(rule, run, 6, objective, torch.Generator())
        fd = []
        for i, p in enumerate(rule.parameters()):
            vals = []
            for h in (1e-6, -1e-6):
                with torch.no_grad():
                    p.add_(h)
                vals.append(_truncation_loss(rule, 6, objective, noise=0.3).item())
                with torch.no_grad():
                    p.sub_(h)
            fd.append((vals[0] - vals[1]) / 2e-6)
        got = torch.stack([g for g in est.grads]).tolist()
        assert torch.allclose(torch.tensor(got), torch.tensor(fd), rtol=1e-5, atol=1e-8), (kind, got, fd)
        assert abs(est.meta_loss.item() - _truncation_loss(rule, 6, objective, 0.3).item()) < 1e-12


def test_first_order_drops_only_the_gradient_path() -> None:
    # With a rule whose update ignores the gradient's dependence on θ the two orders differ; on a
    # problem whose gradient does not depend on the parameters (first step from θ_0 only), they agree.
    objective = MetaLoss("final")
    rule = _rule()
    first = TruncatedBPTT(False).estimate(rule, _run(rule), 1, objective, torch.Generator())
    second = TruncatedBPTT(True).estimate(rule, _run(rule), 1, objective, torch.Generator())
    assert torch.allclose(torch.stack(first.grads), torch.stack(second.grads), rtol=1e-12)
    first = TruncatedBPTT(False).estimate(rule, _run(rule), 5, objective, torch.Generator())
    second = TruncatedBPTT(True).estimate(rule, _run(rule), 5, objective, torch.Generator())
    assert not torch.allclose(torch.stack(first.grads), torch.stack(second.grads), rtol=1e-6)


def test_es_mean_matches_bptt_gradient() -> None:
    objective = MetaLoss("mean")
    rule = _rule()
    exact = TruncatedBPTT(True).estimate(rule, _run(rule), 5, objective, torch.Generator())
    es = AntitheticES(sigma=1e-3, pairs=4000).estimate(rule, _run(rule), 5, objective, torch.Generator().manual_seed(0))
    g, e = torch.stack(exact.grads), torch.stack(es.grads)
    assert torch.linalg.vector_norm(g - e) < 0.1 * torch.linalg.vector_norm(g), (g, e)
    assert abs(es.meta_loss.item() - exact.meta_loss.item()) < 1e-12  # the run advanced with θ itself


def test_pes_over_truncations_matches_full_unroll_gradient() -> None:
    objective = MetaLoss("mean")
    rule = _rule()
    steps, chunks = 4, 3
    # Full objective: the sum of the truncations' meta-losses, differentiated through the whole run
    # (noise-free task, so which batch a loss is measured on does not matter).
    pes_run, full_run = _run(rule), _run(rule)
    data = [full_run.draw_data(steps) for _ in range(chunks)]
    whole = TruncationData([b for d in data for b in d.batches], data[-1].final_batch)
    out = unroll(rule, full_run.task, full_run.params, full_run.state, whole, mode="second")
    total = sum(objective(out.losses[k * steps : (k + 1) * steps], None, steps, out.first_loss) for k in range(chunks))
    exact = torch.stack(torch.autograd.grad(total, list(rule.parameters())))
    noise = torch.Generator().manual_seed(1)
    estimator = PES(sigma=1e-3, pairs=3000)
    summed = torch.zeros(2, dtype=torch.float64)
    for _ in range(chunks):
        summed += torch.stack(estimator.estimate(rule, pes_run, steps, objective, noise).grads)
    truncated = torch.zeros(2, dtype=torch.float64)
    bptt_run = _run(rule)
    for _ in range(chunks):
        truncated += torch.stack(TruncatedBPTT(True).estimate(rule, bptt_run, steps, objective, noise).grads)
    err_pes = torch.linalg.vector_norm(summed - exact)
    err_tbptt = torch.linalg.vector_norm(truncated - exact)
    assert err_pes < 0.15 * torch.linalg.vector_norm(exact), (summed, exact)
    assert err_pes < err_tbptt, (summed, truncated, exact)  # truncation bias is what PES removes


def test_normalized_loss_caps_and_replaces_nan() -> None:
    init = torch.tensor(2.0)
    assert normalized_loss(torch.tensor(2.0), init, 3.0).item() == 0.0
    assert normalized_loss(torch.tensor(1e9), init, 3.0).item() == 3.0
    assert normalized_loss(torch.tensor(float("nan")), init, 3.0).item() == 3.0
    x = torch.tensor(1e9, requires_grad=True)
    normalized_loss(x, init, 3.0).backward()
    assert x.grad.item() == 0.0
    diverged = MetaLoss("mean", cap=2.0)([torch.tensor(2.0)], None, 4, init)
    assert diverged.item() == 6.0 / 4
