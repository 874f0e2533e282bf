"""One generic registry for metrics, perturbations and controls.

CLI choices come from a registry's keys, so adding a metric is one file plus one
`register` call. Unknown names raise `UsageError` with "did you mean" suggestions.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from cwa.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            for a in aliases:
                self._aliases[a] = name
            return obj

        return deco

    def add(self, name: str, obj: T, *, aliases: tuple[str, ...] = ()) -> T:
        return self.register(name, aliases=aliases)(obj)

    def remove(self, name: str) -> T:
        """Unregister `name` and its aliases (a plugin or a test cleaning up); returns it."""
        obj = self._items.pop(name)
        self._aliases = {a: n for a, n in self._aliases.items() if n != name}
        return obj

    def resolve(self, name: str) -> str:
        key = name.strip()
        if key in self._items:
            return key
        if key in self._aliases:
            return self._aliases[key]
        choices = sorted(self._items) + sorted(self._aliases)
        raise UsageError(
            f"Unknown {self.kind} {name!r}.{did_you_mean(key, choices, n=3)} "
            f"Available: {', '.join(sorted(self._items))}."
        )

    def get(self, name: str) -> T:
        return self._items[self.resolve(name)]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


def did_you_mean(value: str, choices: list[str] | tuple[str, ...], n: int = 1) -> str:
    """" Did you mean: x?" for the closest choices, or "" when none is close."""
    close = difflib.get_close_matches(value, list(choices), n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def check_choice(flag: str, value: str, choices: tuple[str, ...]) -> str:
    """`value` when it is one of `choices`, else a UsageError naming the flag, the
    choices and the closest one (for options that are a fixed set, not a registry)."""
    if value in choices:
        return value
    raise UsageError(f"{flag} {value!r}: choose {' or '.join(choices)}.{did_you_mean(value, choices)}")
