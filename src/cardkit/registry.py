"""One registry for every kind of extension: models, datasets, pruning methods, objectives,
attacks, corruptions, bound methods.

A registry maps names to entries in registration order. It stays open: a module imported later
(a config's `plugins:`) registers into the same registry, and everything that validates names
(the config, the CLI, the listing commands) reads the registry when it runs, not at import.
"""

from __future__ import annotations

import difflib
import importlib
from typing import Callable, Generic, Iterator, TypeVar

from cardkit.errors import CardkitError

T = TypeVar("T")


class Registry(Generic[T]):
    """Names -> entries; `lookup` of an unknown name suggests the closest ones."""

    def __init__(self, kind: str, normalize: Callable[[str], str] = str,
                 order: Callable[[str], object] | None = None):
        self.kind = kind  # as the error messages name it: "model", "pruning method", ...
        self._normalize = normalize  # the registered spelling of a name (e.g. lower case)
        self._order = order  # a sort key for listing; default: registration order
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add `entry` under `name`; a name taken already is an error (a plugin must not silently
        replace a built-in)."""
        key = self._normalize(name)
        if key in self._entries:
            raise CardkitError(f"{self.kind} {key!r} is already registered; give the new one another name")
        self._entries[key] = entry
        return entry

    def canonical(self, name: str) -> str:
        """The registered spelling of `name`, or a one-line error with the closest names."""
        key = self._normalize(name) if isinstance(name, str) else name
        if isinstance(key, str) and key in self._entries:
            return key
        close = difflib.get_close_matches(str(key), self.names(), n=2, cutoff=0.5)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise CardkitError(f"unknown {self.kind} {name!r}; {hint}valid: {', '.join(self.names())}")

    def lookup(self, name: str) -> T:
        return self._entries[self.canonical(name)]

    def names(self) -> list[str]:
        """In registration order (built-ins first), or sorted by the registry's `order`."""
        return sorted(self._entries, key=self._order) if self._order else list(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._normalize(name) in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


def import_module(module: str, what: str):
    """Import a user's module by name, or a one-line error (its own import errors included)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        raise CardkitError(f"{what}: cannot import {module!r} ({err}); install it or add its folder "
                           f"to PYTHONPATH") from None
    except CardkitError:
        raise
    except Exception as err:  # the user's module failed while importing
        raise CardkitError(f"{what}: importing {module!r} failed: {type(err).__name__}: {err}") from None
