"""RDA schedule variants (warm-up, power): closed forms in float64 and the early-step bound."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distrib_rda.config import ConfigError, TrainConfig
from distrib_rda.optim import RDA

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES = [(300,), (4, 3, 3, 3), (7,)]


def make(seed=0, n_steps=5):
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64) * 0.1)
              for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
             for _ in range(n_steps)]
    return params, grads


def soft(u, tau):
    return torch.sign(u) * torch.clamp(u.abs() - tau, min=0)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(("warmup", "power"), [(0.0, 0.5), (9.0, 0.5), (25.0, 0.3), (3.0, 0.0)])
def test_schedule_closed_form_float64(warmup, power, foreach):
    """w_{t+1} = S_{t lam / beta_t}(w1 - G_t / beta_t), beta_t = gamma (t + t_w)^p."""
    params, grads = make()
    w1 = [p.detach().clone() for p in params]
    lam, gamma = 0.02, 0.7
    opt = RDA([{"params": params[:2], "lambda_": lam}, {"params": params[2:], "lambda_": 0.0}],
              gamma=gamma, warmup=warmup, power=power, foreach=foreach)
    for t in range(1, len(grads) + 1):
        for p, g in zip(params, grads[t - 1], strict=True):
            p.grad = g.clone()
        opt.step()
        beta = gamma * (t + warmup) ** power
        for i, p in enumerate(params):
            big_g = sum(g[i] for g in grads[:t])
            want = soft(w1[i] - big_g / beta, t * (lam if i < 2 else 0.0) / beta)
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-15)


def test_warmup_bounds_the_first_steps_and_keeps_the_tail():
    """With t_w the move of step t is at most |g|/(gamma sqrt(1 + t_w)) for a constant gradient;
    plain gamma sqrt(t) moves the first step by |g|/gamma. For t >> t_w both agree."""
    gamma, warmup = 0.3, 100.0
    plain = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    warm = nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opts = [RDA([plain], gamma=gamma), RDA([warm], gamma=gamma, warmup=warmup)]
    moves = {0: [], 1: []}
    for _ in range(20000):
        for k, (p, opt) in enumerate(zip((plain, warm), opts, strict=True)):
            before = p.item()
            p.grad = torch.ones_like(p)
            opt.step()
            moves[k].append(abs(p.item() - before))
    assert moves[0][0] == pytest.approx(1 / gamma)
    assert max(moves[1]) <= 1 / (gamma * math.sqrt(1 + warmup)) + 1e-12
    assert warm.item() == pytest.approx(plain.item(), rel=0.01)


def test_warmup_state_dict_round_trip_and_old_groups_default():
    params, grads = make()
    opt = RDA(params, lambda_=0.01, gamma=0.5, warmup=10.0, power=0.4)
    for gs in grads[:2]:
        for p, g in zip(params, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    state = opt.state_dict()
    assert state["param_groups"][0]["warmup"] == 10.0 and state["param_groups"][0]["power"] == 0.4
    # a checkpoint from before these options (no keys) loads as the plain schedule
    for group in state["param_groups"]:
        del group["warmup"], group["power"]
    other = RDA(params, lambda_=0.01, gamma=0.5, warmup=10.0)
    other.load_state_dict(state)
    for p, g in zip(params, grads[2], strict=True):
        p.grad = g.clone()
    other.step()
    assert other.param_groups[0]["warmup"] == 0.0 and other.param_groups[0]["power"] == 0.5


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"warmup": -1.0}, "warmup"), ({"power": 1.5}, "power"), ({"power": -0.1}, "power"),
    ({"warmup": float("nan")}, "warmup"),
])
def test_schedule_refuses_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RDA([nn.Parameter(torch.zeros(2))], **kwargs)


def test_config_keys_validate():
    cfg = TrainConfig.build(warmup=50, power=0.4)
    assert (cfg.optim.warmup, cfg.optim.power) == (50, 0.4)
    for bad in ({"warmup": -1}, {"power": 2}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            TrainConfig.build(**bad)


def test_finetune_keeps_the_support_and_trains_the_survivors():
    """m = 1[w != 0] at the start; after SGD steps every masked weight is still exactly 0,
    the survivors (and the biases) moved, and the loss went down."""
    from distrib_rda.sparsity import sparsity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.7)
    zero = [(layer.weight == 0).clone() for layer in (model[0], model[2])]
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    parts = TrainConfig.build(lr=0.1).optim.build_finetune(model, total_steps=50)
    losses = []
    for _ in range(50):
        loss = nn.functional.cross_entropy(model(x), y)
        parts.optimizer.zero_grad()
        loss.backward()
        parts.step()
        losses.append(loss.item())
    for mask, layer in zip(zero, (model[0], model[2]), strict=True):
        assert torch.equal(layer.weight[mask], torch.zeros(int(mask.sum())))
        assert (layer.weight[~mask] != 0).all()
    assert sparsity(model) == pytest.approx(float(sum(m.sum() for m in zero)) / 176)
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert losses[-1] < 0.95 * losses[0]
    state = parts.state_dict()
    again = TrainConfig.build(lr=0.1).optim.build_finetune(model, total_steps=50)
    again.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in
               zip(again.pruner.masks, parts.pruner.masks, strict=True))
