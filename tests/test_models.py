"""Every model builds for grey 28x28 and colour 32x32 data, and init_scale scales its weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distrib_rda.errors import UserError
from distrib_rda.models import MODELS, build_model

SHAPES = [(1, 28, 10), (3, 32, 10), (3, 32, 100)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize(("channels", "size", "classes"), SHAPES)
def test_output_shape(name, channels, size, classes):
    model = build_model(name, in_channels=channels, image_size=size, num_classes=classes)
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("name", "channels", "size", "expected"), [
    ("lenet5", 1, 28, 61_706),        # LeCun's 400-120-84 head: 28x28 is padded to 32x32
    ("lenet5", 3, 32, 62_006),
    ("lenet5-caffe", 1, 28, 431_080),  # 430,500 conv and linear weights, 580 biases
    ("lenet300", 1, 28, 266_610),
    ("resnet18", 3, 32, 11_173_962),  # torchvision ResNet-18 with a 3x3 stem
    ("resnet20", 3, 32, 272_474),     # option B shortcuts (option A would be 269,722)
    ("vgg16", 3, 32, 14_724_042),
])
def test_parameter_counts(name, channels, size, expected):
    model = build_model(name, in_channels=channels, image_size=size, num_classes=10)
    assert n_params(model) == expected


def test_resnet18_is_the_cifar_variant():
    model = build_model("resnet18", in_channels=3, image_size=32, num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert [len(stage) for stage in model.layers] == [2, 2, 2, 2]


def test_lenet5_caffe_has_the_literature_weight_count():
    from distrib_rda.sparsity import num_prunable

    model = build_model("lenet5-caffe", in_channels=1, image_size=28, num_classes=10)
    assert num_prunable(model) == 430_500


@pytest.mark.parametrize("name", ["lenet5", "resnet20"])
def test_init_scale_multiplies_conv_and_linear_weights(name):
    torch.manual_seed(3)
    plain = build_model(name, in_channels=3, image_size=32, num_classes=10)
    torch.manual_seed(3)
    scaled = build_model(name, in_channels=3, image_size=32, num_classes=10, init_scale=0.25)
    plain_modules = dict(plain.named_modules())
    checked = 0
    for module_name, module in scaled.named_modules():
        reference = plain_modules[module_name]
        for param_name, param in module.named_parameters(recurse=False):
            expected = getattr(reference, param_name)
            if isinstance(module, (nn.Conv2d, nn.Linear)) and param_name == "weight":
                expected = expected * 0.25
                checked += 1
            torch.testing.assert_close(param, expected, rtol=0, atol=0)
    assert checked >= 5


@pytest.mark.parametrize("name", ["resnet50", "", "LeNet5"])
def test_unknown_model_is_refused_with_the_allowed_names(name):
    with pytest.raises(UserError, match="allowed: lenet5, lenet5-caffe, lenet300, vgg16, resnet18, "
                                        "resnet20, torchvision:NAME or package.module:factory"):
        build_model(name, in_channels=1, image_size=28, num_classes=10)
