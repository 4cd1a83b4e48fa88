"""Running one trace: acquire what it needs, run the forward with its mediators, give it all back.

`run_trace` is the only place a trace's resources are taken, and each is registered in one
release stack (`_releases.Releases`) the moment it is acquired, so whatever fails (batching the
inputs, compiling a body, pinning the CPU, starting a worker, the model, a body, Ctrl-C) every
release step runs, each independently of the others, in this order:

    1. the mediators: on a failure or `tr.stop()`, the interleaver cancels every mediator that
       has not ended (one at a time; see `_interleaver.py`), else each has ended already; after
       `tr.stop()` (without a failure) each one cancelled is noted as cut short;
    2. the taps: the model's modules route the calling thread's calls as before the trace;
    3. Ctrl-C: SIGINT's handler is the one from before the trace;
    4. the CPU pin: the calling thread gets its own CPU mask back;
    5. the interleaver drops the values it held;
    6. the invokes are settled: names the with-bodies bound are written back into the caller's
       frame, every function invoke's future is resolved (with its result, its error, or the
       trace's failure), late in-place edits and bodies cut short by `tr.stop()` are reported
       (`LateEditWarning`, `StoppedWarning`), and no value of the trace is kept.

This module owns no state beyond one run's locals.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from ._affinity import restore_current_thread, trace_cpu
from ._batcher import Inputs
from ._body import make_body
from ._cache import Cache
from ._errors import MediatorError, MissedProviderError, UsageError
from ._expansion import generation_expansion
from ._frames import UNBOUND, write_names
from ._interleaver import Interleaver
from ._interrupts import model_call_site, route_sigint, unroute_sigint
from ._late_edits import warn, warn_stopped
from ._mediator import Mediator
from ._protocol import Abort, MediatorState, StopForward
from ._releases import Releases
from ._source import BodySource
from ._tap import attach, detach
from ._torchstate import TorchState
from ._traced import Traced


class Resolvable(Protocol):
    """The future of a function invoke, as the run engine resolves it."""

    def resolve(self, result: Any, error: BaseException | None) -> None: ...


@dataclass(eq=False, slots=True)
class InvokeSpec:
    """What one invoke brings to a run: its inputs, and a with-body or a function."""

    inputs: Inputs | None
    source: BodySource | None = None  # a with-body's source
    scope: dict[str, Any] = field(default_factory=dict)  # the enclosing names it uses
    function: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None = None
    future: Resolvable | None = None
    starts_bound: frozenset[str] = frozenset()  # names it binds that it gets as parameters


@dataclass(eq=False, slots=True)
class _Outcome:
    """What a run produced so far: read by the release steps, returned at the end."""

    mediators: list[Mediator] = field(default_factory=list)
    interleaver: Interleaver | None = None
    output: Any = None
    failure: BaseException | None = None
    handoffs: int = 0


def run_trace(
    owner: Any,
    traced: Traced,
    method: str,
    invokes: list[InvokeSpec],
    options: dict[str, Any],
    caches: list[Cache],
    globals_: dict[str, Any],
    frame: types.FrameType,
) -> tuple[BaseException | None, Any, int]:
    """Run the trace `owner` (the Tracer the bodies belong to) once, calling `method` of the
    traced module; return what failed it (or None), the call's return value, and the number
    of handoffs the run made (the protocol's cost model, see `_interleaver.py`)."""
    outcome = _Outcome()
    try:
        with Releases() as release:
            release.on_exit(_settle, outcome, invokes, frame)
            generate = method == "generate"
            batched, rows, total = _batch(traced, [i.inputs for i in invokes], generate)
            args, kwargs = batched[0], _with_options(batched[1], options)
            state = TorchState.capture()
            names = _Names(invokes) if len(invokes) > 1 else None
            for index, spec in enumerate(invokes):
                built = _build_mediator(owner, spec, index, rows[index], state, names, globals_)
                outcome.mediators.append(built)
            interleaver = Interleaver(
                traced.paths,
                outcome.mediators,
                traced.batcher.for_run(batched),
                total,
                traced.dims,
                generation_expansion(traced.module, kwargs) if generate else (),
                None if generate or not traced.paths or traced.paths[0] else traced.dims[1][0],
            )
            outcome.interleaver = interleaver
            interleaver.generating = generate
            release.call(_close, outcome, interleaver)
            for cache in caches:
                interleaver.open_cache(cache)
            if traced.pin_threads:
                pinned = trace_cpu()
                if pinned is not None:
                    release.call(restore_current_thread, pinned[1])
                    interleaver.cpu = pinned[0]
            if route_sigint(interleaver):
                release.call(unroute_sigint)
            release.call(detach, attach(traced.taps, interleaver))
            release.on_exit(_end_mediators, interleaver, outcome)
            interleaver.start()
            outcome.output = _call_model(_traced_call(traced, method), args, kwargs)
            interleaver.finish(outcome.output)
            if interleaver.interrupted:  # Ctrl-C after the last wait: still a Ctrl-C
                raise KeyboardInterrupt
    except BaseException as error:  # noqa: BLE001 - returned, and raised by the caller
        outcome.failure = outcome.failure or error
    return outcome.failure, outcome.output, outcome.handoffs


def _batch(
    traced: Traced, inputs: list[Inputs | None], generate: bool
) -> tuple[Inputs, list[slice | None], int]:
    """The invokes' inputs batched along the model's input batch dims (when it has a forward of
    its own, they are not the default, and the call is the forward)."""
    dims = traced.dims[0][0] if traced.paths and not traced.paths[0] else None
    if dims is None or generate:
        return traced.batcher.batch(inputs, generate)
    return traced.batcher.batch(inputs, generate, dims)


def _close(outcome: _Outcome, interleaver: Interleaver) -> None:
    """Release step 5: the run's handoff count is kept, and the interleaver drops its values."""
    outcome.handoffs = interleaver.handoffs
    interleaver.close()


@model_call_site
def _call_model(call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The traced call itself (a Ctrl-C here interrupts the model at once)."""
    return call(*args, **kwargs)


def _traced_call(traced: Traced, method: str) -> Callable[..., Any]:
    if method == "forward":
        return traced.module  # through __call__, so the module's own hooks run
    return getattr(traced.module, method)  # type: ignore[no-any-return]


def _with_options(kwargs: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    clash = set(options) & set(kwargs)
    if clash:
        raise UsageError(
            f"{sorted(clash)} given both to the trace and to its invokes; give each once"
        )
    return {**kwargs, **options}


class _Names:
    """Which names the with-bodies of a trace of several invokes bind and read, by invoke."""

    def __init__(self, invokes: list[InvokeSpec]) -> None:
        empty: frozenset[str] = frozenset()
        assigns = [i.source.assigns if i.source is not None else empty for i in invokes]
        loads = [i.source.loads if i.source is not None else empty for i in invokes]
        self.assigned_before = [empty]  # by invokes [0, i)
        for bound in assigns:
            self.assigned_before.append(self.assigned_before[-1] | bound)
        self.loaded_after = [empty]  # by invokes (i, n), built from the end
        for read in reversed(loads[1:]):
            self.loaded_after.append(self.loaded_after[-1] | read)
        self.loaded_after.reverse()
        self.assigns = assigns
        self.bound_by_all = self.assigned_before[-1]
        self.bound_twice = frozenset(
            name for name in self.bound_by_all if sum(name in bound for bound in assigns) > 1
        )

    def bound_by_others(self, index: int) -> frozenset[str]:
        """The names the with-bodies other than invoke `index`'s bind."""
        own = self.assigns[index]
        return (self.bound_by_all - own) | (own & self.bound_twice)


def _build_mediator(
    owner: Any,
    spec: InvokeSpec,
    index: int,
    rows: slice | None,
    state: TorchState,
    names: _Names | None,
    globals_: dict[str, Any],
) -> Mediator:
    """The mediator of one invoke: its function, or its with-body compiled as a function
    (`names` tells what the other invokes bind and read; None when there are none).

    A with-body reads a name it does not bind through the nearest earlier invoke that binds it
    (`cross`). A name it binds that another body binds or a later one reads (`shared`) is no
    parameter, so that its frame tells whether it has bound it yet; until it has, it reads the
    name as a `cross` one. With no earlier binding, it reads the value from before the trace."""
    empty: frozenset[str] = frozenset()
    bound_by_others = empty if names is None else names.bound_by_others(index)
    if spec.function is not None:
        fn, args, kwargs = spec.function
        call = partial(fn, *args, **kwargs)
        return Mediator(owner, index, call, (), rows, state, bound_elsewhere=bound_by_others)
    source = spec.source
    assert source is not None
    scope = spec.scope
    cross = shared = empty
    if names is not None:
        earlier, later = names.assigned_before[index], names.loaded_after[index]
        cross = (source.loads - source.assigns - source.declared_global) & earlier
        shared = source.assigns & (bound_by_others | later)
    spec.starts_bound = frozenset(name for name in source.assigns - shared if name in scope)
    mediator = Mediator(
        owner,
        index,
        None,
        (),
        rows,
        state,
        assigns=source.assigns,
        fallbacks={name: scope[name] for name in cross | shared if name in scope},
    )
    if source.trivial:
        mediator.end_unstarted()
        return mediator
    body, mediator.args = make_body(
        source, scope, cross, globals_, mediator.keep_locals, mediator.lookup_name, shared
    )
    mediator.body, mediator.code = body, body.__code__
    return mediator


def _end_mediators(
    interleaver: Interleaver, outcome: _Outcome, error: BaseException | None
) -> bool:
    """Release step 1: every mediator ends (or, after Ctrl-C, is left to end on its own within
    the cancellation chain); the run's failure is decided here."""
    failure = interleaver.failure
    if error is not None and not isinstance(error, (Abort, StopForward)):
        failure = failure or error
    if isinstance(error, StopForward):
        interleaver.forward_done = True
    outcome.failure = failure
    stopper = interleaver.stopped_by
    if failure is None and stopper is not None:
        interleaver.note_cuts(stopper)
    if failure is not None or stopper is not None:
        deadline = time.monotonic() + 1.0 if isinstance(failure, KeyboardInterrupt) else None
        interleaver.cancel(deadline)
    else:
        assert all(m.ended for m in interleaver.mediators), "a mediator outlived its trace"
    return error is not None  # the failure travels in `outcome`


def _settle(
    outcome: _Outcome,
    invokes: list[InvokeSpec],
    frame: types.FrameType,
    error: BaseException | None,
) -> bool:
    """Release step 6: names back into the caller's frame, futures resolved, late edits and cut
    bodies reported, and no value of the trace kept by the invokes or mediators."""
    failure = outcome.failure or error
    names: dict[str, Any] = {}
    mediators = outcome.mediators
    interleaver = outcome.interleaver
    late: list[tuple[Any, tuple[str, int] | None, tuple[str, int] | None]] = []
    cuts = []
    for position, spec in enumerate(invokes):
        mediator = mediators[position] if position < len(mediators) else None
        ended = mediator if mediator is not None and mediator.ended else None
        if spec.source is not None and ended is not None and ended.final_locals is not None:
            final = ended.final_locals  # a name the body deleted is unbound in the caller too
            deleted = {name for name, _ in spec.source.deletes}
            names.update(
                (name, final.get(name, UNBOUND))
                for name in spec.source.assigns
                if name in final or name in spec.starts_bound or name in deleted
            )
        if spec.future is not None:
            if ended is not None and ended.state is MediatorState.DONE and ended.error is None:
                spec.future.resolve(ended.result, None)
            elif ended is not None and ended.cut is not None:
                spec.future.resolve(None, MissedProviderError(ended.cut[0]))
            else:
                own = ended.error if ended is not None else None
                cancelled = MediatorError("the trace was cancelled")
                spec.future.resolve(None, own or failure or cancelled)
        spec.scope = {}
        spec.function = spec.future = None
        if ended is not None:  # else abandoned after Ctrl-C: it clears its own state as it ends
            if ended.watch.found:
                assert interleaver is not None
                late.extend((interleaver.describe(k, ended), w, s) for k, w, s in ended.watch.found)
            if ended.cut is not None:
                cuts.append(ended.cut)
            ended.watch.clear()
            ended.ops = []
            ended.final_locals = ended.result = ended.error = ended.cut = None
    write_names(frame, names)
    outcome.mediators = []
    outcome.interleaver = None
    for what, where, since in late:
        warn(what, where, since, frame)  # no `where`: it had ended
    fallback = (frame.f_code.co_filename, frame.f_lineno)
    for message, where in cuts:
        warn_stopped(message, where or fallback, frame)
    return False
