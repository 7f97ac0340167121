"""Task library: determinism, finite losses, functional == nn.Module gradients, ranges, devices."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from learned_opt.tasks import (
    CNNClassificationFamily,
    LinearRegressionFamily,
    LogisticRegressionFamily,
    MLPClassificationFamily,
    MLPRegressionFamily,
    ModuleTask,
    QuadraticFamily,
    make_family,
)
from learned_opt.tasks.families import ACTIVATIONS

# (family, settings) covering every family and dataset; MNIST ones need the data.
CASES = [
    ("quadratic", {}),
    ("quadratic", {"condition": 1000.0, "dim": 12}),
    ("linear_regression", {}),
    ("linear_regression", {"dataset": "diabetes"}),
    ("logistic_regression", {}),
    ("logistic_regression", {"dataset": "breast_cancer"}),
    ("logistic_regression", {"dataset": "iris"}),
    ("logistic_regression", {"dataset": "wine"}),
    ("mlp_classification", {"dataset": "blobs", "activation": "relu"}),
    ("mlp_classification", {"dataset": "spirals", "activation": "gelu", "depth": 2}),
    ("mlp_classification", {"dataset": "digits", "activation": "tanh"}),
    ("mlp_classification", {"dataset": "mnist1d"}),
    ("mlp_classification", {"dataset": "mnist", "width": 20, "batch_size": 128}),
    ("mlp_regression", {}),
    ("mlp_regression", {"dataset": "diabetes", "activation": "relu"}),
    ("cnn_classification", {}),
    ("cnn_classification", {"dataset": "mnist", "channels": 4}),
]


def sample(name, settings, seed, need_data):
    return need_data(lambda: make_family(name, settings).sample(seed))


def run(task, seed, steps=3, lr=0.05):
    """Losses of a few plain SGD steps from the task's seeded init and batches."""
    g = torch.Generator().manual_seed(seed)
    params = task.init_params(g)
    losses = []
    for _ in range(steps):
        params = [p.requires_grad_() for p in params]
        loss = task.loss(params, task.sample_batch(g))
        grads = torch.autograd.grad(loss, params)
        params = [(p - lr * d).detach() for p, d in zip(params, grads)]
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name,settings", CASES, ids=[f"{n}-{s.get('dataset', '')}" for n, s in CASES])
def test_same_seed_same_task_and_finite_losses(name, settings, need_data):
    a, b = sample(name, settings, 7, need_data), sample(name, settings, 7, need_data)
    la, lb = run(a, 7), run(b, 7)
    assert la == lb
    assert all(np.isfinite(la))
    params = a.init_params(torch.Generator().manual_seed(7))
    assert all(p.requires_grad is False for p in params)
    assert torch.isfinite(a.eval_loss(params))
    metrics = a.test_metrics(params)
    if metrics is not None:
        assert np.isfinite(metrics["test_loss"])
        assert ("test_accuracy" in metrics) == (name in ("logistic_regression", "mlp_classification", "cnn_classification"))
    assert run(a, 8) != la  # a different generator seed gives a different run


def test_sampling_leaves_torch_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    MLPClassificationFamily(width=64, depth=3).sample(0)
    CNNClassificationFamily().sample(0)
    torch.testing.assert_close(torch.rand(3), expected)


def test_different_family_seeds_give_different_tasks():
    f = MLPClassificationFamily(dataset="spirals", width={"int": [8, 64]})
    a, b = f.sample(1), f.sample(2)
    assert not torch.equal(a.train_data[0], b.train_data[0])
    qa, qb = QuadraticFamily().sample(1), QuadraticFamily().sample(2)
    assert not torch.equal(qa.W, qb.W)


def _module_grads(task, params, batch):
    """Gradients through the plain nn.Module path: copy params into a module and backprop."""
    module = copy.deepcopy(task.module)
    with torch.no_grad():
        for p, v in zip(module.parameters(), params):
            p.copy_(v)
    x, y = batch
    task.loss_fn(module(x), y).backward()
    return [p.grad for p in module.parameters()]


@pytest.mark.parametrize(
    "family",
    [
        MLPClassificationFamily(dataset="digits", activation="gelu", depth=2, width=[16, 8]),
        MLPRegressionFamily(),
        LogisticRegressionFamily(dataset="wine"),
        CNNClassificationFamily(channels=4),
    ],
    ids=["mlp", "mlp-regression", "logistic", "cnn"],
)
def test_functional_gradients_equal_module_gradients(family, need_data):
    task = need_data(lambda: family.sample(3))
    g = torch.Generator().manual_seed(3)
    params = [p.requires_grad_() for p in task.init_params(g)]
    batch = task.sample_batch(g)
    functional = torch.autograd.grad(task.loss(params, batch), params)
    plain = _module_grads(task, [p.detach() for p in params], batch)
    assert len(functional) == len(plain) > 0
    for f, m in zip(functional, plain):
        torch.testing.assert_close(f, m)


def test_module_task_wraps_a_user_module():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    task = ModuleTask(net, (x, y), (x[:10], y[:10]), batch_size=8, init="module")
    params = task.init_params(torch.Generator().manual_seed(0))
    for p, q in zip(params, net.parameters()):
        assert torch.equal(p, q.detach())
    torch.testing.assert_close(task.eval_loss(params), nn.functional.cross_entropy(net(x), y))
    batch = task.sample_batch(torch.Generator().manual_seed(1))
    assert batch[0].shape == (8, 3)
    assert set(task.test_metrics(params)) == {"test_loss", "test_accuracy"}
    custom = ModuleTask(net, (x, y.float()[:, None].expand(40, 2)), loss=nn.functional.l1_loss)
    assert torch.isfinite(custom.loss(params, custom.sample_batch(torch.Generator())))
    assert custom.test_metrics(params) is None
    with pytest.raises(ValueError, match="'hinge'"):
        ModuleTask(net, (x, y), loss="hinge")
    with pytest.raises(ValueError, match="'orthogonal'"):
        ModuleTask(net, (x, y), init="orthogonal")


def test_init_scale_scales_initial_weights():
    base = MLPClassificationFamily(init_scale=1.0).sample(0).init_params(torch.Generator().manual_seed(0))
    big = MLPClassificationFamily(init_scale=3.0).sample(0).init_params(torch.Generator().manual_seed(0))
    torch.testing.assert_close(big[0], 3.0 * base[0])


def test_sampled_tasks_respect_ranges():
    family = MLPClassificationFamily(
        dataset="blobs",
        width={"int": [4, 12]},
        depth={"choice": [1, 3]},
        activation={"choice": ["relu", "tanh"]},
        batch_size={"choice": [8, 16]},
        init_scale={"log_uniform": [0.5, 2.0]},
        classes={"int": [2, 4]},
        dim={"int": [3, 6]},
    )
    seen_depths, seen_acts = set(), set()
    for seed in range(40):
        task = family.sample(seed)
        s = task.settings
        assert 4 <= s["width"] <= 12 and s["depth"] in (1, 3) and s["batch_size"] in (8, 16)
        assert 0.5 <= s["init_scale"] <= 2.0 and 2 <= s["classes"] <= 4 and 3 <= s["dim"] <= 6
        linears = [m for m in task.module if isinstance(m, nn.Linear)]
        assert len(linears) == s["depth"] + 1
        assert all(m.out_features == s["width"] for m in linears[:-1])
        assert linears[0].in_features == s["dim"] and linears[-1].out_features == s["classes"]
        assert any(isinstance(m, ACTIVATIONS[s["activation"]]) for m in task.module)
        assert task.sample_batch(torch.Generator())[0].shape[0] == s["batch_size"]
        seen_depths.add(s["depth"])
        seen_acts.add(s["activation"])
    assert seen_depths == {1, 3} and seen_acts == {"relu", "tanh"}


def test_quadratic_matches_paper_and_condition_is_exact():
    task = QuadraticFamily(dim=10).sample(0)
    assert task.W.shape == (10, 10) and task.y.shape == (10,)
    theta = task.init_params(torch.Generator().manual_seed(0))
    expected = ((task.W @ theta[0] - task.y) ** 2).sum()
    torch.testing.assert_close(task.loss(theta, task.sample_batch(torch.Generator())), expected)
    for seed in range(5):
        ill = QuadraticFamily(dim=20, condition=1e3).sample(seed)
        eig = torch.linalg.eigvalsh((ill.W.T @ ill.W).double())
        assert float(eig.max() / eig.min()) == pytest.approx(1e3, rel=1e-3)
    with pytest.raises(ValueError, match="0.5"):
        QuadraticFamily(condition=0.5).sample(0)


def test_linear_regression_noise_sets_the_noise_floor():
    task = LinearRegressionFamily(dim=5, noise=2.0, n_train=4000).sample(0)
    x, y = task.train_data
    w = torch.linalg.lstsq(x, y).solution
    assert float(((x @ w - y) ** 2).mean()) == pytest.approx(4.0, rel=0.1)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="widht"):
        MLPClassificationFamily(widht=3)
    with pytest.raises(ValueError, match="'diabetes'"):  # a regression set, not a classification one
        MLPClassificationFamily(dataset="diabetes")
    with pytest.raises(ValueError, match="'swish'"):  # at construction, so a suite file fails to load
        MLPClassificationFamily(activation="swish")
    with pytest.raises(ValueError, match=r"activation \['elu'\] not supported"):
        CNNClassificationFamily(activation={"choice": ["relu", "elu"]})
    with pytest.raises(ValueError, match="depth is 3"):
        MLPClassificationFamily(width=[4, 4], depth=3).sample(0)
    with pytest.raises(ValueError, match="log_uniform"):
        MLPClassificationFamily(init_scale={"log_uniform": [0, 1]})
    with pytest.raises(ValueError, match=r"width: int needs integers low <= high, got \[1.5, 4\]"):
        MLPClassificationFamily(width={"int": [1.5, 4]})
    with pytest.raises(ValueError, match="uniform needs numbers"):
        MLPClassificationFamily(noise={"uniform": [False, 1]})
    with pytest.raises(ValueError, match="unknown task family 'nope'"):
        make_family("nope")


def test_to_moves_data_and_keeps_results():
    task = MLPClassificationFamily().sample(0)
    moved = task.to("cpu")
    assert moved.device.type == "cpu" and moved.module is not task.module
    assert run(moved, 0) == run(task, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name,settings", [("quadratic", {}), ("mlp_classification", {"dataset": "digits"}),
                                           ("cnn_classification", {})])
def test_to_cuda_runs_on_the_gpu(name, settings, need_data):
    task = sample(name, settings, 0, need_data)
    gpu = task.to("cuda")
    params = gpu.init_params(torch.Generator().manual_seed(0))
    batch = gpu.sample_batch(torch.Generator().manual_seed(0))
    assert all(p.is_cuda for p in params) and all(b.is_cuda for b in batch)
    cpu_loss = task.loss(task.init_params(torch.Generator().manual_seed(0)), task.sample_batch(torch.Generator().manual_seed(0)))
    torch.testing.assert_close(gpu.loss(params, batch).cpu(), cpu_loss, rtol=1e-4, atol=1e-5)
    assert gpu.test_metrics(params) is None or np.isfinite(gpu.test_metrics(params)["test_loss"])
