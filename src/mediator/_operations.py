"""Operations inside a forward as sites: what `envoy.source` reaches, and how the model meets it.

The first `envoy.source` of a module rewrites its forward (`_forward_source.py`): every call it
makes goes through `OperationSite.call`, and the module's tap runs that rewritten forward for
tracing threads only (`Tap.trace_with`); every other call, and every call outside traces, runs
the module's own forward, and nothing is set on the module. An operation becomes a site of the
model (`Traced.add_site`, path `layers.0.attn.source.softmax_0`) as its function is rewritten
(or, for a function known only when it runs, as a body names it);
its calls go through `Interleaver.call` exactly like a module's, so they get the same
boundaries, call numbers, batching, skips and errors. `op.source` rewrites the function an
operation calls, in the same way, for the calls made from that operation only (found when it
is called: a call through a local name, like `attention_interface(...)`, is known then).

State: each `FunctionSource` (one per module site, kept in `Traced.sources`, and one per nested
`.source`) owns its operations and the rewritten copies of the functions it has seen.
"""

from __future__ import annotations

import builtins
import threading
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ._errors import SourceUnavailableError, UsageError
from ._forward_source import Rewrite, rewrap, rewrite_of, unwrap

if TYPE_CHECKING:
    from ._traced import Traced

_UNKNOWN = object()


class OperationSite:
    """One named call inside a function at one path; a site of the model once a body names it."""

    def __init__(self, owner: FunctionSource, name: str) -> None:
        self.owner = owner
        self.name = name
        self.path = f"{owner.path}.source.{name}" if owner.path else f"source.{name}"
        self.site = owner.traced.add_site(self.path)
        self.nested: FunctionSource | None = None  # `op.source`, once used
        self.envoy: Any = None  # its OperationEnvoy, made once
        self._paths = owner.traced.paths
        self._get_route = owner.routes.get

    def call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run one call of the operation (model thread): through the tracing thread's
        Interleaver when this model's trace runs it, else straight through."""
        route = self._get_route(threading.get_ident())
        if route is None:
            return function(*args, **kwargs)
        interleaver = route[0]
        if interleaver.paths is not self._paths:  # another Model's trace of this module
            return function(*args, **kwargs)
        nested = self.nested
        if nested is not None:
            function = nested.copy_of(function)
        site = self.site
        if site >= len(interleaver.started):  # a site newer than the trace
            interleaver.grow()
        return interleaver.call(site, function, args, kwargs)


class FunctionSource:
    """The operations of one function at one path (a module's forward, or what an operation
    calls), and the rewritten copies of it that route them."""

    def __init__(self, traced: Traced, routes: dict[int, Any], path: str, label: str) -> None:
        self.traced = traced
        self.routes = routes  # the module tap's: thread -> (Interleaver, site)
        self.path = path
        self.label = label  # e.g. "model.layers.0.attn.source" for messages
        self.rewrite: Rewrite | None = None  # known before the call (None: found when called)
        self.operations: dict[str, OperationSite] = {}
        self.envoy: Any = None  # its SourceEnvoy, made once
        self.module: nn.Module | None = None  # the module whose forward this is, if any
        self._copies: dict[int, tuple[Any, Callable[..., Any]]] = {}

    def operation(self, name: str) -> OperationSite:
        found = self.operations.get(name)
        if found is None:
            found = self.operations[name] = OperationSite(self, name)
        return found

    def rewritten(self, function: Any) -> tuple[Rewrite, Callable[..., Any]]:
        """`function` (decorators included) with its calls routed through this source's
        operations."""
        chain = unwrap(function)
        rewrite = rewrite_of(chain[-1], self.label)
        wrappers = [self.operation(name).call for name in rewrite.names()]
        return rewrite, rewrap(chain, rewrite.instantiate(wrappers))

    def copy_of(self, function: Any) -> Callable[..., Any]:
        """The rewritten copy of `function` (a function or bound method) as an operation
        calls it (model thread)."""
        found = self._copies.get(id(function))
        if found is not None and found[0] is function:
            return found[1]
        bound = (
            getattr(function, "__self__", None) if isinstance(function, types.MethodType) else None
        )
        plain = function.__func__ if bound is not None else function
        if isinstance(plain, nn.Module):
            raise UsageError(_module_message(self.label, plain))
        rewrite, copy = self.rewritten(plain)
        self.rewrite = self.rewrite or rewrite
        self._check_named(rewrite)
        made = copy if bound is None else types.MethodType(copy, bound)
        if len(self._copies) > 64:
            self._copies.clear()
        self._copies[id(function)] = (function, made)
        return made

    def _check_named(self, rewrite: Rewrite) -> None:
        missing = sorted(set(self.operations) - set(rewrite.names()))
        if missing:  # forgotten: a misspelt name fails this trace only, not every later one
            for name in missing:
                del self.operations[name]
            raise UsageError(
                f"{self.label} called {rewrite.function.__qualname__}, which makes no call "
                f"named {', '.join(missing)}; its calls: {', '.join(rewrite.names()) or 'none'}"
            )

    def listing(self) -> str:
        if self.rewrite is None:
            return (
                f"{self.label}: the function is chosen when the operation runs; its source "
                "is known once a trace has called it"
            )
        return self.rewrite.listing()


def module_source(traced: Traced, site: int, path: str) -> FunctionSource:
    """The source of the module at `site`, rewriting its forward on first use."""
    found: FunctionSource | None = traced.sources.get(site)
    if found is not None:
        return found
    tap = traced.taps[site]
    module = tap.module
    label = f"model.{path}.source" if path else "model.source"
    node = FunctionSource(traced, tap.routes, path, label)
    node.module = module
    forward, hooked = _forward_of(module, tap.original, label)
    node.rewrite, copy = node.rewritten(forward)
    bound = types.MethodType(copy, module)
    tap.trace_with(bound if not hooked else _with_accelerate_hook(module, bound))
    traced.sources[site] = node
    return node


def nested_source(operation: OperationSite) -> FunctionSource:
    """`op.source`: the source of the function `operation` calls (resolved now when its
    expression names a known function, else when it runs)."""
    if operation.nested is not None:
        return operation.nested
    owner = operation.owner
    node = FunctionSource(
        owner.traced, owner.routes, operation.path, f"model.{operation.path}.source"
    )
    rewrite = owner.rewrite
    if rewrite is not None:
        called = _resolve(rewrite, operation.name, owner)
        if isinstance(called, nn.Module):
            raise UsageError(_module_message(node.label, called))
        if called is not _UNKNOWN:
            plain = called.__func__ if isinstance(called, types.MethodType) else called
            node.rewrite = node.rewritten(plain)[0]
    operation.nested = node
    return node


def _forward_of(module: nn.Module, original: Any, label: str) -> tuple[Any, bool]:
    """The forward function to rewrite (`original` is the module's forward as its tap found
    it), and whether accelerate's hook wraps it (then its `_old_forward` is rewritten)."""
    attributes = module.__dict__
    hooked = "_old_forward" in attributes and "_hf_hook" in attributes
    forward = attributes["_old_forward"] if hooked else original
    if isinstance(forward, types.MethodType):
        forward = forward.__func__
    if not isinstance(forward, types.FunctionType):
        raise SourceUnavailableError(
            f"{label}: the forward of {type(module).__name__} is a {type(forward).__name__}, "
            "not a Python function; it cannot be rewritten"
        )
    return forward, hooked


def _with_accelerate_hook(module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
    """What accelerate's forward does around `_old_forward`, around `forward` instead."""

    def hooked(*args: Any, **kwargs: Any) -> Any:
        hook: Any = module.__dict__["_hf_hook"]
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
        if getattr(hook, "no_grad", False):
            with torch.no_grad():
                output = forward(*args, **kwargs)
        else:
            output = forward(*args, **kwargs)
        return hook.post_forward(module, output)

    return hooked


def _resolve(rewrite: Rewrite, name: str, owner: FunctionSource) -> Any:
    """What the operation `name` calls, when its expression is a chain of names reachable
    without running the function (globals, closure, builtins, the module as `self`)."""
    operation = next((op for op in rewrite.operations if op.name == name), None)
    if operation is None:
        return _UNKNOWN
    function = rewrite.function
    cells = dict(zip(function.__code__.co_freevars, function.__closure__ or (), strict=True))
    expression = operation.expression
    attributes: list[str] = []
    while hasattr(expression, "attr") and hasattr(expression, "value"):
        attributes.append(expression.attr)
        expression = expression.value
    base = getattr(expression, "id", None)
    first = function.__code__.co_varnames[:1]
    if base is None:
        return _UNKNOWN
    module = owner.module
    if base in first and module is not None:
        value: Any = module
    elif base in cells:
        value = cells[base].cell_contents
    elif base in function.__code__.co_varnames:
        return _UNKNOWN  # a local: known when it runs
    elif base in function.__globals__:
        value = function.__globals__[base]
    elif hasattr(builtins, base):
        value = getattr(builtins, base)
    else:
        return _UNKNOWN
    try:
        for attribute in reversed(attributes):
            value = getattr(value, attribute)
    except AttributeError:
        return _UNKNOWN
    return value


def _module_message(label: str, module: nn.Module) -> str:
    return (
        f"{label}: the operation calls the module {type(module).__name__}, which has an Envoy "
        "of its own: use that module's .source (e.g. model.<its path>.source)"
    )
