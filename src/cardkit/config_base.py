"""The base of every config section, and the handler tables keyed by config type.

Sections are strict, so a misspelt key is an error rather than ignored. A method (an objective, a
pruning method) is a config class whose `name` is its YAML tag, plus a handler registered for it.
"""

from __future__ import annotations

from typing import Annotated, Any, Callable, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, WithJsonSchema, WrapValidator
from pydantic_core import PydanticCustomError

from cardkit.errors import CardkitError
from cardkit.registry import Registry


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class HandlerTable:
    """Handlers keyed by config class: the registry of one kind of method (objectives, pruning
    methods, attacks, ...), whose config classes make the tagged union that the config validates.
    The union is read when a config is validated, so entries registered after import count."""

    def __init__(self, kind: str):
        self.kind = kind
        self.registry: Registry[type[Section]] = Registry(kind)
        self.configs: list[type[Section]] = []  # in registration order; the same list object for good
        self._handlers: dict[type[Section], Callable] = {}
        self._union: tuple[tuple[type[Section], ...], TypeAdapter | None] = ((), None)

    def register(self, config_cls: type[Section]):
        """Decorator: the function becomes the handler of `config_cls` (named by its `name` tag)."""

        def decorate(handler: Callable) -> Callable:
            self.registry.register(tag(config_cls), config_cls)
            self._handlers[config_cls] = handler
            self.configs.append(config_cls)
            return handler

        return decorate

    def handler(self, config: Section) -> Callable:
        try:
            return self._handlers[type(config)]
        except KeyError:
            raise CardkitError(f"{type(config).__name__} is not a registered {self.kind}; register it with "
                               f"its handler first") from None

    def names(self) -> list[str]:
        return self.registry.names()

    def config(self, name: str, **fields) -> Section:
        """Build a config by name; an unknown name suggests the closest."""
        return self.registry.lookup(name)(**fields)

    def validate(self, value):
        """A config of this table from its YAML mapping (the `name` key picks the class)."""
        if isinstance(value, Section) and type(value) in self._handlers:
            return value
        classes, adapter = self._union
        if classes != tuple(self.configs):
            classes = tuple(self.configs)
            union = classes[0] if len(classes) == 1 else Annotated[Union[classes], Field(discriminator="name")]
            adapter = TypeAdapter(union)
            self._union = (classes, adapter)
        if len(classes) == 1 and isinstance(value, dict) and value.get("name") != tag(classes[0]):
            raise PydanticCustomError("union_tag_invalid", "unknown tag {tag}",
                                      {"tag": str(value.get("name")), "discriminator": "'name'"})
        return adapter.validate_python(value)

    @property
    def field(self):
        """The annotation of a config field that holds one of this table's configs."""
        return Annotated[Any, WrapValidator(lambda value, _: self.validate(value)),
                         WithJsonSchema({"type": "object", "description": f"a {self.kind} (name: ...)"})]


def tag(config_cls: type[Section]) -> str:
    """The YAML name of a config class (the default of its `name` field)."""
    return config_cls.model_fields["name"].default
