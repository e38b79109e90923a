"""K-FAC: factors, preconditioning, methods, checkpoints, assignment, 2 workers; and the
exact natural gradient.

Reduction convention (see workers/training/kfac.py): A = mean over rows of a a^T with a
homogeneous 1 for the bias; G = mean over examples of per-example g g^T, where per-example
g = N * dL/ds for the batch-mean loss L.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import socket
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from workers.training.kfac import (
    ComputeMethod,
    CostBalancedAssignment,
    KFACPreconditioner,
    TorchDistributedCommunicator,
    _gauss_newton_gram,
    sampled_loss,
)
from workers.training.natural_gradient import NaturalGradientPreconditioner


@pytest.fixture(autouse=True)
def _float64():
    """The comparisons are exact to float64 rounding; restore the default for other modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _batch(n: int = 7, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 5, generator=generator, dtype=torch.float64),
        torch.randint(0, 3, (n,), generator=generator),
    )


def test_linear_factors_equal_explicit_expectations():
    model = _mlp()
    x, y = _batch()
    kfac = KFACPreconditioner(model, compute_method="inverse", kl_clip=None)
    F.cross_entropy(model(x), y).backward()
    kfac.step()

    # explicit: per-example inputs with a bias coordinate, per-example output gradients
    first, second = model[0], model[2]
    s1 = first(x)
    s1.retain_grad()
    h = torch.tanh(s1)
    s2 = second(h)
    s2.retain_grad()
    F.cross_entropy(s2, y).backward()
    n = x.shape[0]
    ones = torch.ones(n, 1)
    for name, a, s in (("0", x, s1), ("2", h.detach(), s2)):
        a_hom = torch.cat([a, ones], dim=1)
        expected_a = sum(torch.outer(r, r) for r in a_hom) / n
        per_example_g = n * s.grad
        expected_g = sum(torch.outer(r, r) for r in per_example_g) / n
        block = kfac.blocks[name]
        torch.testing.assert_close(block.a_factor, expected_a)
        torch.testing.assert_close(block.g_factor, expected_g)


def test_preconditioned_gradient_equals_dense_kronecker_solve():
    torch.manual_seed(3)
    layer = nn.Linear(3, 2).double()
    x, target = torch.randn(6, 3), torch.randn(6, 2)
    damping = 0.05
    kfac = KFACPreconditioner(layer, compute_method="inverse", damping=damping, kl_clip=None)
    F.mse_loss(layer(x), target).backward()
    raw_grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).clone()
    kfac.step()

    block = kfac.blocks[""]
    a, g = block.a_factor, block.g_factor
    pi = math.sqrt((a.trace() / 4) / (g.trace() / 2))
    a_damped = a + pi * math.sqrt(damping) * torch.eye(4)
    g_damped = g + math.sqrt(damping) / pi * torch.eye(2)
    # row-major vec: vec(G^-1 X A^-1) = (G^-1 (x) A^-1) vec(X)
    dense = torch.linalg.solve(torch.kron(g_damped, a_damped), raw_grad.reshape(-1))
    got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1).reshape(-1)
    torch.testing.assert_close(got, dense)


def test_conv2d_factors_equal_unfold_computation():
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=1).double()
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(3 * 5 * 5, 2)).double()
    x, target = torch.randn(4, 2, 5, 5), torch.randn(4, 2)
    kfac = KFACPreconditioner(model, kl_clip=None)
    F.mse_loss(model(x), target).backward()
    kfac.step()

    out = conv(x)
    out.retain_grad()
    F.mse_loss(model[2](model[1](out)), target).backward()
    n = x.shape[0]
    patches = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 2 * 9)  # (N*25, 18)
    patches = torch.cat([patches, torch.ones(patches.shape[0], 1)], dim=1)
    expected_a = patches.T @ patches / patches.shape[0]
    grads = (n * out.grad).permute(0, 2, 3, 1).reshape(-1, 3)  # per-example, per position
    expected_g = grads.T @ grads / n  # mean over examples, sum over positions
    torch.testing.assert_close(kfac.blocks["0"].a_factor, expected_a)
    torch.testing.assert_close(kfac.blocks["0"].g_factor, expected_g)


def _grads_after_step(method: ComputeMethod, steps: int = 3):
    model = _mlp()
    kfac = KFACPreconditioner(model, compute_method=method, damping=1e-2, inv_update_steps=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for step in range(steps):
        x, y = _batch(seed=step)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kfac.step()
        optimizer.step()
    return [p.grad.clone() for p in model.parameters()]


def test_inverse_and_eigen_methods_give_the_same_preconditioned_gradient():
    for eig, inv in zip(
        _grads_after_step(ComputeMethod.EIGEN),
        _grads_after_step(ComputeMethod.INVERSE),
        strict=True,
    ):
        torch.testing.assert_close(eig, inv, rtol=1e-8, atol=1e-10)


def test_kl_clip_bounds_the_update_in_the_fisher_metric():
    lr, kl_clip = 10.0, 1e-4
    clipped_model, free_model = _mlp(), _mlp()
    clipped = KFACPreconditioner(clipped_model, compute_method="inverse", kl_clip=kl_clip, lr=lr)
    free = KFACPreconditioner(free_model, compute_method="inverse", kl_clip=None, lr=lr)
    x, y = _batch()
    for model, kfac in ((clipped_model, clipped), (free_model, free)):
        F.cross_entropy(model(x), y).backward()
        raw = [p.grad.clone() for p in model.parameters()]
        kfac.step()
    update = torch.cat([p.grad.reshape(-1) for p in clipped_model.parameters()])
    natural = torch.cat([p.grad.reshape(-1) for p in free_model.parameters()])
    grad = torch.cat([g.reshape(-1) for g in raw])
    scale = float(update.norm() / natural.norm())
    torch.testing.assert_close(update, scale * natural)
    # the clipped step lr * scale * natural has lr^2 scale^2 <natural, grad> = kl_clip
    assert lr**2 * scale**2 * float(natural @ grad) == pytest.approx(kl_clip, rel=1e-9)


def test_state_dict_round_trip_gives_identical_next_step(tmp_path):
    model = _mlp()
    kfac = KFACPreconditioner(model, damping=1e-2, inv_update_steps=3, factor_decay=0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def one_step(m, k, opt, seed):
        x, y = _batch(seed=seed)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        k.step()
        opt.step()
        return [p.grad.clone() for p in m.parameters()]

    for seed in range(4):
        one_step(model, kfac, optimizer, seed)
    save_file(kfac.state_dict(), tmp_path / "kfac.safetensors")  # tensors only, no pickle
    restored_model = _mlp(seed=99)  # not a deepcopy: that would copy the hooks too
    restored_model.load_state_dict(model.state_dict())
    restored_optimizer = torch.optim.SGD(restored_model.parameters(), lr=0.1, momentum=0.9)
    # a copy: load_state_dict would share the momentum buffers with the original
    restored_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    restored = KFACPreconditioner(
        restored_model, damping=1e-2, inv_update_steps=3, factor_decay=0.9
    )
    restored.load_state_dict(load_file(tmp_path / "kfac.safetensors"))

    for seed in (4, 5):  # step 6 recomputes the inverses from the restored factors
        expected = one_step(model, kfac, optimizer, seed)
        got = one_step(restored_model, restored, restored_optimizer, seed)
        for e, g in zip(expected, got, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_assignment_spreads_layers_over_workers_by_cost():
    policy = CostBalancedAssignment()
    even = policy.assign({f"layer{i}": 1.0 for i in range(6)}, world_size=3)
    assert sorted(even.values()) == [0, 0, 1, 1, 2, 2]
    skewed = {"big": 10.0, "a": 4.0, "b": 3.0, "c": 3.0}
    assignment = policy.assign(skewed, world_size=2)
    loads = [sum(c for n, c in skewed.items() if assignment[n] == r) for r in range(2)]
    assert sorted(loads) == [10.0, 10.0]
    assert policy.assign(skewed, 2) == assignment  # deterministic: every worker agrees


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"damping": -1.0}, "damping"),
        ({"factor_decay": 1.0}, "factor_decay"),
        ({"inv_update_steps": 0}, "inv_update_steps"),
        ({"kl_clip": 0.0}, "kl_clip"),
        ({"compute_method": "cholesky"}, "cholesky"),
    ],
)
def test_settings_are_checked_when_built(kwargs, field):
    with pytest.raises(ValueError, match=field):
        KFACPreconditioner(_mlp(), **kwargs)


def test_schedules_are_callables_of_the_step():
    model = _mlp()
    kfac = KFACPreconditioner(model, damping=lambda step: 1.0 / (step + 1))
    assert kfac.current_damping == 1.0
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    kfac.step()
    assert kfac.current_damping == 0.5


# ---------------------------------------------------------------- two workers


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _two_worker_steps(rank: int, world_size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        communicator = TorchDistributedCommunicator()
        grads = _kfac_updates(communicator, shard=(rank, world_size))
        save_file({str(i): g for i, g in enumerate(grads)}, out)
    finally:
        dist.destroy_process_group()


def _kfac_updates(communicator=None, shard=(0, 1)) -> list[torch.Tensor]:
    """Three K-FAC steps of a 3-layer MLP on a global batch of 8, this worker's shard."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    kfac = KFACPreconditioner(
        model, compute_method="eigen", damping=1e-2, inv_update_steps=2, communicator=communicator
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    rank, world = shard
    updates = []
    for step in range(3):
        x, y = _batch(n=8, seed=10 + step)
        per_worker = x.shape[0] // world
        x, y = (
            x[rank * per_worker : (rank + 1) * per_worker],
            y[rank * per_worker : (rank + 1) * per_worker],
        )
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if communicator is not None:  # data parallelism's gradient average (DDP's job)
            communicator.all_reduce_mean([p.grad for p in model.parameters()])
        kfac.step()
        optimizer.step()
        updates += [p.grad.clone() for p in model.parameters()]
    return updates


def test_two_workers_give_the_same_update_as_one_worker_on_the_global_batch(tmp_path):
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    outs = [str(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    workers = [
        context.Process(target=_two_worker_steps, args=(r, 2, port, outs[r])) for r in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    for worker in workers:
        if worker.is_alive():
            worker.kill()
    assert all(worker.exitcode == 0 for worker in workers), [w.exitcode for w in workers]

    single = _kfac_updates()
    for out in outs:
        distributed = load_file(out)
        for i, expected in enumerate(single):
            torch.testing.assert_close(distributed[str(i)], expected, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- natural gradient


@pytest.mark.parametrize("batch", [64, 8])  # P=35 <= N (primal) and P > N (Woodbury)
def test_natural_gradient_solves_the_damped_empirical_fisher_system(batch):
    model = _mlp()
    x, y = _batch(n=batch)
    damping = 1e-2
    natural = NaturalGradientPreconditioner(model, F.cross_entropy, damping=damping)
    natural.step(x, y)
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    rows = []
    for i in range(batch):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    jacobian = torch.stack(rows)
    fisher = jacobian.T @ jacobian / batch + damping * torch.eye(jacobian.shape[1])
    expected = torch.linalg.solve(fisher, jacobian.mean(0))
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


# ---------------------------------------------------------------- sampled (true) Fisher


def _explicit_gauss_newton_g(model, x, loss):
    """Per layer, the G factor with the loss's output Hessian in place of r r^T:
    N * sum_i J_i^T (H_i / M^2) J_i, J_i = d(model output of example i) / d(layer output i)."""
    first, act, second = model
    s1 = first(x)
    out = second(act(s1))
    n = x.shape[0]
    if loss == "cross_entropy":
        probs = torch.softmax(out, -1)
        hessians = [torch.diag(p) - torch.outer(p, p) for p in probs]
        items = n
    else:  # mse, mean over the n * d elements: Hessian 2 per element
        hessians = [2.0 * torch.eye(out.shape[1]) for _ in range(n)]
        items = out.numel()
    d_out_d_s2 = torch.eye(out.shape[1])
    expected = {"0": 0, "2": 0}
    for i in range(n):
        jac_s1 = torch.autograd.functional.jacobian(lambda s: second(act(s)), s1[i].detach())
        for name, jac in (("0", jac_s1), ("2", d_out_d_s2)):
            expected[name] = expected[name] + n * jac.T @ hessians[i] @ jac / items**2
    return {name: g.detach() for name, g in expected.items()}


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_sampled_fisher_g_factor_averages_to_the_gauss_newton_factor(loss):
    model = _mlp()
    x, labels = _batch(n=5)
    target = labels if loss == "cross_entropy" else torch.randn(5, 3)
    loss_fn = F.cross_entropy if loss == "cross_entropy" else F.mse_loss
    expected = _explicit_gauss_newton_g(model, x, loss)
    draws = 3000
    # factor_decay -> running mean: the paper's warm start gives decay 1 - 1/k, i.e. the mean
    kfac = KFACPreconditioner(
        model,
        fisher="sampled",
        loss=loss,
        factor_decay=0.999999,
        kl_clip=None,
        inv_update_steps=10**9,
        seed=5,
    )
    for _ in range(draws):
        model.zero_grad()
        output = model(x)
        kfac.curvature_backward(output)
        loss_fn(output, target).backward()
        kfac.step()
    for name, g in expected.items():
        got = kfac.blocks[name].g_factor
        # Monte Carlo: relative error ~ 1/sqrt(draws) per entry
        assert float((got - g).norm() / g.norm()) < 0.06, name
    # A does not depend on the targets: still exactly E[a a^T]
    a_hom = torch.cat([x, torch.ones(5, 1)], dim=1)
    torch.testing.assert_close(kfac.blocks["0"].a_factor, a_hom.T @ a_hom / 5)


def test_sampled_loss_residuals_have_the_loss_hessian_as_covariance():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 4, generator=generator)
    draws = 20000
    output = logits.expand(draws, 4).clone().requires_grad_(True)
    noise = torch.rand(draws, 1, generator=generator)
    (grad,) = torch.autograd.grad(sampled_loss("cross_entropy", output, noise), output)
    residual = grad * draws  # (1/M) r per row, M = draws
    probs = torch.softmax(logits[0], -1)
    torch.testing.assert_close(
        residual.T @ residual / draws,
        torch.diag(probs) - torch.outer(probs, probs),
        atol=1e-2,
        rtol=0,
    )
    torch.testing.assert_close(residual.mean(0), torch.zeros(4), atol=1e-2, rtol=0)


def test_sampled_fisher_without_curvature_backward_is_an_error():
    model = _mlp()
    kfac = KFACPreconditioner(model, fisher="sampled", loss="cross_entropy")
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="curvature_backward"):
        kfac.step()


def test_sampled_fisher_needs_the_loss_kind():
    with pytest.raises(ValueError, match="loss"):
        KFACPreconditioner(_mlp(), fisher="sampled")


def test_factor_average_uses_the_papers_warm_start():
    model = _mlp()
    kfac = KFACPreconditioner(model, factor_decay=0.95, kl_clip=None)
    batches = []
    for seed in range(3):
        x, y = _batch(seed=seed)
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kfac.step()
        a_hom = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
        batches.append(a_hom.T @ a_hom / x.shape[0])
    # decays 0, 1/2, 2/3: the plain mean of the three batches
    torch.testing.assert_close(kfac.blocks["0"].a_factor, sum(batches) / 3)


# ---------------------------------------------------------------- rescaling (6.4) and LM (6.5)


def test_rescaled_step_minimizes_the_exact_quadratic_model():
    model = _mlp()
    x, y = _batch(n=16)
    damping = 0.05
    kfac = KFACPreconditioner(
        model, rescale=True, loss="cross_entropy", damping=damping, lr=1.0, compute_method="inverse"
    )
    params = list(model.parameters())

    def flat_grad():
        return torch.cat([p.grad.reshape(-1) for p in params])

    def exact_gauss_newton():
        flat = torch.cat([p.detach().reshape(-1) for p in params])

        def f(theta):
            pieces, offset = {}, 0
            for name, p in model.named_parameters():
                pieces[name] = theta[offset : offset + p.numel()].view_as(p)
                offset += p.numel()
            return torch.func.functional_call(model, pieces, (x,))

        jac = torch.autograd.functional.jacobian(f, flat)  # (n, 3, P)
        probs = torch.softmax(f(flat), -1)
        gn = 0
        for i in range(x.shape[0]):
            h = torch.diag(probs[i]) - torch.outer(probs[i], probs[i])
            gn = gn + jac[i].T @ h @ jac[i]
        return gn / x.shape[0]

    previous = None
    for _ in range(2):  # the second step has a previous update: a real 2x2 solve
        model.zero_grad()
        output = model(x)
        F.cross_entropy(output, y).backward()
        g = flat_grad().clone()
        curvature = exact_gauss_newton() + damping * torch.eye(g.numel())
        block_grads = {}
        for name, block in kfac.blocks.items():
            block_grads[name] = block.grad_matrix().clone()
        kfac.step(x, y, float(F.cross_entropy(output, y)))
        update = -flat_grad()  # SGD at lr 1 applies -grad
        # update = alpha Delta + mu previous, with grad . update + update C update / 2 minimal:
        # along both directions, the model's gradient is orthogonal
        residual = g + curvature @ update
        directions = [update] if previous is None else [update, previous]
        for d in directions:
            assert abs(float(residual @ d)) < 1e-8 * float(g.norm() * d.norm()) + 1e-12
        with torch.no_grad():
            for p, piece in zip(
                params, torch.split(update, [p.numel() for p in params]), strict=True
            ):
                p.add_(piece.view_as(p))
        previous = update
    assert kfac.alpha_mu[1] != 0.0


def test_levenberg_marquardt_raises_damping_when_the_model_overestimates():
    model = _mlp()
    kfac = KFACPreconditioner(
        model, rescale=True, adapt_damping=1, loss="cross_entropy", damping=1e-4, lr=1.0
    )
    x, y = _batch()
    output = model(x)
    loss = F.cross_entropy(output, y)
    loss.backward()
    # a lie about the loss at theta: the step "increases" the loss, rho < 1/4
    kfac.step(x, y, float(loss) - 10.0)
    assert kfac.last_rho < 0.25 and kfac.current_damping == pytest.approx(1e-4 * 20 / 19)


# ---------------------------------------------------------------- update intervals


def _counting(kfac: KFACPreconditioner) -> dict[str, list[int]]:
    """Records the steps at which each block collects inputs and computes inverses."""
    calls: dict[str, list[int]] = {"inputs": [], "inverses": []}
    for block in kfac.blocks.values():
        for method, key in (("accumulate_inputs", "inputs"), ("compute_inverses", "inverses")):
            original = getattr(block, method)

            def counted(*args, _original=original, _key=key, **kwargs):
                if kfac.steps not in calls[_key]:
                    calls[_key].append(kfac.steps)
                return _original(*args, **kwargs)

            setattr(block, method, counted)
    return calls


def _interval_steps(model, kfac, optimizer, seeds) -> list[list[torch.Tensor]]:
    grads = []
    for seed in seeds:
        x, y = _batch(seed=seed)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kfac.step()
        optimizer.step()
        grads.append([p.grad.clone() for p in model.parameters()])
    return grads


def test_update_intervals_skip_the_work_in_between():
    model = _mlp()
    kfac = KFACPreconditioner(
        model,
        damping=1e-2,
        factor_update_steps=3,
        inv_update_steps=2,
        compute_method="inverse",
        kl_clip=None,
    )
    calls = _counting(kfac)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    _interval_steps(model, kfac, optimizer, range(7))
    assert calls["inputs"] == [0, 3, 6]  # the hooks do nothing on the other steps
    assert calls["inverses"] == [0, 2, 4, 6]
    assert kfac.factor_updates == 3


def test_update_intervals_survive_a_checkpoint_restore(tmp_path):
    settings = {
        "damping": 1e-2,
        "factor_update_steps": 3,
        "inv_update_steps": 2,
        "factor_decay": 0.9,
    }
    model = _mlp()
    kfac = KFACPreconditioner(model, **settings)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _interval_steps(model, kfac, optimizer, range(4))
    state = kfac.state_dict()
    assert int(state["factor_update_steps"]) == 3 and int(state["inv_update_steps"]) == 2
    save_file(state, tmp_path / "kfac.safetensors")

    restored_model = _mlp(seed=99)
    restored_model.load_state_dict(model.state_dict())
    restored_optimizer = torch.optim.SGD(restored_model.parameters(), lr=0.1, momentum=0.9)
    restored_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    # built with the default intervals (1 and 10): the checkpoint's schedule goes on
    restored = KFACPreconditioner(restored_model, damping=1e-2, factor_decay=0.9)
    restored.load_state_dict(load_file(tmp_path / "kfac.safetensors"))
    assert (restored.factor_update_steps, restored.inv_update_steps) == (3, 2)
    calls = _counting(restored)

    expected = _interval_steps(model, kfac, optimizer, range(4, 9))  # steps 4..8
    got = _interval_steps(restored_model, restored, restored_optimizer, range(4, 9))
    assert calls["inputs"] == [6] and calls["inverses"] == [4, 6, 8]
    for step_expected, step_got in zip(expected, got, strict=True):
        for e, g in zip(step_expected, step_got, strict=True):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


def test_a_bad_interval_in_a_checkpoint_is_refused():
    kfac = KFACPreconditioner(_mlp())
    state = kfac.state_dict()
    state["inv_update_steps"] = torch.tensor(0)
    with pytest.raises(ValueError, match="inv_update_steps"):
        KFACPreconditioner(_mlp()).load_state_dict(state)


@pytest.mark.parametrize("loss", ["mse", "bce", "cross_entropy"])
def test_gauss_newton_gram_equals_the_pairwise_hessian_forms(loss):
    generator = torch.Generator().manual_seed(3)
    output = torch.randn(6, 4, generator=generator)
    tangents = [torch.randn(6, 4, generator=generator) for _ in range(2)]
    if loss == "mse":
        hessians = [2.0 * torch.eye(4) / output.numel()] * 6
    elif loss == "bce":
        s = torch.sigmoid(output)
        hessians = [torch.diag(s[r] * (1 - s[r])) / output.numel() for r in range(6)]
    else:
        p = torch.softmax(output, -1)
        hessians = [(torch.diag(p[r]) - torch.outer(p[r], p[r])) / 6 for r in range(6)]
    expected = torch.tensor(
        [
            [sum(float(u[r] @ hessians[r] @ v[r]) for r in range(6)) for v in tangents]
            for u in tangents
        ]
    )
    torch.testing.assert_close(_gauss_newton_gram(loss, output, tangents), expected)


def test_damping_split_survives_an_overflowed_factor():
    kfac = KFACPreconditioner(_mlp(), kl_clip=None)
    block = kfac.blocks["0"]
    block.a_factor = torch.eye(6) * 1e-300
    block.g_factor = torch.eye(4) * 1e300  # pi = sqrt(1e-300 / 1e300) underflows to 0
    a_damping, g_damping = block.split_damping(1e-2)
    assert a_damping == g_damping == pytest.approx(0.1)


def test_chain_forward_mode_equals_torch_forward_mode():
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Linear(5, 6),
        nn.Tanh(),
        nn.Linear(6, 6, bias=False),
        nn.GELU(),
        nn.Linear(6, 4),
        nn.ReLU(),
        nn.Identity(),
        nn.Linear(4, 4),
        nn.Sigmoid(),
        nn.Linear(4, 3),
    ).double()
    kfac = KFACPreconditioner(model, rescale=True, loss="mse", lr=1.0)
    assert [kind for kind, _ in kfac._chain_plan()] == [
        "linear",
        "elementwise",
        "linear",
        "rowwise",
        "linear",
        "elementwise",
        "elementwise",
        "linear",
        "elementwise",
        "linear",
    ]
    named = list(model.named_parameters())
    x = torch.randn(9, 5)
    vectors = [torch.randn(sum(p.numel() for _, p in named)) for _ in range(2)]
    kfac._chain = kfac._chain_plan()
    output, tangents = kfac._chain_jvps(named, x, vectors)

    params = {name: p.detach() for name, p in named}
    for vector, tangent in zip(vectors, tangents, strict=True):
        pieces = dict(
            zip(
                params,
                (
                    piece.view_as(p)
                    for piece, p in zip(
                        torch.split(vector, [p.numel() for p in params.values()]),
                        params.values(),
                        strict=True,
                    )
                ),
                strict=True,
            )
        )
        expected_output, expected_tangent = torch.func.jvp(
            lambda theta: torch.func.functional_call(model, theta, (x,)), (params,), (pieces,)
        )
        torch.testing.assert_close(output, expected_output)
        torch.testing.assert_close(tangent, expected_tangent)


def test_models_off_the_chain_take_the_generic_forward_mode():
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(5, 5)

        def forward(self, x):
            return x + torch.tanh(self.inner(x))

    uncovered = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    for model in (Residual().double(), uncovered):
        kfac = KFACPreconditioner(model, rescale=True, loss="mse", lr=1.0)
        assert kfac._chain_plan() is False
        named = list(model.named_parameters())
        x = torch.randn(4, 5)
        vector = torch.randn(sum(p.numel() for _, p in named))
        output, tangents = kfac._jvps(named, x, [vector])
        assert tangents.shape == (1, *output.shape)


# ---------------------------------------------------------------- the chain's fast path: only
# plain, unhooked, unparametrized Linear layers; one pass per direction for modules that mix rows


def _reference_jvps(kfac, model, x, vectors):
    """torch.func.jvp through functional_call, one vector at a time, on copies of the buffers,
    K-FAC's own hooks off: what the rescaling solve must see."""
    named = [(name, p) for name, p in model.named_parameters()]
    params = {name: p.detach() for name, p in named}
    sizes = [p.numel() for _, p in named]
    kfac._hooks_enabled = False
    try:
        outputs, tangents = [], []
        for vector in vectors:
            pieces = {
                name: piece.view_as(p)
                for (name, p), piece in zip(named, torch.split(vector, sizes), strict=True)
            }

            def f(theta):
                buffers = {name: b.clone() for name, b in model.named_buffers()}
                return torch.func.functional_call(model, {**buffers, **theta}, (x,))

            output, tangent = torch.func.jvp(f, (params,), (pieces,))
            outputs.append(output)
            tangents.append(tangent)
    finally:
        kfac._hooks_enabled = True
    return outputs[0], torch.stack(tangents)


class _DoubledLinear(nn.Linear):
    """A Linear subclass whose forward is not F.linear on its own weight."""

    def forward(self, x):
        return F.linear(x, 2.0 * self.weight, self.bias)


class _Scaled(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, weight):
        return weight * self.factor


def _hooked_linear() -> nn.Linear:
    layer = nn.Linear(4, 4)
    layer.register_forward_hook(lambda module, inputs, output: output * 3.0)
    return layer


def _pre_hooked_linear() -> nn.Linear:
    layer = nn.Linear(4, 4)
    layer.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 0.5,))
    return layer


def _parametrized_linear() -> nn.Linear:
    layer = nn.Linear(4, 4)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", _Scaled(-1.5))
    return layer


def _hooked_tanh() -> nn.Tanh:
    tanh = nn.Tanh()
    tanh.register_forward_hook(lambda module, inputs, output: output + output**2)
    return tanh


def _odd_chain(kind: str) -> nn.Sequential:
    torch.manual_seed(11)
    middle = {
        "subclass": lambda: _DoubledLinear(4, 4),
        "forward_hook": _hooked_linear,
        "pre_hook": _pre_hooked_linear,
        "parametrized": _parametrized_linear,
        "hooked_activation": lambda: nn.Sequential(nn.Linear(4, 4), _hooked_tanh()),
    }[kind]()
    layers = [nn.Linear(5, 4), nn.Tanh()]
    layers += list(middle) if isinstance(middle, nn.Sequential) else [middle]
    layers += [nn.Tanh(), nn.Linear(4, 3)]
    return nn.Sequential(*layers).double()


def _rescaled_alpha_mu(model, x, y, *, generic: bool, steps: int = 2):
    kfac = KFACPreconditioner(
        model, rescale=True, loss="cross_entropy", damping=0.05, lr=1.0, compute_method="inverse"
    )
    if generic:
        kfac._chain_plan = lambda: False
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(steps):  # the second step solves the full 2x2 system
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        kfac.step(x, y, float(loss))
        optimizer.step()
    return kfac.alpha_mu


@pytest.mark.parametrize(
    "kind", ["subclass", "forward_hook", "pre_hook", "parametrized", "hooked_activation"]
)
def test_linear_layers_the_fast_path_cannot_see_through_take_torch_forward_mode(kind):
    model = _odd_chain(kind)
    kfac = KFACPreconditioner(model, rescale=True, loss="cross_entropy", lr=1.0)
    plan = kfac._chain_plan()
    if kind == "hooked_activation":  # the Linear layers stay; the hooked Tanh is a module
        assert [k for k, _ in plan] == [
            "linear",
            "elementwise",
            "linear",
            "module",
            "elementwise",
            "linear",
        ]
    else:
        assert plan is False
    named = list(model.named_parameters())
    x = torch.randn(6, 5)
    generator = torch.Generator().manual_seed(2)
    total = sum(p.numel() for _, p in named)
    vectors = [torch.randn(total, generator=generator) for _ in range(2)]
    output, tangents = kfac._jvps(named, x, vectors)
    expected_output, expected_tangents = _reference_jvps(kfac, model, x, vectors)
    torch.testing.assert_close(output, expected_output)
    torch.testing.assert_close(tangents, expected_tangents)

    # and so the rescaled step's alpha / mu are the generic path's
    x, y = _batch(n=12)
    got = _rescaled_alpha_mu(_odd_chain(kind), x, y, generic=False)
    expected = _rescaled_alpha_mu(_odd_chain(kind), x, y, generic=True)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert got[1] != 0.0


def test_global_forward_hooks_send_every_model_to_torch_forward_mode():
    kfac = KFACPreconditioner(_mlp(), rescale=True, loss="mse", lr=1.0)
    assert kfac._chain_plan()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert kfac._chain_plan() is False
    finally:
        handle.remove()
    assert kfac._chain_plan()


def test_a_sequential_subclass_with_its_own_forward_is_not_a_chain():
    class Doubled(nn.Sequential):
        def forward(self, x):
            return 2.0 * super().forward(x)

    model = Doubled(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    assert KFACPreconditioner(model, rescale=True, loss="mse", lr=1.0)._chain_plan() is False


def _batch_norm_chain() -> nn.Sequential:
    torch.manual_seed(5)
    return nn.Sequential(
        nn.Linear(5, 4), nn.BatchNorm1d(4, affine=False), nn.Tanh(), nn.Linear(4, 3)
    ).double()


def test_batch_norm_in_a_chain_takes_one_pass_per_direction_and_keeps_its_statistics():
    model = _batch_norm_chain().train()
    kfac = KFACPreconditioner(model, rescale=True, loss="cross_entropy", lr=1.0)
    assert [k for k, _ in kfac._chain_plan()] == ["linear", "module", "elementwise", "linear"]
    named = list(model.named_parameters())
    x = torch.randn(8, 5)
    generator = torch.Generator().manual_seed(4)
    total = sum(p.numel() for _, p in named)
    vectors = [torch.randn(total, generator=generator) for _ in range(2)]
    before = {name: b.clone() for name, b in model.named_buffers()}

    output, tangents = kfac._jvps(named, x, vectors)

    for name, b in model.named_buffers():  # the rescaling pass is not a training forward
        torch.testing.assert_close(b, before[name], rtol=0, atol=0)
    expected_output, expected_tangents = _reference_jvps(kfac, model, x, vectors)
    torch.testing.assert_close(output, expected_output)
    torch.testing.assert_close(tangents, expected_tangents)
    # the generic path agrees, and leaves the statistics alone as well
    generic_output, generic_tangents = kfac._generic_jvps(named, x, vectors)
    torch.testing.assert_close(generic_tangents, expected_tangents)
    for name, b in model.named_buffers():
        torch.testing.assert_close(b, before[name], rtol=0, atol=0)


@pytest.mark.parametrize("adapt_damping", [0, 1])
def test_a_rescaled_step_with_batch_norm_matches_the_generic_path(adapt_damping):
    x, y = _batch(n=12)
    results = []
    for generic in (False, True):
        model = _batch_norm_chain().train()
        kfac = KFACPreconditioner(
            model,
            rescale=True,
            adapt_damping=adapt_damping,
            loss="cross_entropy",
            damping=0.05,
            lr=1.0,
            compute_method="inverse",
        )
        if generic:
            kfac._chain_plan = lambda: False
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        statistics = []
        for _ in range(2):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            after_forward = {name: b.clone() for name, b in model.named_buffers()}
            kfac.step(x, y, float(loss))
            optimizer.step()
            for name, b in model.named_buffers():  # only the training forward moved them
                torch.testing.assert_close(b, after_forward[name], rtol=0, atol=0)
            statistics.append(after_forward)
        results.append((kfac.alpha_mu, kfac.lm_damping, statistics))
    (alpha_mu, damping, _), (expected_alpha_mu, expected_damping, _) = results
    assert alpha_mu == pytest.approx(expected_alpha_mu, rel=1e-9, abs=1e-12)
    assert damping == pytest.approx(expected_damping, rel=1e-12)
    assert alpha_mu[1] != 0.0


# ---------------------------------------------------------------- callable intervals, checkpoints


def test_a_checkpoint_does_not_replace_a_callable_interval_schedule():
    model = _mlp()
    kfac = KFACPreconditioner(model, factor_update_steps=3, inv_update_steps=2)
    state = kfac.state_dict()

    def schedule(step):
        return 1 if step < 100 else 5

    restored = KFACPreconditioner(_mlp(), factor_update_steps=schedule, inv_update_steps=4)
    with pytest.warns(UserWarning, match="factor_update_steps=3.*callable"):
        restored.load_state_dict(state)
    assert restored.factor_update_steps is schedule  # code is the caller's, kept
    assert restored.inv_update_steps == 2  # an integer: the checkpoint's schedule goes on

    # a callable on both sides: nothing saved, nothing to warn about
    both = KFACPreconditioner(_mlp(), factor_update_steps=schedule, inv_update_steps=schedule)
    saved = both.state_dict()
    assert "factor_update_steps" not in saved and "inv_update_steps" not in saved
    again = KFACPreconditioner(_mlp(), factor_update_steps=schedule, inv_update_steps=schedule)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.load_state_dict(saved)
    assert again.factor_update_steps is schedule and again.inv_update_steps is schedule
