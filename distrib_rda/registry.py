"""Registries: each kind of component (model, dataset, optimizer) is named once, in one place.

A :class:`Registry` maps names to entries (a factory, a reader, a settings class) and a one-line
summary. The command line's choices, the config's validation, the search-space checks and the
``--help`` text all read the names from it, so adding a component is one ``register`` call in
the file that defines it. Importing a registry is cheap: entries import torch or torchvision
only when they are called.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from distrib_rda.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, KeyError):
    """A name that the registry does not hold; the message lists the names it does."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry(Generic[T]):
    """Names of one kind of component, in registration order.

    >>> MODELS = Registry("model")
    >>> @MODELS.register("lenet5", "LeNet-5 with ReLU and max-pooling")
    ... def lenet5(in_channels, image_size, num_classes): ...
    """

    def __init__(self, kind: str, *, extra: str = "") -> None:
        self.kind = kind
        self.extra = extra  # other accepted forms, e.g. "or imagefolder:PATH", for messages
        self._entries: dict[str, T] = {}
        self._summaries: dict[str, str] = {}
        self.default: str | None = None

    def register(self, name: str, summary: str = "", *, default: bool = False
                 ) -> Callable[[T], T]:
        """Decorator: add ``entry`` under ``name``; a name is registered once. The ``default``
        entry is what a config gets when it names none."""

        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            self._summaries[name] = summary
            if default:
                self.default = name
            return entry

        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def summary(self, name: str) -> str:
        return self._summaries[name]

    def allowed(self) -> str:
        """``"a, b, c"`` plus the other accepted forms: for error messages and help."""
        return ", ".join(self._entries) + (f", {self.extra}" if self.extra else "")

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownNameError(
                f"unknown {self.kind} {name!r} (allowed: {self.allowed()})") from None
