"""RDA with a target sparsity: the threshold follows the cubic ramp, lands exactly on the target,
lets zeroed weights come back, equals its closed form, and resumes onto the same trajectory."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from distrib_rda.optim import RDA, cubic_sparsity, magnitude_quantile, rda_param_groups
from distrib_rda.optimizers import OPTIMIZERS


def zero_fraction(tensors) -> float:
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                         nn.Linear(32, 3))


def target_optimizer(model: nn.Module, *, target=0.9, ramp=(5, 40), every=1, threshold="soft",
                     **kwargs) -> RDA:
    groups = rda_param_groups(model, 0.0)
    groups[0].update(target_sparsity=target, ramp=ramp, reselect_every=every)
    return RDA(groups, gamma=0.5, warmup=10, threshold=threshold, **kwargs)


def train(model: nn.Module, optimizer: RDA, steps: int, seed: int = 1, record=None) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(32, 20, generator=generator)
        y = x[:, :3].argmax(1)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if record is not None:
            record.append(zero_fraction([w for w in optimizer.param_groups[0]["params"]]))


@pytest.mark.parametrize("threshold", ["soft", "hard"])
@pytest.mark.parametrize("every", [1, 7])
def test_the_sparsity_follows_the_ramp_and_ends_exactly_at_the_target(threshold, every):
    model = mlp()
    optimizer = target_optimizer(model, target=0.9, ramp=(5, 40), every=every,
                                 threshold=threshold)
    zeros: list[float] = []
    train(model, optimizer, 60, record=zeros)
    weights = optimizer.param_groups[0]["params"]
    count = sum(w.numel() for w in weights)
    # at the reselection steps the count of zeros is the schedule's, exactly
    for t in range(5, 61):
        if (t - 5) % every == 0 or t == 40:
            expected = round(cubic_sparsity(t, 5, 40, 0.9) * count)
            assert round(zeros[t - 1] * count) == expected, t
    assert zeros[3] == 0.0  # before the ramp: dense
    optimizer.project()  # what the loop does at the end of an epoch
    assert sum(int((w == 0).sum()) for w in weights) == round(0.9 * count)
    assert all(int((b == 0).sum()) == 0 for b in optimizer.param_groups[1]["params"])


def test_lambda_is_found_and_is_the_l1_strength_of_the_update():
    """lambda_t = tau_t * beta_t / t, and the update is S_tau(u) with u = w1 - G/beta (float64)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(50, dtype=torch.float64))
    center = weight.detach().clone()
    optimizer = RDA([{"params": [weight], "target_sparsity": 0.6, "ramp": (0, 3),
                      "reselect_every": 1}], gamma=2.0, warmup=4.0)
    dual = torch.zeros_like(center)
    for t in range(1, 6):
        grad = torch.randn(50, dtype=torch.float64)
        weight.grad = grad.clone()
        optimizer.step()
        dual += grad
        beta = 2.0 * math.sqrt(t + 4.0)
        u = center - dual / beta
        k = round(cubic_sparsity(t, 0, 3, 0.6) * 50)
        tau = u.abs().kthvalue(k).values.item() if k else 0.0
        expected = torch.sign(u) * (u.abs() - tau).clamp(min=0)
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-12, atol=1e-12)
        assert optimizer.param_groups[0]["lambda_"] == pytest.approx(tau * beta / t, rel=1e-12)


def test_hard_threshold_keeps_the_survivors_whole():
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(40, dtype=torch.float64))
    center = weight.detach().clone()
    optimizer = RDA([{"params": [weight], "target_sparsity": 0.5, "ramp": (0, 1),
                      "reselect_every": 1}], gamma=1.0, threshold="hard")
    grad = torch.randn(40, dtype=torch.float64)
    weight.grad = grad.clone()
    optimizer.step()
    u = center - grad / 1.0
    tau = u.abs().kthvalue(20).values
    torch.testing.assert_close(weight.detach(), torch.where(u.abs() > tau, u, 0.0))


@pytest.mark.parametrize("foreach", [False, True])
def test_hard_threshold_with_the_adaptive_beta_keeps_survivors_whole(foreach):
    """Per element beta = gamma*(sqrt(Q) + eps): w = u * 1[|u| > t*lambda/beta] (float64)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(60, dtype=torch.float64))
    center = weight.detach().clone()
    optimizer = RDA([weight], lambda_=0.05, gamma=2.0, adaptive=True, eps=1e-3,
                    threshold="hard", foreach=foreach)
    dual, squares = torch.zeros_like(center), torch.zeros_like(center)
    for t in range(1, 4):
        grad = torch.randn(60, dtype=torch.float64)
        weight.grad = grad.clone()
        optimizer.step()
        dual, squares = dual + grad, squares + grad**2
        beta = 2.0 * (squares.sqrt() + 1e-3)
        u = center - dual / beta
        expected = torch.where(u.abs() > t * 0.05 / beta, u, 0.0)
        torch.testing.assert_close(weight.detach(), expected, rtol=1e-12, atol=1e-12)
    assert (weight == 0).any() and (weight != 0).any()


def test_a_zeroed_weight_comes_back_when_its_gradient_keeps_pushing():
    """Two weights, one kept: the first has the larger start but no gradient; the second's
    gradient keeps pushing it out, its dual average passes the first, and it comes back."""
    weight = nn.Parameter(torch.tensor([1.0, 0.1]))
    optimizer = RDA([{"params": [weight], "target_sparsity": 0.5, "ramp": (0, 1),
                      "reselect_every": 1}], gamma=1.0, warmup=0.0)
    history = []
    for _ in range(30):
        weight.grad = torch.tensor([0.0, -0.2])  # descent pushes the second weight up
        optimizer.step()
        history.append(weight.detach().clone())
    assert history[0][1] == 0 and history[0][0] != 0  # first zeroed: the smaller one
    assert history[-1][1] > 0 and history[-1][0] == 0  # it came back; the idle one left


def test_a_checkpoint_mid_ramp_resumes_onto_the_same_trajectory():
    model = mlp()
    optimizer = target_optimizer(model, ramp=(5, 40), every=3)
    train(model, optimizer, 20, seed=1)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(optimizer.state_dict())
    train(model, optimizer, 25, seed=2)

    resumed = mlp(seed=9)
    resumed.load_state_dict(saved_model)
    again = target_optimizer(resumed, ramp=(5, 40), every=3)
    again.load_state_dict(saved)
    train(resumed, again, 25, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert again.param_groups[0]["lambda_"] == optimizer.param_groups[0]["lambda_"]


def test_magnitude_quantile_counts_over_all_tensors_together():
    tensors = [torch.tensor([3.0, -1.0]), torch.tensor([[0.5, -4.0], [2.0, 0.1]])]
    assert magnitude_quantile(tensors, 0.5) == 1.0
    assert magnitude_quantile(tensors, 0.0) == 0.0


@pytest.mark.parametrize("kind", ["gaussian", "ties and zeros", "layers of other scales"])
def test_magnitude_quantile_of_a_large_model_is_the_exact_kth_magnitude(kind):
    """Above a million elements the quantile is bracketed by a sample and selected among the
    bracket: the same value as selecting among all magnitudes, whatever their distribution."""
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(1_200_000, generator=generator)
    tensors = {"gaussian": [big, torch.randn(7, generator=generator)],
               "ties and zeros": [big.round(), torch.zeros(300_000)],
               "layers of other scales": [big * 1e-3, torch.randn(500, 400) * 10,
                                          torch.randn(300_000) * 0.5]}[kind]
    everything = torch.cat([t.reshape(-1).abs() for t in tensors])
    for sparsity in (1e-6, 0.3, 0.9, 0.95, 0.98, 0.99, 0.9999, 1.0):
        k = min(round(sparsity * everything.numel()), everything.numel())
        assert k >= 1
        assert magnitude_quantile(tensors, sparsity) == float(everything.kthvalue(k).values)


@pytest.mark.parametrize(("group", "message"), [
    ({"target_sparsity": 1.0}, "target_sparsity must be"),
    ({"target_sparsity": 0.9, "ramp": (10, 5)}, "ramp"),
    ({"target_sparsity": 0.9, "ramp": (-1, 5)}, "ramp"),
    ({"target_sparsity": 0.9, "reselect_every": 0}, "reselect_every"),
    ({"target_sparsity": 0.9, "adaptive": True}, "adaptive"),
])
def test_bad_target_settings_are_refused(group, message):
    weight = nn.Parameter(torch.randn(10))
    with pytest.raises(ValueError, match=message):
        RDA([{"params": [weight], "ramp": (0, 10), **group}])


def test_the_product_builds_the_target_mode_from_the_config():
    settings = OPTIMIZERS["rda"](target_sparsity=0.8, ramp=(0.2, 0.6))
    model = mlp()
    parts = settings.build(model, total_steps=100)
    group = parts.optimizer.param_groups[0]
    assert group["target_sparsity"] == 0.8 and tuple(group["ramp"]) == (20, 60)
    assert parts.optimizer.param_groups[1].get("target_sparsity") is None
