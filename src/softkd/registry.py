"""One small generic registry: models, datasets and objectives are found by name."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Generic, TypeVar

from softkd.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to factories.

    A factory registered with a pattern such as ``mlp-<h>`` is matched by a ``matcher`` that
    returns the keyword arguments it parsed from the name, or ``None`` when it does not match.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._exact: dict[str, Callable[..., T]] = {}
        self._patterns: list[tuple[str, Callable[[str], dict | None], Callable[..., T]]] = []
        self._aliases: dict[str, str] = {}
        self._examples: dict[str, list[str]] = {}

    def register(self, name: str, *, aliases: tuple[str, ...] = ()):
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            self._exact[name] = factory
            for alias in aliases:
                self._aliases[alias] = name
            return factory

        return deco

    def register_pattern(self, pattern: str, matcher: Callable[[str], dict | None], *, examples: tuple[str, ...] = ()):
        """``examples``: concrete names that listings show for the pattern."""
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            self._patterns.append((pattern, matcher, factory))
            self._examples[pattern] = list(examples)
            return factory

        return deco

    def canonical(self, name: str) -> str:
        return self._aliases.get(name, name)

    def resolve(self, name: str) -> tuple[Callable[..., T], dict]:
        """The factory for ``name`` and the keyword arguments parsed from it."""
        name = self.canonical(name)
        if name in self._exact:
            return self._exact[name], {}
        for _, matcher, factory in self._patterns:
            kwargs = matcher(name)
            if kwargs is not None:
                return factory, kwargs
        raise UnknownNameError(self._unknown_message(name))

    def __contains__(self, name: str) -> bool:
        try:
            self.resolve(name)
        except UnknownNameError:
            return False
        return True

    def names(self, pattern: str = "*") -> list[str]:
        listed = list(self._exact) + [p for p, _, _ in self._patterns]
        return sorted(n for n in listed if fnmatch.fnmatch(n, pattern))

    def examples(self, name: str) -> list[str]:
        """Concrete names for a pattern (``mlp-<h>`` → ``mlp-128``...), or the name itself."""
        return self._examples.get(name, [name])

    def aliases(self) -> dict[str, str]:
        return dict(self._aliases)

    def _unknown_message(self, name: str) -> str:
        known = list(self._exact) + list(self._aliases) + [p for p, _, _ in self._patterns]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return (
            f"Unknown {self.kind} '{name}': {hint}known {self.kind}s are "
            f"{', '.join(sorted(known))} (see `softkd ls {self.kind}s`)."
        )
