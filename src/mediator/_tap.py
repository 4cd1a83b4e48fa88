"""Module boundaries: where the model thread meets the Interleaver.

While a trace runs, each module of the traced model gets an instance attribute `forward` (a
"tap") that routes calls made by the tracing thread to that trace's Interleaver and passes every
other call straight through. Outside traces nothing is installed, so the model costs exactly what
it cost before; PyTorch hooks (the user's own included) are never touched and still run around
the tap. Taps are shared: two traces of the same module from two threads (or two `Model`s wrapping
it) route by thread, and the last one to leave restores the module's own `forward`.

`_LOCK` guards every route table; after `os.fork` the child gets a new one (another thread may
have held it at the fork).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

from torch import nn

_ABSENT = object()
_LOCK = threading.Lock()

#: `Interleaver.call(site, original, args, kwargs)`, and the site index of this module in it.
Route = tuple[Any, int]


class Tap:
    """The `forward` wrapper of one module and the table of threads that trace it."""

    __slots__ = ("module", "attributes", "saved", "routes", "forward")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.attributes = module.__dict__
        self.saved = module.__dict__.get("forward", _ABSENT)
        original: Callable[..., Any] = module.forward
        routes: dict[int, Route] = {}
        get_route = routes.get
        get_ident = threading.get_ident

        def forward(*args: Any, **kwargs: Any) -> Any:
            route = get_route(get_ident())
            if route is None:
                return original(*args, **kwargs)
            return route[0].call(route[1], original, args, kwargs)

        functools.update_wrapper(forward, original)  # generate() inspects its signature
        forward.__mediator_tap__ = self  # type: ignore[attr-defined]
        self.routes = routes
        self.forward = forward


def attach(taps: list[Tap], interleaver: Any) -> list[Tap]:
    """Route the calling thread's calls of each tapped module to `interleaver`.

    Returns the taps actually installed (a module already tapped by another trace keeps that
    trace's tap); pass them to `detach`.
    """
    ident = threading.get_ident()
    attached = []
    with _LOCK:
        for site, tap in enumerate(taps):
            current = tap.attributes.get("forward", _ABSENT)
            if current is tap.saved:  # untapped, as when the tap was built
                tap.attributes["forward"] = tap.forward
                active = tap
            elif current is tap.forward:  # tapped by another trace of this Model
                active = tap
            else:
                other: Tap | None = getattr(current, "__mediator_tap__", None)
                if other is None:  # the module's forward was replaced since: tap it afresh
                    other = taps[site] = Tap(tap.module)
                    other.attributes["forward"] = other.forward
                active = other
            active.routes[ident] = (interleaver, site)
            attached.append(active)
    return attached


def detach(attached: list[Tap]) -> None:
    """Undo `attach` for the calling thread; restore `forward` where no other trace remains."""
    ident = threading.get_ident()
    with _LOCK:
        for tap in attached:
            routes = tap.routes
            del routes[ident]
            if routes or tap.attributes.get("forward") is not tap.forward:
                continue  # still traced elsewhere, or replaced by someone else: theirs stays
            if tap.saved is _ABSENT:
                del tap.attributes["forward"]
            else:
                tap.attributes["forward"] = tap.saved


def _new_lock_after_fork() -> None:
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)
