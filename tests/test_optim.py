"""RDA, proximal SGD, magnitude pruning and parameter groups, pinned to DESIGN.md section 2."""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from distrib_rda.optim import RDA, MagnitudePruner, ProxSGD, prunable_weights, rda_param_groups
from distrib_rda.optim.rda import chunk_size, rda

# One tensor larger than a chunk of the per-tensor path, one not contiguous, small ones.
SHAPES = [(2 * chunk_size() + 1234,), (6, 3, 3, 3), (17,), (4, 5)]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_params(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in SHAPES:
        p = torch.randn(shape, generator=gen, dtype=dtype) * 0.1
        if len(shape) == 4:
            p = p.to(memory_format=torch.channels_last)
        params.append(nn.Parameter(p))
    return params


def make_grads(n_steps, dtype=torch.float64, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(n_steps)]


def set_grads(params, grads):
    for p, g in zip(params, grads, strict=True):
        p.grad = torch.empty_like(p).copy_(g)  # same memory format as the parameter


def soft(u, tau):
    return torch.sign(u) * torch.clamp(u.abs() - tau, min=0)


def expected_rda(w1, grads, *, lam, gamma, adaptive, eps, center, warmup=0.0, power=0.5):
    """DESIGN.md section 2 written out: S_{t*lam/beta_t}(w1 - G_t/beta_t), with the
    scalar beta_t = gamma*(t + warmup)^power (gamma*sqrt(t) by default)."""
    t = len(grads)
    big_g = sum(grads)
    if adaptive:
        beta = gamma * (torch.sqrt(sum(g * g for g in grads)) + eps)
    else:
        beta = gamma * (t + warmup) ** power
    c = w1 if center == "init" else torch.zeros_like(w1)
    return soft(c - big_g / beta, t * lam / beta)

def step_and_check(opt, params, w1, grads, *, lam, **schedule):
    """Step through ``grads``; after each step every parameter equals the closed form (the
    first two parameters carry ``lam``, the rest lambda = 0) and the step count is t."""
    for t in range(1, len(grads) + 1):
        set_grads(params, grads[t - 1])
        opt.step()
        for i, p in enumerate(params):
            want = expected_rda(w1[i], [g[i] for g in grads[:t]], lam=lam if i < 2 else 0.0,
                                **schedule)
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-15)
            assert opt.state[p]["step"] == t



def two_groups(params, lam):
    return [{"params": params[:2], "lambda_": lam}, {"params": params[2:], "lambda_": 0.0}]


# --------------------------------------------------------------------------------------- RDA


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("center", ["init", "zero"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_rda_closed_form_over_steps_float64(adaptive, center, foreach):
    params = make_params()
    w1 = [p.detach().clone() for p in params]
    grads = make_grads(4)
    lam, gamma, eps = 0.05, 1.7, 1e-3
    opt = RDA(
        two_groups(params, lam),
        gamma=gamma,
        adaptive=adaptive,
        eps=eps,
        center=center,
        foreach=foreach,
    )
    step_and_check(opt, params, w1, grads, lam=lam, gamma=gamma, adaptive=adaptive, eps=eps,
                   center=center)
    # the l1 group has exact zeros, the lambda=0 group has none
    assert all((p == 0).any() for p in params[:2])
    assert not any((p == 0).any() for p in params[2:])


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("warmup,power", [(10.0, 0.5), (0.0, 0.3), (3.0, 1.0), (2.0, 0.0)])
def test_rda_scalar_schedule_warmup_and_power(warmup, power, foreach):
    params = make_params()
    w1 = [p.detach().clone() for p in params]
    grads = make_grads(3)
    opt = RDA(two_groups(params, 0.05), gamma=0.7, warmup=warmup, power=power, foreach=foreach)
    step_and_check(opt, params, w1, grads, lam=0.05, gamma=0.7, adaptive=False, eps=0,
                   center="init", warmup=warmup, power=power)


def test_rda_state_holds_center_sum_step_and_sq_sum():
    params = make_params()
    grads = make_grads(3)
    opt = RDA(params, lambda_=0.01, adaptive=True)
    w1 = [p.detach().clone() for p in params]
    for gs in grads:
        set_grads(params, gs)
        opt.step()
    for i, p in enumerate(params):
        st = opt.state[p]
        assert torch.equal(st["center"], w1[i])
        torch.testing.assert_close(st["dual_sum"], sum(g[i] for g in grads))
        torch.testing.assert_close(st["sq_sum"], sum(g[i] ** 2 for g in grads))
        assert st["step"] == 3


def test_rda_lambda_zero_is_plain_dual_averaging():
    params = make_params()
    grads = make_grads(5)
    w1 = [p.detach().clone() for p in params]
    opt = RDA(params, lambda_=0.0, gamma=0.5)
    for gs in grads:
        set_grads(params, gs)
        opt.step()
    for i, p in enumerate(params):
        want = w1[i] - sum(g[i] for g in grads) / (0.5 * math.sqrt(5))
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("foreach", [False, True])
def test_rda_skips_parameters_without_gradient(foreach):
    params = make_params()
    w1 = [p.detach().clone() for p in params]
    grads = make_grads(3)
    opt = RDA(params, lambda_=0.1, foreach=foreach)
    set_grads(params, grads[0])
    params[1].grad = None
    opt.step()
    assert torch.equal(params[1].detach(), w1[1])
    assert opt.state[params[1]]["step"] == 0
    assert opt.state[params[0]]["step"] == 1
    for gs in grads[1:]:  # from now on the group mixes t = 3 and t = 2
        set_grads(params, gs)
        opt.step()
    for i, p in enumerate(params):
        seen = [g[i] for g in (grads[1:] if i == 1 else grads)]
        want = expected_rda(w1[i], seen, lam=0.1, gamma=1.0, adaptive=False, eps=0, center="init")
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-15)


def run(opt_factory, params, grads, restart_at=(), project_at=()):
    opt = opt_factory(params)
    for k, gs in enumerate(grads):
        set_grads(params, gs)
        opt.step()
        if k in restart_at:
            opt.restart()
        if k in project_at:
            for d in opt.dual_state_tensors():
                d.mul_(0.5)
            opt.project()
    return [p.detach().clone() for p in params], opt


@pytest.mark.parametrize("center", ["init", "zero"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_rda_foreach_equals_per_tensor(adaptive, center):
    grads = make_grads(6, dtype=torch.float32)
    results = []
    for foreach in (False, True):
        params = make_params(dtype=torch.float32)

        def factory(ps, foreach=foreach):
            return RDA(
                two_groups(ps, 0.02),
                gamma=0.8,
                adaptive=adaptive,
                center=center,
                foreach=foreach,
            )

        restart = (3,) if center == "init" else ()
        results.append(run(factory, params, grads, restart_at=restart, project_at=(4,))[0])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("center", ["init", "zero"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_rda_fused_equals_per_tensor_without_recompiling(adaptive, center):
    """The compiled kernels give the per-tensor numbers up to float32 rounding, and a moving
    schedule (new alpha and tau every step) reuses the graphs compiled at the first steps."""
    from torch._dynamo.utils import counters

    grads = make_grads(8, dtype=torch.float32)
    results = []
    for fused in (False, True):
        params = make_params(dtype=torch.float32)

        def factory(ps, fused=fused):
            return RDA(two_groups(ps, 0.02), gamma=0.8, warmup=2.0, adaptive=adaptive,
                       center=center, fused=fused)

        restart = (3,) if center == "init" else ()
        graphs_before = counters["stats"]["unique_graphs"]
        results.append(run(factory, params, grads[:5], restart_at=restart, project_at=(4,))[0])
        graphs_after_five = counters["stats"]["unique_graphs"]
        run(factory, params, grads[5:])
        assert counters["stats"]["unique_graphs"] == graphs_after_five
        assert (graphs_after_five > graphs_before) == fused
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("adaptive", [False, True])
def test_rda_default_path_equals_per_tensor(adaptive):
    """foreach=None on the CPU: small tensors through the multi-tensor kernel, large ones per
    tensor; the numbers are those of the per-tensor path."""
    grads = make_grads(6, dtype=torch.float32)
    results = []
    for foreach in (None, False):
        params = make_params(dtype=torch.float32)

        def factory(ps, foreach=foreach):
            return RDA(two_groups(ps, 0.02), gamma=0.8, adaptive=adaptive, foreach=foreach)

        results.append(run(factory, params, grads, restart_at=(2,), project_at=(4,))[0])
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "adaptive,gamma,center",
    [(False, 1.0, "init"), (False, 1.0, "zero"), (True, 1.0, "init"), (True, 0.5, "zero")],
)
def test_rda_full_batch_lasso_approaches_sklearn(adaptive, gamma, center):
    sklearn = pytest.importorskip("sklearn.linear_model")
    rng = np.random.default_rng(0)
    n, d = 200, 30
    x = rng.standard_normal((n, d))
    w_true = np.zeros(d)
    w_true[:5] = [2.0, -1.5, 1.0, -0.8, 0.5]
    y = x @ w_true + 0.3 * rng.standard_normal(n)
    alpha = 0.1
    # sklearn minimizes 1/(2n)||y - Xw||^2 + alpha*||w||_1: the same loss, lambda = alpha.
    ref = sklearn.Lasso(alpha=alpha, fit_intercept=False, tol=1e-12, max_iter=100_000)
    w_ref = ref.fit(x, y).coef_

    def objective(w):
        return 0.5 / n * np.sum((y - x @ w) ** 2) + alpha * np.abs(w).sum()

    f_star = objective(w_ref)
    xt, yt = torch.tensor(x), torch.tensor(y)
    gen = torch.Generator().manual_seed(0)
    w = nn.Parameter(0.1 * torch.randn(d, dtype=torch.float64, generator=gen))
    opt = RDA([w], lambda_=alpha, gamma=gamma, adaptive=adaptive, center=center)
    gaps = {}
    for t in range(1, 1001):
        with torch.no_grad():
            w.grad = xt.T @ (xt @ w - yt) / n
        opt.step()
        if t in (100, 1000):
            gaps[t] = objective(w.detach().numpy()) - f_star
    assert 0 <= gaps[1000] < gaps[100]
    assert gaps[1000] < 3e-3 * f_star
    support = set(np.flatnonzero(w.detach().numpy()))
    assert support == set(np.flatnonzero(w_ref)) == set(range(5))
    np.testing.assert_allclose(w.detach().numpy(), w_ref, atol=0.05)


@pytest.mark.parametrize("adaptive", [False, True])
def test_rda_state_dict_round_trips_and_resume_continues_trajectory(adaptive):
    grads = make_grads(8, dtype=torch.float32)

    def factory(ps):
        return RDA(two_groups(ps, 0.02), gamma=0.9, adaptive=adaptive, foreach=False)

    params = make_params(dtype=torch.float32)
    opt = factory(params)
    for gs in grads[:4]:
        set_grads(params, gs)
        opt.step()
    opt.restart()
    set_grads(params, grads[4])
    opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buf)
    for gs in grads[5:]:
        set_grads(params, gs)
        opt.step()
    straight = [p.detach().clone() for p in params]

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    params2 = [nn.Parameter(t) for t in ckpt["params"]]
    opt2 = factory(params2)
    opt2.load_state_dict(ckpt["opt"])
    sd = opt2.state_dict()
    for k, st in ckpt["opt"]["state"].items():
        assert st.keys() == sd["state"][k].keys()
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(sd["state"][k][key]))
    assert ckpt["opt"]["param_groups"] == sd["param_groups"]
    for gs in grads[5:]:
        set_grads(params2, gs)
        opt2.step()
    for a, b in zip(straight, params2, strict=True):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lambda_": -0.1}, r"lambda_ must be .*>= 0"),
        ({"lambda_": float("nan")}, r"lambda_ must be .*>= 0"),
        ({"gamma": 0.0}, r"gamma must be .*> 0"),
        ({"gamma": -1.0}, r"gamma must be .*> 0"),
        ({"eps": 0.0}, r"eps must be .*> 0"),
        ({"center": "origin"}, r"center must be one of init, zero"),
        ({"adaptive": "yes"}, r"adaptive must be True or False"),
        ({"foreach": "auto"}, r"foreach must be None, True or False"),
        ({"fused": 1}, r"fused must be None, True or False"),
        ({"fused": True, "foreach": True}, r"fused and foreach cannot both be True"),
        ({"warmup": -1.0}, r"warmup must be .*>= 0"),
        ({"power": 1.5}, r"power must be in \[0, 1\]"),
        ({"power": -0.5}, r"power must be .*>= 0"),
    ],
)
def test_rda_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RDA(make_params(), **kwargs)
    with pytest.raises(ValueError, match=match):
        RDA([{"params": make_params(), **kwargs}])


def test_rda_refuses_sparse_gradients_and_bad_group_values_at_step():
    emb = nn.Embedding(10, 3, sparse=True)
    opt = RDA(emb.parameters(), lambda_=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        opt.step()
    params = make_params()
    opt = RDA(params)
    opt.param_groups[0]["gamma"] = -2.0
    set_grads(params, make_grads(1)[0])
    with pytest.raises(ValueError, match="gamma must be"):
        opt.step()


def regression_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 20, generator=gen)
    w_true = torch.zeros(20)
    w_true[:4] = torch.tensor([1.0, -2.0, 0.5, 1.5])
    y = x @ w_true + 0.1 * torch.randn(512, generator=gen)
    return x, y


def train_steps(model, opt, x, y, steps, start, batch=32):
    losses = []
    for k in range(start, start + steps):
        i = (k * batch) % len(x)
        opt.zero_grad()
        loss = ((model(x[i : i + batch]).squeeze(-1) - y[i : i + batch]) ** 2).mean()
        loss.backward()
        opt.step()
        with torch.no_grad():
            losses.append(float(((model(x).squeeze(-1) - y) ** 2).mean()))
    return losses


def test_rda_restart_keeps_the_step_continuous():
    x, y = regression_problem()

    def trained(restart):
        torch.manual_seed(0)
        model = nn.Linear(20, 1)
        opt = RDA(rda_param_groups(model, 1e-3), gamma=2.0)
        before = train_steps(model, opt, x, y, 200, 0)
        w_prev = model.weight.detach().clone()
        train_steps(model, opt, x, y, 1, 200)  # one more step, to measure a normal move
        normal_move = (model.weight.detach() - w_prev).norm()
        w_before = model.weight.detach().clone()
        restart(opt)
        after = train_steps(model, opt, x, y, 1, 201)
        jump = (model.weight.detach() - w_before).norm()
        more = train_steps(model, opt, x, y, 100, 202)
        return before[-1], after[0], more[-1], float(jump), float(normal_move), opt

    def naive(opt):
        opt.restart()
        for st in opt.state.values():
            st["step"] = st["restart_step"] = 0

    loss0, loss1, loss_end, jump, normal, opt = trained(RDA.restart)
    assert jump < 3 * normal
    assert abs(loss1 - loss0) < 0.05 * loss0 + 1e-3
    assert loss_end < 2 * loss0 + 1e-3
    st = opt.state[opt.param_groups[0]["params"][0]]
    assert st["restart_step"] == 201 and st["step"] == 302

    # the same test catches the naive restart (t <- 0 with the same gamma)
    n_loss0, n_loss1, _, n_jump, n_normal, _ = trained(naive)
    assert n_jump > 5 * n_normal


def test_rda_restart_recenters_and_refuses_zero_center():
    params = make_params()
    opt = RDA(params, lambda_=0.01)
    for gs in make_grads(2):
        set_grads(params, gs)
        opt.step()
    opt.restart()
    for p in params:
        st = opt.state[p]
        assert torch.equal(st["center"], p.detach())
        assert not st["dual_sum"].any()
        assert st["restart_step"] == st["step"] == 2
    # threshold counts from the restart: (t - t0)*lam/beta_t with beta on the global t
    g = make_grads(1, seed=7)[0]
    set_grads(params, g)
    w = [p.detach().clone() for p in params]
    opt.step()
    for i, p in enumerate(params):
        beta = math.sqrt(3)
        torch.testing.assert_close(p.detach(), soft(w[i] - g[i] / beta, 0.01 / beta))
    with pytest.raises(ValueError, match="center='init'"):
        RDA(make_params(), center="zero").restart()


def test_rda_dual_averaging_sync_makes_ranks_equal():
    """Two 'ranks' with their own gradients; AVG of the dual tensors, then project()."""
    for adaptive in (False, True):
        grads_a, grads_b = make_grads(3, seed=1), make_grads(3, seed=2)
        ranks = []
        for grads in (grads_a, grads_b):
            params = make_params()
            opt = RDA(two_groups(params, 0.05), adaptive=adaptive)
            for gs in grads:
                set_grads(params, gs)
                opt.step()
            ranks.append((params, opt))
        duals_a, duals_b = (opt.dual_state_tensors() for _, opt in ranks)
        assert len(duals_a) == len(SHAPES) * (2 if adaptive else 1)
        for da, db in zip(duals_a, duals_b, strict=True):
            mean = (da + db) / 2
            da.copy_(mean)
            db.copy_(mean)
        for _, opt in ranks:
            opt.project()
        w1 = make_params()
        for i, (pa, pb) in enumerate(zip(ranks[0][0], ranks[1][0], strict=True)):
            assert torch.equal(pa, pb)
            avg = [(ga[i] + gb[i]) / 2 for ga, gb in zip(grads_a, grads_b, strict=True)]
            if not adaptive:
                want = expected_rda(
                    w1[i].detach(),
                    avg,
                    lam=0.05 if i < 2 else 0.0,
                    gamma=1.0,
                    adaptive=False,
                    eps=1e-8,
                    center="init",
                )
                torch.testing.assert_close(pa.detach(), want, rtol=1e-12, atol=1e-15)


def test_rda_project_before_any_step_leaves_weights():
    params = make_params()
    before = [p.detach().clone() for p in params]
    RDA(params, lambda_=0.5).project()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))


@pytest.mark.parametrize("foreach", [False, True, None])
@pytest.mark.parametrize("center", ["init", "zero"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_functional_rda_equals_class_step_and_closed_form_float64(adaptive, center, foreach):
    """rda() on plain lists gives the class's numbers, the closed form of DESIGN.md, and
    counts the steps; with grads=None it projects without counting."""
    grads = make_grads(3)
    lam, gamma, eps = 0.05, 1.3, 1e-3
    kwargs = dict(gamma=gamma, adaptive=adaptive, eps=eps, foreach=foreach)
    params = make_params()
    w1 = [p.detach().clone() for p in params]
    opt = RDA(two_groups(params, lam), center=center, **kwargs)
    weights = [p.detach().clone() for p in make_params()]
    duals = [torch.zeros_like(w) for w in weights]
    sq_sums = [torch.zeros_like(w) for w in weights] if adaptive else None
    steps = [torch.tensor(0.0) for _ in weights]
    centers = w1 if center == "init" else None

    def functional(grads_t, lo, hi, lambda_):
        rda(weights[lo:hi], None if grads_t is None else grads_t[lo:hi],
            None if centers is None else centers[lo:hi], duals[lo:hi],
            None if sq_sums is None else sq_sums[lo:hi], steps[lo:hi], lambda_=lambda_, **kwargs)

    for t in range(1, len(grads) + 1):
        set_grads(params, grads[t - 1])
        opt.step()
        functional(grads[t - 1], 0, 2, lam)
        functional(grads[t - 1], 2, 4, 0.0)
        for i, (p, w) in enumerate(zip(params, weights, strict=True)):
            want = expected_rda(w1[i], [g[i] for g in grads[:t]], lam=lam if i < 2 else 0.0,
                                gamma=gamma, adaptive=adaptive, eps=eps, center=center)
            torch.testing.assert_close(w, want, rtol=1e-12, atol=1e-15)
            assert torch.equal(w, p.detach())
        assert [s.item() for s in steps] == [t] * 4

    for d in duals:
        d.mul_(0.5)
    functional(None, 0, 2, lam)
    t = len(grads)
    for i in range(2):
        if adaptive:
            beta = gamma * (torch.sqrt(sum(g[i] ** 2 for g in grads)) + eps)
        else:
            beta = gamma * math.sqrt(t)
        c = w1[i] if center == "init" else torch.zeros_like(w1[i])
        want = soft(c - 0.5 * sum(g[i] for g in grads) / beta, t * lam / beta)
        torch.testing.assert_close(weights[i], want, rtol=1e-12, atol=1e-15)
    assert [s.item() for s in steps] == [t] * 4


def test_functional_rda_refuses_mismatched_lists():
    ps = [torch.zeros(3), torch.zeros(2)]
    z = [torch.zeros(3), torch.zeros(2)]
    steps = [torch.tensor(0.0), torch.tensor(0.0)]
    with pytest.raises(ValueError, match="dual_sums has 1 entries for 2 parameters"):
        rda(ps, z, None, z[:1], None, steps, lambda_=0.0, gamma=1.0)
    with pytest.raises(ValueError, match="sq_sums must be given with adaptive=True"):
        rda(ps, z, None, z, None, steps, lambda_=0.0, gamma=1.0, adaptive=True)
    with pytest.raises(ValueError, match="sq_sums must be given with adaptive=True"):
        rda(ps, z, None, z, z, steps, lambda_=0.0, gamma=1.0)
    with pytest.raises(ValueError, match="gamma must be"):
        rda(ps, z, None, z, None, steps, lambda_=0.0, gamma=0.0)


@pytest.mark.parametrize("adaptive", [False, True])
def test_rda_step_is_a_tensor_and_int_step_checkpoints_load(adaptive):
    """The step count is a 0-dim float32 CPU tensor, as in torch's Adam; a checkpoint of an
    earlier version, whose counts are Python ints, loads and continues the same trajectory."""
    grads = make_grads(7, dtype=torch.float32)

    def factory(ps):
        return RDA(two_groups(ps, 0.02), gamma=0.9, adaptive=adaptive)

    params = make_params(dtype=torch.float32)
    opt = factory(params)
    for gs in grads[:3]:
        set_grads(params, gs)
        opt.step()
    opt.restart()
    set_grads(params, grads[3])
    opt.step()
    for p in params:
        step = opt.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.shape == ()
        assert step.dtype == torch.float32 and step.device.type == "cpu"
        assert step.item() == 4 and opt.state[p]["restart_step"] == 3
    old = copy.deepcopy(opt.state_dict())
    for st in old["state"].values():
        st["step"] = int(st["step"])
    saved = [p.detach().clone() for p in params]
    for gs in grads[4:]:
        set_grads(params, gs)
        opt.step()

    params2 = [nn.Parameter(w) for w in saved]
    opt2 = factory(params2)
    opt2.load_state_dict(old)
    assert all(isinstance(opt2.state[p]["step"], torch.Tensor) for p in params2)
    opt2.state[params2[0]]["step"] = 4  # set by hand: converted at the next step
    for gs in grads[4:]:
        set_grads(params2, gs)
        opt2.step()
    for a, b in zip(params, params2, strict=True):
        assert torch.equal(a, b)
    assert all(opt2.state[p]["step"].item() == 7 for p in params2)


@pytest.mark.parametrize("foreach", [False, True])
def test_rda_adaptive_chunks_channels_last_tensors(foreach):
    """The adaptive per-tensor path chunks a channels_last tensor larger than a chunk in memory
    order; both paths give the closed form."""
    shape = (64, 64, 6, 6)
    assert math.prod(shape) > chunk_size()
    gen = torch.Generator().manual_seed(3)
    w = nn.Parameter(torch.randn(shape, generator=gen, dtype=torch.float64)
                     .to(memory_format=torch.channels_last))
    w1 = w.detach().clone()
    grads = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    opt = RDA([w], lambda_=0.3, adaptive=True, eps=1e-3, foreach=foreach)
    for t in range(1, 4):
        w.grad = torch.empty_like(w).copy_(grads[t - 1])
        opt.step()
        want = expected_rda(w1, grads[:t], lam=0.3, gamma=1.0, adaptive=True, eps=1e-3,
                            center="init")
        torch.testing.assert_close(w.detach(), want, rtol=1e-12, atol=1e-15)
    assert (w == 0).any()


def test_importing_optim_does_not_load_the_compiler():
    """Importing the optimizers leaves Dynamo and Inductor unloaded (torch's own Optimizer loads
    Dynamo when a parameter group is added, for any optimizer); only fused=True compiles."""
    code = (
        "import sys\n"
        "import distrib_rda.optim\n"
        "print(sorted(m for m in ('torch._dynamo', 'torch._inductor') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"

    import distrib_rda.optim.rda as module

    compiled = dict(module._compiled)
    params = make_params(dtype=torch.float32)
    for adaptive in (False, True):
        run(lambda ps, adaptive=adaptive: RDA(ps, lambda_=0.1, adaptive=adaptive), params,
            make_grads(2, dtype=torch.float32))
    assert module._compiled == compiled


# ----------------------------------------------------------------------------------- ProxSGD


@pytest.mark.parametrize("foreach", [False, True])
def test_prox_sgd_soft_thresholds_after_momentum_step(foreach):
    params = make_params()
    w0 = [p.detach().clone() for p in params]
    grads = make_grads(2)
    lr, mu, lam = 0.1, 0.9, 0.3
    opt = ProxSGD(two_groups(params, lam), lr=lr, momentum=mu, foreach=foreach)
    set_grads(params, grads[0])
    opt.step()
    w1 = [soft(w0[i] - lr * grads[0][i], lr * lam if i < 2 else 0.0) for i in range(4)]
    for p, want in zip(params, w1, strict=True):
        torch.testing.assert_close(p.detach(), want)
    set_grads(params, grads[1])
    opt.step()
    for i, p in enumerate(params):
        buf = mu * grads[0][i] + grads[1][i]
        want = soft(w1[i] - lr * buf, lr * lam if i < 2 else 0.0)
        torch.testing.assert_close(p.detach(), want)
    assert all((p == 0).any() for p in params[:2])


def test_prox_sgd_threshold_follows_lr_scheduler():
    p = nn.Parameter(torch.tensor([0.5, -0.5, 0.05], dtype=torch.float64))
    opt = ProxSGD([p], lr=1.0, momentum=0.0, lambda_=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    p.grad = torch.zeros_like(p)
    opt.step()  # lr 1.0: threshold 0.1
    torch.testing.assert_close(p.detach(), torch.tensor([0.4, -0.4, 0.0], dtype=torch.float64))
    sched.step()
    opt.step()  # lr 0.1: threshold 0.01
    torch.testing.assert_close(p.detach(), torch.tensor([0.39, -0.39, 0.0], dtype=torch.float64))
    assert opt.param_groups[0]["lambda_"] == 0.1


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": 0.0}, r"lr must be .*> 0"),
        ({"lr": -1.0}, r"lr must be"),
        ({"lr": 0.1, "momentum": 1.0}, r"momentum must be in \[0, 1\)"),
        ({"lr": 0.1, "lambda_": -1.0}, r"lambda_ must be .*>= 0"),
        ({"lr": 0.1, "foreach": 1}, r"foreach must be"),
    ],
)
def test_prox_sgd_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProxSGD(make_params(), **kwargs)


# ------------------------------------------------------------------------------------ groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2, bias=False)
        self.head = nn.Sequential(nn.Linear(2, 3))

    def forward(self, x):
        x = self.bn(self.conv(x)).relu().mean((2, 3))
        return self.head(self.fc(x))


def test_param_groups_put_l1_on_conv_and_linear_weights_only():
    model = Tiny()
    names = [n for n, _ in prunable_weights(model)]
    assert names == ["conv", "fc", "head.0"]
    groups = rda_param_groups(model, 0.01)
    assert [g["lambda_"] for g in groups] == [0.01, 0.0]
    assert {id(p) for p in groups[0]["params"]} == {
        id(model.conv.weight),
        id(model.fc.weight),
        id(model.head[0].weight),
    }
    assert {id(p) for p in groups[1]["params"]} == {
        id(model.conv.bias),
        id(model.bn.weight),
        id(model.bn.bias),
        id(model.head[0].bias),
    }
    RDA(groups)  # usable as is
    with pytest.raises(ValueError, match="lambda_ must be"):
        rda_param_groups(model, -1.0)


def test_optim_imports_only_torch():
    import ast
    import sys
    from pathlib import Path

    import distrib_rda.optim

    allowed = {"torch", "distrib_rda", "__future__", *sys.stdlib_module_names}
    for path in Path(distrib_rda.optim.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("distrib_rda"):
                    assert name.startswith("distrib_rda.optim"), f"{path.name} imports {name}"


# ------------------------------------------------------------------------ magnitude pruning


def test_gmp_schedule_is_cubic_and_monotone():
    w = [nn.Parameter(torch.randn(100))]
    pr = MagnitudePruner(w, 0.9, start_step=10, end_step=110, frequency=10, initial_sparsity=0.1)
    assert pr.sparsity_at(0) == 0.0 and pr.sparsity_at(9) == 0.0
    assert pr.sparsity_at(10) == pytest.approx(0.1)
    assert pr.sparsity_at(110) == pr.sparsity_at(500) == 0.9
    for t in range(10, 111):
        assert pr.sparsity_at(t) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - (t - 10) / 100) ** 3)
    values = [pr.sparsity_at(t) for t in range(0, 200)]
    assert all(a <= b for a, b in zip(values[:-1], values[1:], strict=True))
    assert [t for t in range(200) if pr.is_pruning_step(t)] == list(range(10, 111, 10))


def test_gmp_reaches_target_and_masks_stay_applied():
    torch.manual_seed(0)
    model = Tiny()
    weights = prunable_weights(model)
    n = sum(w.numel() for _, w in weights)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pr = MagnitudePruner(weights, 0.75, start_step=2, end_step=12, frequency=3)
    x = torch.randn(8, 1, 6, 6)
    previous_zeros = 0
    for _ in range(20):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        pr.step()
        zeros = sum(int((w == 0).sum()) for _, w in weights)
        assert zeros >= previous_zeros  # masks are nested, and applied after every step
        previous_zeros = zeros
        for (_, w), m in zip(weights, pr.masks, strict=True):
            assert not w[~m].any()
    assert abs(zeros - round(0.75 * n)) <= 1
    assert pr.sparsity() == pytest.approx(0.75, abs=1 / n)


def test_gmp_with_end_equal_to_start_prunes_once_to_target():
    w = nn.Parameter(torch.arange(1.0, 11.0))
    pr = MagnitudePruner([w], 0.3, start_step=2, end_step=2, frequency=5)
    pr.step()
    assert not (w == 0).any()
    pr.step()
    assert torch.equal(w.detach(), torch.tensor([0.0, 0, 0, 4, 5, 6, 7, 8, 9, 10]))
    assert [pr.sparsity_at(t) for t in (1, 2, 3)] == [0.0, 0.3, 0.3]


def test_gmp_pruning_scheduled_at_step_zero_happens_at_the_first_step():
    w = nn.Parameter(torch.arange(1.0, 11.0))
    pr = MagnitudePruner([w], 0.3, start_step=0, end_step=0)
    pr.step()
    assert int((w == 0).sum()) == 3
    w2 = nn.Parameter(torch.arange(1.0, 101.0))
    pr2 = MagnitudePruner([w2], 0.8, start_step=0, end_step=10, frequency=5, initial_sparsity=0.5)
    pr2.step()  # covers the pruning at step 0 with s_1 of the schedule
    assert int((w2 == 0).sum()) == round(100 * pr2.sparsity_at(1))


def test_gmp_prunes_globally_by_magnitude():
    a = nn.Parameter(torch.tensor([0.1, -5.0, 0.2, 3.0]))
    b = nn.Parameter(torch.tensor([[0.05, -0.3], [4.0, 0.0]]))
    pr = MagnitudePruner([a, b], 0.5, start_step=0, end_step=1, frequency=1)
    pr.step()  # step 1 == end_step: prune to 50% of 8 = 4 smallest magnitudes
    assert torch.equal(a.detach(), torch.tensor([0.0, -5.0, 0.0, 3.0]))
    assert torch.equal(b.detach(), torch.tensor([[0.0, -0.3], [4.0, 0.0]]))


def test_gmp_state_dict_resumes_exactly():
    def setup(seed=0):
        torch.manual_seed(seed)
        model = Tiny()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        pr = MagnitudePruner(prunable_weights(model), 0.6, start_step=1, end_step=9, frequency=2)
        return model, opt, pr

    x = torch.randn(8, 1, 6, 6)

    def train(model, opt, pr, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            pr.step()

    model, opt, pr = setup()
    train(model, opt, pr, 4)
    buf = io.BytesIO()
    torch.save({"m": model.state_dict(), "o": opt.state_dict(), "p": pr.state_dict()}, buf)
    train(model, opt, pr, 8)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, opt2, pr2 = setup(seed=1)
    model2.load_state_dict(ckpt["m"])
    opt2.load_state_dict(ckpt["o"])
    pr2.load_state_dict(ckpt["p"])
    train(model2, opt2, pr2, 8)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(pr.masks, pr2.masks, strict=True))
    bad = copy.deepcopy(ckpt["p"])
    bad["schedule"]["end_step"] = 99
    with pytest.raises(ValueError, match="schedule"):
        pr2.load_state_dict(bad)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"target_sparsity": 1.0}, r"target_sparsity must be a number >= 0 and < 1"),
        ({"target_sparsity": -0.1}, r"target_sparsity must be"),
        ({"initial_sparsity": 0.95}, r"initial_sparsity must be a number >= 0 and <= 0.9"),
        ({"start_step": -1}, r"start_step must be an integer >= 0"),
        ({"end_step": 9}, r"end_step must be an integer >= 10"),
        ({"end_step": 10.5}, r"end_step must be an integer"),
        ({"frequency": 0}, r"frequency must be an integer >= 1"),
    ],
)
def test_gmp_refuses_bad_arguments(kwargs, match):
    args = dict(target_sparsity=0.9, start_step=10, end_step=20, frequency=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MagnitudePruner([nn.Parameter(torch.randn(4))], **args)
    with pytest.raises(ValueError, match="at least one parameter"):
        MagnitudePruner([], 0.5, 0, 10)
