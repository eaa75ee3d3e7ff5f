"""A mapping from the file plus its dotted key, so every error names the full key."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _Section:
    """A mapping from the file plus its dotted key, so every error names the full key."""

    data: Mapping[str, Any]
    prefix: str = ""

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def raw(self, name: str) -> Any:
        """The value, with "" read as unset (as an empty env variable is)."""
        value = self.data.get(name)
        return None if value == "" else value

    def has(self, name: str) -> bool:
        return name in self.data

    def sub(self, name: str) -> _Section:
        value = self.data.get(name)
        return _Section(value if isinstance(value, Mapping) else {}, self.key(name))

    def get(self, name: str, parse: Callable[[Any, str], Any], default: Any = None) -> Any:
        value = self.raw(name)
        return default if value is None else parse(value, self.key(name))

    def build(self, cls: type[_T], parsers: Mapping[str, Callable[[Any, str], Any]]) -> _T:
        """``cls`` from the keys present; absent keys keep the dataclass defaults (one source)."""
        values = {name: self.get(name, parse) for name, parse in parsers.items()}
        return cls(**{name: value for name, value in values.items() if value is not None})
