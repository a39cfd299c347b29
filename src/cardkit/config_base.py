"""The base of every config section, and the handler tables keyed by config type.

Sections are strict, so a misspelt key is an error rather than ignored. A method (an objective, a
pruning method) is a config class whose `name` is its YAML tag, plus a handler registered for it.
"""

from __future__ import annotations

import difflib
from typing import Callable

from pydantic import BaseModel, ConfigDict

from cardkit.errors import CardkitError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class HandlerTable:
    """Handlers keyed by config class; the classes, in registration order, make a tagged union."""

    def __init__(self, kind: str):
        self.kind = kind
        self.configs: list[type[Section]] = []
        self._handlers: dict[type[Section], Callable] = {}

    def register(self, config_cls: type[Section]):
        """Decorator: the function becomes the handler of `config_cls`."""

        def decorate(handler: Callable) -> Callable:
            self._handlers[config_cls] = handler
            self.configs.append(config_cls)
            return handler

        return decorate

    def handler(self, config: Section) -> Callable:
        return self._handlers[type(config)]

    def names(self) -> list[str]:
        return [cls.model_fields["name"].default for cls in self.configs]

    def config(self, name: str, **fields) -> Section:
        """Build a config by name; an unknown name suggests the closest."""
        for cls in self.configs:
            if cls.model_fields["name"].default == name:
                return cls(**fields)
        close = difflib.get_close_matches(name, self.names(), n=2)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise CardkitError(f"unknown {self.kind} {name!r}; {hint}valid: {', '.join(self.names())}")
