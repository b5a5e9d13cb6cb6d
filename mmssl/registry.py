"""One small registry class; one instance per kind of buildable thing.

Presets are plain functions registered by name (``@ENCODERS.register``); ``build`` calls
them with keyword overrides. Registration happens when a module is imported, and the
packages import their modules explicitly (``mmssl/encoders/__init__.py``), so nothing
scans folders.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Registry:
    """Maps a name to a builder function."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, fn: F | None = None, *, name: str | None = None, **meta: Any) -> Any:
        """Register ``fn`` under ``name`` (default: the function's name), with optional facts
        about its options that code around the builder needs (``meta``, e.g. which options name
        runs the built thing starts from; see ``mmssl.runs``).

        Usable bare (``@REG.register``) or with arguments (``@REG.register(name="x")``).
        """

        def add(f: F) -> F:
            key = name or f.__name__
            if key in self._builders:
                raise KeyError(f"{self.kind} {key!r} is registered twice")
            self._builders[key] = f
            self._meta[key] = dict(meta)
            return f

        return add(fn) if fn is not None else add

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._builders[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def meta(self, name: str) -> dict[str, Any]:
        """The facts ``name`` was registered with (empty when none)."""
        self.get(name)
        return self._meta[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        """Call the builder registered as ``name``; an unknown keyword is an error naming it."""
        fn = self.get(name)
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if not takes_any:
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                raise TypeError(
                    f"{self.kind} {name!r} has no option {', '.join(map(repr, unknown))}; "
                    f"it takes: {', '.join(params) or 'nothing'}"
                )
        return fn(**kwargs)

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: str) -> bool:
        return name in self._builders

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


ENCODERS = Registry("encoder")
OBJECTIVES = Registry("objective")
