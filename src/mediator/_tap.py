"""Module boundaries: where the model thread meets the Interleaver.

While a trace runs, each module of the traced model gets an instance attribute `forward` (a
"tap") that routes calls made by the tracing thread to that trace's Interleaver and passes every
other call straight through. Outside traces nothing is installed, so the model costs exactly what
it cost before; PyTorch hooks (the user's own included) are never touched and still run around
the tap. Taps are shared: two traces of the same module from two threads (or two `Model`s wrapping
it) route by thread, a trace nested on the same thread (opened from a forward hook) routes to
itself until it ends, and the last one to leave restores the module's own `forward`.

Compiled modules: a tracing thread never runs compiled code, since a compiled graph cannot stop
at a boundary to hand a value to a body. A module compiled in place (`net.compile()`, which sets
`_compiled_call_impl`) also gets, while tapped, a router there that sends the tracing thread's
calls to the eager `_call_impl` and every other call to the compiled one. When dynamo compiles a
call of a tapped module made outside the trace (a `torch.compile(net)` the user holds, called
from an invoke body or another thread), the tap lets it trace the module's own forward
(`is_dynamo_compiling()`), without a graph break: dynamo's caches stay valid, and plain calls run
the compiled graph again after the trace.

`strip` turns a deep copy of a tapped module into one that runs on its own (the Interleaver runs
such a copy on fake tensors to learn the output of a call that every invoke skips).

`_LOCK` guards every route table; after `os.fork` the child gets a new one (another thread may
have held it at the fork).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.compiler import is_dynamo_compiling

_ABSENT = object()
_LOCK = threading.Lock()
_FORWARD_HOOKS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)

#: `Interleaver.call(site, original, args, kwargs)`, and the site index of this module in it.
Route = tuple[Any, int]


class Tap:
    """The `forward` wrapper of one module and the table of threads that trace it."""

    __slots__ = (
        "module",
        "attributes",
        "saved",
        "original",
        "routes",
        "forward",
        "eager",
        "compiled",
    )

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.attributes = module.__dict__
        self.saved = module.__dict__.get("forward", _ABSENT)
        self.compiled: Callable[..., Any] | None = None  # `_compiled_call_impl` while tapped
        self.routes: dict[int, Route] = {}
        original: Callable[..., Any] = module.forward
        self.original = original  # the module's own forward, as the tap found it
        self.forward = self._forward(original, original)
        call_impl: Callable[..., Any] = module._call_impl
        routes = self.routes
        get_ident = threading.get_ident

        def eager(*args: Any, **kwargs: Any) -> Any:
            if get_ident() in routes:
                return call_impl(*args, **kwargs)
            compiled = self.compiled
            assert compiled is not None
            return compiled(*args, **kwargs)

        self.eager = eager

    def _forward(
        self, original: Callable[..., Any], traced: Callable[..., Any]
    ) -> Callable[..., Any]:
        """The tap: `original` for other threads, `traced` (usually `original` too) routed to
        the tracing thread's Interleaver."""
        get_route = self.routes.get
        get_ident = threading.get_ident

        def forward(*args: Any, **kwargs: Any) -> Any:
            if is_dynamo_compiling():  # dynamo compiles a call made outside any trace
                return original(*args, **kwargs)
            route = get_route(get_ident())
            if route is None:
                return original(*args, **kwargs)
            return route[0].call(route[1], traced, args, kwargs)

        functools.update_wrapper(forward, original)  # generate() inspects its signature
        forward.__mediator_tap__ = self  # type: ignore[attr-defined]
        return forward

    def trace_with(self, traced: Callable[..., Any]) -> None:
        """From now on, tracing threads run `traced` instead of the module's forward (a
        rewritten forward, `_operations.py`); other threads still run the module's own. A tap
        installed right now is swapped at once (a trace may be running), and a call of the
        module whose input a body waits at right now runs `traced` too."""
        with _LOCK:
            old = self.forward
            self.forward = self._forward(self.original, traced)
            if self.attributes.get("forward") is old:
                self.attributes["forward"] = self.forward
            for interleaver, site in self.routes.values():
                interleaver.rewired[site] = traced

    def route_compiled(self) -> None:
        """The module is compiled in place: route its compiled call too (see the docstring)."""
        attributes = self.attributes
        self.compiled = attributes["_compiled_call_impl"]
        attributes["_compiled_call_impl"] = self.eager

    def unroute_compiled(self) -> None:
        """Give the module its compiled call back, unless replaced since."""
        if self.attributes.get("_compiled_call_impl") is self.eager:
            self.attributes["_compiled_call_impl"] = self.compiled
        self.compiled = None


@dataclass(slots=True)
class Attached:
    """What `attach` did for one trace: the taps it routes through, and the routes of an outer
    trace of the same thread that it replaced (opened from a forward hook; usually none)."""

    taps: list[Tap] = field(default_factory=list)
    outer: list[tuple[Tap, Route]] = field(default_factory=list)


def attach(taps: list[Tap], interleaver: Any) -> Attached:
    """Route the calling thread's calls of each tapped module to `interleaver`.

    A module already tapped by another trace keeps that trace's tap. A trace opened on a thread
    that already runs a trace (from a forward hook) routes to itself until it ends, then the
    outer one's routes are back. Pass the result to `detach`.
    """
    ident = threading.get_ident()
    attached = Attached()
    with _LOCK:
        try:
            for site, tap in enumerate(taps):
                attributes = tap.attributes
                current = attributes.get("forward", _ABSENT)
                if current is not tap.saved and current is not tap.forward:
                    other: Tap | None = getattr(current, "__mediator_tap__", None)
                    if other is None:  # the module's forward was replaced since: tap it afresh
                        other = taps[site] = Tap(tap.module)
                    tap = other  # or another Model's tap of the module
                if current is tap.saved:  # untapped
                    attributes["forward"] = tap.forward
                    if attributes.get("_compiled_call_impl") is not None:
                        tap.route_compiled()
                routes = tap.routes
                if ident in routes:
                    attached.outer.append((tap, routes[ident]))
                else:
                    attached.taps.append(tap)
                routes[ident] = (interleaver, site)
        except BaseException:
            _undo(attached, ident)
            raise
    return attached


def detach(attached: Attached) -> None:
    """Undo `attach` for the calling thread; restore `forward` where no trace remains."""
    with _LOCK:
        _undo(attached, threading.get_ident())


def _undo(attached: Attached, ident: int) -> None:
    for tap in attached.taps:
        routes = tap.routes
        del routes[ident]
        if not routes:  # no other trace remains: the module's own forward and compiled call
            attributes = tap.attributes
            if attributes.get("forward") is tap.forward:  # unless replaced since
                if tap.saved is _ABSENT:
                    del attributes["forward"]
                else:
                    attributes["forward"] = tap.saved
            if tap.compiled is not None:
                tap.unroute_compiled()
    for tap, previous in attached.outer:
        tap.routes[ident] = previous  # the outer trace of this thread routes here again


def strip(copy: nn.Module) -> None:
    """Make a deep copy of a tapped module run on its own: remove the taps and compiled-call
    routers it copied (they lead to the original modules) and the forward hooks it copied (the
    user's functions, whose effects reach outside the copy)."""
    for module in copy.modules():
        attributes = module.__dict__
        tap: Tap | None = getattr(attributes.get("forward"), "__mediator_tap__", None)
        if tap is not None:
            if tap.saved is _ABSENT:
                del attributes["forward"]
            else:
                attributes["forward"] = tap.saved
        attributes.pop("_compiled_call_impl", None)
        for hooks in _FORWARD_HOOKS:
            attributes[hooks].clear()


def _new_lock_after_fork() -> None:
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)
