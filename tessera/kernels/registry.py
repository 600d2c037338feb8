"""The kernel dispatch contract: an `Op` is an ordered list of implementations (`Impl`).

Each op (attention, ssd, selective_scan, ...) keeps its impls in order of preference, fastest
first, the always-working XLA path last. Every impl function, ``supports`` check and ``auto``
heuristic is called with the op's arguments exactly as the public function received them, so all
of an op's impls share one signature.

- ``supports(*args, **kw)`` returns None when the impl can run those inputs, else a short reason
  ("T must be a multiple of 128", "needs a TPU, running on cpu"). It reads only what is static
  under jit: shapes, dtypes, flags, the platform (``jax.default_backend()``), never array values.
- ``auto`` says whether ``impl="auto"`` may pick the impl: True, False (only when named), or a
  check like ``supports`` whose reason says why auto passes it over here ("T = 9 > 1").

``impl="auto"`` runs the first impl that supports the inputs and that auto wants. Auto never
silently degrades numerics: an impl that can be less accurate than the reference for some inputs
(lower-precision accumulation, approximations) must decline those inputs in its ``auto`` check,
so it runs there only when named. A named impl that declines raises `KernelUnavailableError`
saying why (never a silent fallback); an unknown name raises ValueError listing the registered
names. ``Op.register(impl, before=name)`` adds an impl later (how Pallas kernels drop in without
touching model code); ``Op.explain(...)`` lists every impl with the reason auto would not use it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

# A support check or auto heuristic: the op's arguments -> None (yes) or a reason (no).
Check = Callable[..., str | None]


class KernelUnavailableError(ValueError):
    """A named impl cannot run the given inputs; the message says why."""


def _always(*args: Any, **kwargs: Any) -> None:
    """The default support check: runs anything."""
    return None


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation of an op: ``fn`` and when it may run (see the module docstring)."""

    name: str
    fn: Callable[..., Any]
    supports: Check = _always
    auto: bool | Check = True

    def auto_skips(self, *args: Any, **kwargs: Any) -> str | None:
        """Why ``impl="auto"`` passes this impl over for these inputs, or None if it may pick it."""
        if self.auto is True:
            return None
        if self.auto is False:
            return "only when named"
        return self.auto(*args, **kwargs)


class Op:
    """A kernel op: ``op(*args, impl="auto", **kw)`` runs the impl ``impl`` names or auto picks."""

    def __init__(
        self, name: str, impls: Sequence[Impl], aliases: Mapping[str, str] | None = None
    ) -> None:
        """``aliases`` maps extra names to registered impls (ssd's ``xla`` is ``chunked``)."""
        self.name = name
        self._impls: list[Impl] = []
        self._aliases: dict[str, str] = {}
        for impl in impls:
            self.register(impl)
        for alias, target in (aliases or {}).items():
            self._check_new_name(alias)
            self._find(target)
            self._aliases[alias] = target

    @property
    def names(self) -> tuple[str, ...]:
        """Registered impl names in order of preference, then the aliases."""
        return (*(impl.name for impl in self._impls), *self._aliases)

    def impl(self, name: str) -> Impl:
        """The impl registered as ``name``; an alias gives its target."""
        return self._find(self._aliases.get(name, name), given=name)

    def register(self, impl: Impl, *, before: str | None = None) -> None:
        """Add ``impl`` before the impl named ``before`` (auto tries it first), else last."""
        self._check_new_name(impl.name)
        index = len(self._impls) if before is None else self._impls.index(self._find(before))
        self._impls.insert(index, impl)

    def explain(self, *args: Any, **kwargs: Any) -> list[tuple[str, str | None]]:
        """Every impl in order with None where auto may pick it, else the reason it would not;
        auto picks the first None."""
        return list(self._auto_reasons(*args, **kwargs))

    def select(self, impl: str, *args: Any, **kwargs: Any) -> Impl:
        """The impl that ``impl`` ("auto" or a name) runs for these arguments; raises if none."""
        if impl == "auto":
            reasons = []
            for name, reason in self._auto_reasons(*args, **kwargs):
                if reason is None:
                    return self._find(name)
                reasons.append(f"{name}: {reason}")
            raise KernelUnavailableError(
                f"no {self.name} impl can run these inputs ({'; '.join(reasons)})"
            )
        chosen = self.impl(impl)
        reason = chosen.supports(*args, **kwargs)
        if reason is not None:
            raise KernelUnavailableError(
                f"{self.name} impl {impl!r} cannot run these inputs: {reason}"
            )
        return chosen

    def __call__(self, *args: Any, impl: str = "auto", **kwargs: Any) -> Any:
        """Run the selected impl on ``args`` / ``kwargs``."""
        return self.select(impl, *args, **kwargs).fn(*args, **kwargs)

    def _auto_reasons(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, str | None]]:
        for impl in self._impls:
            reason = impl.supports(*args, **kwargs)
            if reason is None:
                skip = impl.auto_skips(*args, **kwargs)
                reason = None if skip is None else f"auto skips it: {skip}"
            yield impl.name, reason

    def _find(self, name: str, given: str | None = None) -> Impl:
        for impl in self._impls:
            if impl.name == name:
                return impl
        raise ValueError(
            f"unknown {self.name} impl {given or name!r}; valid: {', '.join(('auto', *self.names))}"
        )

    def _check_new_name(self, name: str) -> None:
        if name == "auto" or name in self.names:
            raise ValueError(f"{self.name}: impl name {name!r} is already taken")


def single_token(x: Any, *args: Any, **kwargs: Any) -> str | None:
    """``auto`` check of a decode-step form (the ops' ``sequential``): one token only (T, axis 1
    of the first argument, = 1)."""
    return None if x.shape[1] == 1 else f"T = {x.shape[1]} > 1 (it is the decode step)"


def many_tokens(x: Any, *args: Any, **kwargs: Any) -> str | None:
    """``auto`` check of a chunked kernel: not for one token (T = 1 is the decode step)."""
    return None if x.shape[1] > 1 else "T = 1 (the decode step)"


def drop_kwargs(fn: Callable[..., Any], *names: str) -> Callable[..., Any]:
    """``fn`` as an impl of an op with more keyword arguments: ``names`` are dropped first
    (the ``chunk_size`` a sequential form has no use for)."""

    @functools.wraps(fn)
    def impl(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **{k: v for k, v in kwargs.items() if k not in names})

    return impl


def impls_getattr(op: Op) -> Callable[[str], tuple[str, ...]]:
    """A module ``__getattr__`` serving ``IMPLS = ("auto", *op.names)``, computed on access so
    that impls registered later are listed."""

    def getattr_(name: str) -> tuple[str, ...]:
        if name == "IMPLS":
            return ("auto", *op.names)
        raise AttributeError(f"{op.name} kernel module has no attribute {name!r}")

    return getattr_
