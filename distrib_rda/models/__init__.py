"""The CNNs of the experiments, and a user's own: every model is named by a *spec*.

A spec is one of:

- a name in :data:`MODELS` (``lenet5``, ``lenet5-caffe``, ``lenet300``, ``vgg16``, ``resnet18``,
  ``resnet20``, the list below);
- ``torchvision:NAME``: a torchvision classification model (``torchvision:resnet50``), built
  with ``num_classes`` and no pretrained weights; its first convolution is rebuilt for the
  data's channels when they differ;
- ``package.module:factory``: a callable of the user's, importable on every worker (installed,
  on ``PYTHONPATH``, or in Ray's ``working_dir``).

:func:`build_model` calls the factory with the keyword arguments ``in_channels``,
``image_size`` and ``num_classes`` (only those it accepts) and refuses, naming the spec, what
does not return an ``nn.Module`` with at least one conv or linear weight. The weights of its
conv and linear layers are the ones made sparse. ``init_scale`` multiplies their default
initialization, ``w <- init_scale * w`` (the prox centre of RDA starts there).

Importing this module is cheap: torch and torchvision are imported when a model is built.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from distrib_rda.errors import UserError
from distrib_rda.registry import Registry

if TYPE_CHECKING:
    from torch import nn

MODELS: Registry[Callable[..., nn.Module]] = Registry(
    "model", extra="torchvision:NAME or package.module:factory")

TORCHVISION = "torchvision:"
_IMPORT_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


class ModelSpecError(UserError, ValueError):
    """A model spec that cannot give a model; the message names the spec and what is allowed."""


@MODELS.register("lenet5", "LeNet-5 (LeCun 1998) with ReLU: conv 6, 16, fc 120, 84; 61k weights",
                 default=True)
def lenet5(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """conv 6@5x5, pool, conv 16@5x5, pool, fc 120, 84, K. Images smaller than 32x32 are
    zero-padded to 32 by the first conv, as LeCun padded MNIST, so 28x28 and 32x32 inputs both
    give the classic 16x5x5 features."""
    from torch import nn

    pad = max(0, (32 - image_size + 1) // 2)
    side = ((image_size + 2 * pad - 4) // 2 - 4) // 2  # after conv5, pool2, conv5, pool2
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_channels, 6, 5, padding=pad), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 16, 5), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc1=nn.Linear(16 * side * side, 120), relu3=nn.ReLU(),
        fc2=nn.Linear(120, 84), relu4=nn.ReLU(),
        fc3=nn.Linear(84, num_classes),
    ))


@MODELS.register("lenet5-caffe",
                 "Caffe's LeNet-5 of the pruning literature: conv 20, 50, fc 500; 430k weights")
def lenet5_caffe(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """The reference network of the pruning literature (Han et al. 2015, SNIP): conv 20@5x5,
    max-pool, conv 50@5x5, max-pool, fc 500, fc K, with ReLU after each conv and the first fc
    (as SNIP's PyTorch LeNet-5-Caffe). For 28x28 grey images and 10 classes: 430,500 conv and
    linear weights."""
    from torch import nn

    side = ((image_size - 4) // 2 - 4) // 2
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_channels, 20, 5), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(20, 50, 5), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc1=nn.Linear(50 * side * side, 500), relu3=nn.ReLU(),
        fc2=nn.Linear(500, num_classes),
    ))


@MODELS.register("lenet300", "LeNet-300-100, an MLP on the flattened image; 266k weights")
def lenet300(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """``C*S*S -> 300 -> 100 -> K`` with ReLU."""
    from torch import nn

    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        fc1=nn.Linear(in_channels * image_size * image_size, 300), relu1=nn.ReLU(),
        fc2=nn.Linear(300, 100), relu2=nn.ReLU(),
        fc3=nn.Linear(100, num_classes),
    ))


@MODELS.register("vgg16", "the CIFAR VGG-16 with BatchNorm; 14.7M weights")
def vgg16(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """13 conv3x3+BN+ReLU, 5 max-pools, fc 512->K. The pools round up and a global average
    pool ends the features, so 28x28 works as well as 32x32."""
    from torch import nn
    from torchvision.ops import Conv2dNormActivation

    layers: list[nn.Module] = []
    channels = in_channels
    for item in VGG16_LAYERS:
        if item == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers.append(Conv2dNormActivation(channels, item, 3))
            channels = item
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(*layers),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(512, num_classes),
    ))


@MODELS.register("resnet18", "the CIFAR ResNet-18 (3x3 stem, no max-pool); 11.2M weights")
def resnet18(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """BasicBlocks [2, 2, 2, 2] of 64/128/256/512 channels; 11.17M parameters for 3x32x32 and
    10 classes."""
    from distrib_rda.models.cifar_resnet import CifarResNet

    return CifarResNet(in_channels, num_classes, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2))


@MODELS.register("resnet20", "He et al. 2016's CIFAR ResNet-20; 0.27M weights")
def resnet20(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """3 stages of 3 BasicBlocks, 16/32/64 channels, option B shortcuts (1x1 conv + BN, as
    torchvision does, not the paper's parameter-free option A): 0.27M parameters."""
    from distrib_rda.models.cifar_resnet import CifarResNet

    return CifarResNet(in_channels, num_classes, widths=(16, 32, 64), blocks=(3, 3, 3))


def check_spec(spec: str) -> str:
    """``spec`` if it has the form of a model spec, else :class:`ModelSpecError`. Nothing is
    imported: whether the factory exists and works is :func:`build_model`'s to say."""
    if not isinstance(spec, str):
        raise ModelSpecError(f"model must be a string spec, got {type(spec).__name__}")
    if spec in MODELS:
        return spec
    if spec.startswith(TORCHVISION) and spec[len(TORCHVISION):].isidentifier():
        return spec
    if _IMPORT_SPEC.match(spec) and not spec.startswith(TORCHVISION):
        return spec
    raise ModelSpecError(f"model {spec!r}: not a model spec (allowed: {MODELS.allowed()})")


def spec_of(factory: Callable[..., Any]) -> str:
    """The ``module:qualname`` spec that names a Python callable."""
    module = getattr(factory, "__module__", None) or "__main__"
    name = getattr(factory, "__qualname__", None) or getattr(factory, "__name__", "factory")
    return f"{module}:{name}".replace("<locals>.", "")


def resolve_factory(spec: str) -> Callable[..., Any]:
    """The callable a spec names (imports the user's module)."""
    check_spec(spec)
    if spec in MODELS:
        return MODELS[spec]
    if spec.startswith(TORCHVISION):
        return _torchvision_factory(spec[len(TORCHVISION):])
    module_name, _, attribute = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001 - any import failure is the user's module's
        raise ModelSpecError(
            f"model {spec!r}: cannot import module {module_name!r} ({type(error).__name__}: "
            f"{error}); it must be importable on every worker: installed, on PYTHONPATH, or in "
            "Ray's working_dir") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ModelSpecError(f"model {spec!r}: module {module_name!r} has no attribute "
                                 f"{attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ModelSpecError(f"model {spec!r}: {attribute} is a {type(target).__name__}, not a "
                             "callable; give a function or class that returns an nn.Module")
    return target


def _torchvision_factory(name: str) -> Callable[..., nn.Module]:
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if name not in known:
        raise ModelSpecError(f"model 'torchvision:{name}': torchvision has no classification "
                             f"model {name!r} (e.g. {', '.join(known[:8])}, ...)")

    def build(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        adapt_first_conv(model, in_channels)
        return model

    return build


def adapt_first_conv(model: nn.Module, in_channels: int) -> None:
    """Rebuild the first ``Conv2d`` for ``in_channels`` inputs (same kernel, stride, padding,
    groups of one), freshly initialized, when the model expects another number."""
    from torch import nn

    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            replacement = nn.Conv2d(
                in_channels, module.out_channels, module.kernel_size, stride=module.stride,
                padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
                padding_mode=module.padding_mode)
            parent_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attribute, replacement)
            return


def build_model(spec: str | Callable[..., Any], *, in_channels: int, image_size: int,
                num_classes: int, init_scale: float = 1.0) -> nn.Module:
    """The model ``spec`` names (or ``spec`` itself, a callable) for ``in_channels x image_size
    x image_size`` images and ``num_classes`` classes; see the module docstring."""
    import torch
    from torch import nn

    from distrib_rda.optim.groups import prunable_weights

    if callable(spec):
        factory, label = spec, spec_of(spec)
    else:
        factory, label = resolve_factory(spec), spec
    arguments = {"in_channels": in_channels, "image_size": image_size,
                 "num_classes": num_classes}
    try:
        parameters = inspect.signature(factory).parameters
        if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            arguments = {key: value for key, value in arguments.items() if key in parameters}
    except (TypeError, ValueError):  # builtins without a signature get every argument
        pass
    try:
        model = factory(**arguments)
    except ModelSpecError:
        raise
    except Exception as error:  # noqa: BLE001 - the factory is the user's code
        raise ModelSpecError(
            f"model {label!r}: the factory raised {type(error).__name__}: {error} (called with "
            f"{', '.join(f'{k}={v}' for k, v in arguments.items())})") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"model {label!r}: the factory returned a {type(model).__name__}, "
                             "not a torch.nn.Module")
    weights = prunable_weights(model)
    if not weights:
        raise ModelSpecError(f"model {label!r}: has no conv or linear weight to make sparse "
                             "(distrib-rda sparsifies the weights of Conv*d and Linear layers)")
    with torch.no_grad():
        for _, weight in weights:
            weight.mul_(init_scale)
    return model
