"""A user's own models, as a user would write them: imported by spec
(``my_models:small_cnn``) with this folder on PYTHONPATH, by the tests of user models."""

from torch import nn


def small_cnn(in_channels: int, num_classes: int) -> nn.Module:
    """Ignores ``image_size``: global pooling makes it work for any size."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, num_classes))


NOT_CALLABLE = 42


def raises(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    raise RuntimeError("this factory is broken")


def not_a_module(num_classes: int):
    return "a string"


def no_weights(num_classes: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Softmax(dim=1))
