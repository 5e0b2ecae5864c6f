"""Sparsity measured as exact zeros among conv and linear weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrib_rda.sparsity import layer_sparsity, nonzeros, num_prunable, sparsity


def tiny_model() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 2),  # weight 2*1*2*2 = 8
        nn.BatchNorm2d(2),
        nn.Flatten(),
        nn.Linear(4, 3),  # weight 12
    )
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(1.0)
        model[0].weight[0].zero_()  # 4 of 8 zeros
        model[3].weight[:, 0] = 0.0  # 3 of 12 zeros
        model[3].bias.zero_()  # biases and norms are not counted
        model[1].weight.zero_()
    return model


def test_counts_only_conv_and_linear_weights():
    model = tiny_model()
    assert num_prunable(model) == 20
    assert nonzeros(model) == 13
    assert sparsity(model) == pytest.approx(7 / 20)
    assert layer_sparsity(model) == {"0": pytest.approx(0.5), "3": pytest.approx(0.25)}


def test_negative_zero_counts_as_zero_and_tiny_values_do_not():
    model = tiny_model()
    with torch.no_grad():
        model[3].weight[0, 0] = -0.0
        model[3].weight[1, 0] = 1e-30
    assert nonzeros(model) == 14
    assert layer_sparsity(model)["3"] == pytest.approx(2 / 12)


def test_model_without_prunable_weights():
    model = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    assert num_prunable(model) == 0
    assert nonzeros(model) == 0
    assert sparsity(model) == 0.0
    assert layer_sparsity(model) == {}
