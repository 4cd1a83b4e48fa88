"""Traces and invokes: what `model.trace(...)` returns, and how a trace runs.

Lifecycle of a `Tracer` (`_protocol.TraceState`): OPEN (collecting invokes) -> RUNNING (one
batched forward with its mediators, exactly once, by `_run.run_trace`) -> CLOSED; or OPEN ->
CLOSED when the trace's own block raises (its function invokes' futures then fail).
`model.trace(x)` with inputs makes its own with-body the single invoke and runs at once, in
`__enter__`; `model.trace()` without inputs collects `tr.invoke(...)` blocks (with-bodies or
`.run(fn)` functions) and runs when its block exits.
Either way, when the run ends, successful or not, the names the with-bodies bound are written
back into the caller's scope, function futures are resolved, and no mediator, tap or activation
of the trace is left.
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from . import _context
from ._barrier import Barrier
from ._batcher import Inputs
from ._cache import Cache
from ._callsite import user_line, user_traceback
from ._edits import edit_invoke
from ._errors import ShapeError, UsageError
from ._frames import BodySkipper, check_unbinding, read_names, write_names
from ._future import InvokeFuture
from ._names import closest_hint
from ._protocol import SkipBody, TraceState
from ._run import InvokeSpec, run_trace
from ._source import BodySource, capture, check_items
from ._steps import Steps
from ._traced import Traced
from ._tree import tensors

if TYPE_CHECKING:
    from ._envoy import Model
    from ._mediator import Mediator

_GENERATION_OPTIONS = frozenset(
    {
        "max_new_tokens",
        "min_new_tokens",
        "max_length",
        "do_sample",
        "num_beams",
        "num_return_sequences",
        "streamer",
        "generation_config",
        "temperature",
        "top_k",
        "top_p",
    }
)


class Invoke:
    """One invoke of a trace: its inputs, and a with-body or a function to run.

    `tr.invoke(x)` makes one. Use it as a `with` block, whose body then runs in its own thread
    alongside the forward pass (not where it stands), or hand it a function with `.run(fn)`.
    Its rows of the batch are those of its inputs; an invoke without inputs sees every row.
    Invokes are served in the order they are defined.

    Example:

        with model.trace() as tr:
            with tr.invoke(x1):                 # the body is this invoke
                h1 = model.layers[1].output
            future = tr.invoke(x2).run(lambda: model.layers[1].output)
        h2 = future.result()
    """

    def __init__(
        self,
        tracer: Tracer,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        line: tuple[str, int] | None,
    ) -> None:
        self.tracer = tracer
        self.inputs: Inputs | None = None
        self.line = line  # where the user made it, for errors about its inputs
        if args or kwargs:
            traced = tracer._traced
            self.inputs = traced.batcher.name_inputs(
                getattr(traced.module, tracer._method), args, kwargs
            )
        self.source: BodySource | None = None
        self.scope: dict[str, Any] = {}  # the enclosing names the body uses
        self.function: tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]] | None = None
        self.future: InvokeFuture | None = None
        self._skipper: BodySkipper | None = None

    def __enter__(self) -> Invoke:
        self.tracer._add(self, "with tr.invoke(...)")
        frame = sys._getframe(1)
        self._capture(frame, self, "tr.invoke(...)")
        self._skip(frame)
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> bool:
        if self._skipper is not None:
            self._skipper.restore()
            self._skipper = None
        return kind is SkipBody

    def run(
        self, fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        """Run `fn(*args, **kwargs)` as this invoke's body; its result arrives in the future
        when the trace has run (after the `with model.trace()` block).

        Returns a `concurrent.futures.Future`. The function needs no source code, so this form
        works in a REPL, in `exec`, with lambdas and in library code; otherwise it behaves like
        a with-body. An exception in `fn` fails the trace, and the future holds it too. Calling
        `.result()` before the trace has run raises `UsageError`.

        Example:

            def ablate(layer):
                model.layers[layer].output = torch.zeros_like(model.layers[layer].output)
                return model.output.argmax(-1)

            with model.trace() as tr:
                a = tr.invoke(x1).run(ablate, 0)
                b = tr.invoke(x2).run(ablate, 1)
            print(a.result(), b.result())
        """
        if not callable(fn):
            raise TypeError(
                f"tr.invoke(...).run() needs a callable, got {type(fn).__name__}; pass the "
                "function itself, e.g. .run(fn, arg) rather than .run(fn(arg))"
            )
        kind = _lazy_kind(fn)
        if kind is not None:
            raise UsageError(
                f"tr.invoke(...).run({getattr(fn, '__qualname__', fn)!r}) got {kind} function: "
                "calling it would only create the object, not run its body. Pass a plain "
                "function (collect values in a list and return it)"
            )
        self.tracer._add(self, "tr.invoke(...).run(fn)")
        self.function = (fn, args, kwargs)
        self.future = InvokeFuture(self.tracer)
        return self.future

    def _capture(self, frame: types.FrameType, entered: Any, what: str) -> None:
        source = capture(frame, what)
        self.source = source
        self.scope = read_names(frame, source.reads)
        check_unbinding(frame, source.deletes, self.scope)
        if source.as_name is not None:
            self.scope[source.as_name] = entered
            write_names(frame, {source.as_name: entered})  # bound whatever the body does

    def _skip(self, frame: types.FrameType) -> None:
        """Make the caller jump over the body (the mediator runs it)."""
        source = self.source
        if source is not None and not source.trivial:
            self._skipper = BodySkipper(frame)


class Tracer:
    """`model.trace(...)`: one batched forward pass with the invokes defined in its block.

    Made by `Model.trace` and `Model.generate`, and used as a `with` block. Given inputs, the
    trace runs its own body as the single invoke when the block is entered; without inputs it
    collects `tr.invoke(...)` invokes and runs them together when the block ends. Either way,
    every thread and hook of the trace is gone afterwards, and the names the bodies bound are
    bound in your scope.

    Example:

        with model.trace() as tr:
            with tr.invoke(clean):
                clean_h = model.layers[3].output
            with tr.invoke(corrupt):
                model.layers[3].output = clean_h
                patched = model.output
        out = tr.result                         # the batched forward's return value
    """

    def __init__(
        self,
        model: Model,
        traced: Traced,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        method: str = "forward",
    ) -> None:
        self.model = model
        self._traced = traced
        self._method = method
        self._invokes: list[Invoke] = []
        own = bool(args) or any(_holds_tensor(value) for value in kwargs.values())
        self._own = Invoke(self, args, kwargs, user_line()) if own else None
        self._options = {} if own else kwargs  # call options for a trace of several invokes
        self._caches: list[Cache] = []  # opened in the trace's block, before it runs
        if method == "forward" and _GENERATION_OPTIONS & set(kwargs):
            options = ", ".join(sorted(_GENERATION_OPTIONS & set(kwargs)))
            raise UsageError(
                f"model.trace() got generation options ({options}); use "
                "model.generate(..., max_new_tokens=n) to trace generation"
            )
        self._state = TraceState.OPEN
        self._globals: dict[str, Any] = {}
        self._output: Any = None
        self._handoffs = 0  # thread handoffs the run made (for tests of the cost model)

    def __enter__(self) -> Tracer:
        frame = sys._getframe(1)
        self._globals = frame.f_globals
        own = self._own
        if own is not None:
            self._invokes.append(own)
            own._capture(frame, self, "model.trace(...)")
            self._run(frame)
            own._skip(frame)
        else:
            check_items(frame, "model.trace()")
        return self

    def __exit__(self, kind: Any, error: Any, tb: Any) -> bool:
        own = self._own
        if own is not None:
            return own.__exit__(kind, error, tb)
        if kind is not None:
            self._abandon(error)  # the block itself failed: nothing runs
            return False
        self._run(sys._getframe(1))
        return False

    def invoke(self, *args: Any, **kwargs: Any) -> Invoke:
        """A new invoke with these inputs (none: the whole batch of the other invokes).

        Inputs of several invokes are concatenated along dim 0 into one batch; each invoke reads
        and writes only its own rows. Only a trace opened without inputs takes invokes, and not
        from inside an invoke body (`UsageError`).

        Example:

            with model.trace() as tr:
                with tr.invoke(x1):                 # rows 0 .. len(x1) - 1
                    a = model.output
                with tr.invoke(x2):                 # the next len(x2) rows
                    b = model.output
                with tr.invoke():                   # no inputs: every row of the batch
                    both = model.output
        """
        caller = sys._getframe(1)  # the user's: `tr.invoke` is called from user code
        return Invoke(self, args, kwargs, (caller.f_code.co_filename, caller.f_lineno))

    def barrier(self, parties: int) -> Barrier:
        """A barrier for `parties` invokes: each calls it and waits until all have.

        Returns a `Barrier`; see there for when order alone is not enough.

        Example:

            with model.trace() as tr:
                both = tr.barrier(2)
                with tr.invoke(x1):
                    h1 = model.layers[1].output
                    both()
                with tr.invoke(x2):
                    h2 = model.layers[1].output
                    both()
        """
        if parties < 1:
            raise ValueError(f"tr.barrier(n) needs n >= 1, got {parties}")
        return Barrier(parties)

    @property
    def iter(self) -> Steps:
        """Steps of the trace: `for step in tr.iter[:]` (also `[i]`, `[a:b]`, `[a:]`,
        `[[i, j]]`). Inside the loop every request targets the module's call number `step`.

        In `generate`, step k is forward pass number k (step 0 runs over the prompt); within one
        forward pass, it picks a call of a module that runs several times. An open slice (`[:]`,
        `[a:]`) ends when the traced call returns, and the code after the loop then runs; a
        bounded step the model never reached raises `MissedProviderError`. Only inside an
        invoke body.

        Example:

            with model.generate(input_ids, max_new_tokens=5) as tr:
                logits = []
                for step in tr.iter[:]:
                    if step == 2:
                        model.layers[0].output[:] = 0
                    logits.append(model.lm_head.output)
                stacked = torch.cat(logits, dim=1)  # runs once generation has ended
        """
        return Steps(self._own_mediator("tr.iter[...]"))

    def all(self) -> Iterator[int]:
        """Every step, until the traced call returns: the same as `tr.iter[:]`.

        Example:

            with model.generate(input_ids, max_new_tokens=3) as tr:
                last = []
                for step in tr.all():
                    last.append(model.lm_head.output[:, -1])
        """
        return self.iter[:]

    @property
    def result(self) -> Any:
        """The traced call's return value: after the trace, or inside a body (which then
        waits until the call has returned, and gets its own rows).

        For `model.trace` it is what the forward pass returned, for `model.generate` what
        `generate` returned. Read outside a body before the trace has run, it raises
        `UsageError`. Keeping `tr` keeps this value, not the values the bodies saw.

        Example:

            with model.generate(input_ids, max_new_tokens=5) as tr:
                h = model.layers[0].output
            tokens = tr.result

            with model.trace() as tr:
                with tr.invoke(x1):
                    mine = tr.result                # waits for the forward: x1's rows only
                with tr.invoke(x2):
                    h2 = model.layers[1].output
        """
        mediator = _context.current()
        if mediator is not None and mediator.tracer is self:
            return mediator.traced_result()
        if self._state is not TraceState.CLOSED:
            raise UsageError(
                "tr.result is there once the trace has run: read it after the `with` block, "
                "or inside an invoke body"
            )
        return self._output

    def cache(self, modules: Any = None, inputs: bool = False) -> Cache:
        """Record every module's output (or those of `modules`, Envoys or paths), and with
        `inputs=True` their `(args, kwargs)` too, as the rest of the forward sees them, one entry
        per call, from now on. Inside an invoke body it holds that invoke's rows.

        Returns a `Cache`, a mapping from module path to the list of values, read after the
        trace (or later in the body). Opened in the block of a trace without inputs, before it
        runs, it holds the whole batch. Values are recorded after every intervention at their
        boundary; they are references, not copies.

        Example:

            with model.trace(x) as tr:
                cache = tr.cache(modules=[model.layers[0], "layers.1"], inputs=True)
                model.layers[0].output = model.layers[0].output * 2
            cache["layers.0"][0]                    # the doubled output of its first call
            cache.inputs["layers.1"][0]             # (args, kwargs) of layers.1's first call
        """
        traced = self._traced
        paths = dict(enumerate(traced.paths[: len(traced.taps)]))  # modules, not operations
        if modules is not None:
            if isinstance(modules, str) or not isinstance(modules, (list, tuple, set)):
                modules = [modules]
            paths = dict(_site_of(traced, module) for module in modules)
        mediator = _context.current()
        if mediator is not None and mediator.tracer is self:
            cache = Cache(paths, mediator.rows, inputs, traced.real_path)
            assert mediator.interleaver is not None
            mediator.interleaver.open_cache(cache)
            return cache
        if self._state is not TraceState.OPEN:
            raise UsageError("tr.cache() after the trace ran: open it in the trace's block")
        cache = Cache(paths, None, inputs, traced.real_path)
        self._caches.append(cache)
        return cache

    def stop(self) -> None:
        """End the forward pass right after the current point; the trace exits normally.

        It acts like `return` in the body that calls it: the code after it does not run. The
        rest of the model does not run either, and every name bound so far is kept. Other
        bodies are served at the current point first; one still waiting for something later
        then ends at that request, with a `StoppedWarning`. `tr.result` is `None` after a
        stopped call. Only inside an invoke body.

        Example:

            with model.trace(x) as tr:
                h = model.layers[1].output
                tr.stop()                           # layers.2 onwards do not run
            print(h.shape)
        """
        self._own_mediator("tr.stop()").stop()

    def _own_mediator(self, what: str) -> Mediator:
        mediator = _context.require(what)
        if mediator.tracer is not self:
            raise UsageError(f"{what} belongs to another trace than the body that calls it")
        return mediator

    def _add(self, invoke: Invoke, what: str) -> None:
        if self._own is not None:
            raise UsageError(
                f"{what} inside `with model.trace(x):` - a trace given inputs is itself the "
                "single invoke. Use `with model.trace() as tr:` without inputs and one "
                "tr.invoke(x) per input"
            )
        mediator = _context.current()
        if mediator is not None and mediator.tracer is self:
            raise UsageError(
                f"{what} inside an invoke body: invokes cannot be nested. Put each invoke "
                "directly in the `with model.trace() as tr:` block"
            )
        if self._state is not TraceState.OPEN:
            raise UsageError(f"{what} after this trace ran: open a new model.trace()")
        self._invokes.append(invoke)

    # -- running ------------------------------------------------------------------------------

    def _run(self, frame: types.FrameType) -> None:
        """Run the trace once (`_run.run_trace`); raise what failed it. This frame keeps nothing
        of the trace but what `tr` keeps, so a kept exception keeps no activation alive."""
        self._state = TraceState.RUNNING
        invokes, self._invokes = self._invokes, []
        caches, self._caches = self._caches, []
        specs = [
            InvokeSpec(invoke.inputs, invoke.source, invoke.scope, invoke.function, invoke.future)
            for invoke in invokes
        ]
        lines = [invoke.line for invoke in invokes]
        edits = self.model._edits
        if edits:  # the model's edits run first, as an invoke of their own
            specs.insert(0, edit_invoke(edits))
            lines.insert(0, None)
        for invoke in invokes:
            invoke.scope = {}
            invoke.function = invoke.future = None
        del invokes
        try:
            failure, self._output, self._handoffs = run_trace(
                self, self._traced, self._method, specs, self._options, caches, self._globals, frame
            )
        finally:
            self._state = TraceState.CLOSED
            if self._own is not None:
                self._own.tracer = None  # type: ignore[assignment]  # no cycle: garbage-free exit
        del specs, caches
        if isinstance(failure, ShapeError) and failure.invokes:
            failure.args = (f"{failure}{_where_made(failure.invokes, lines)}",)
        if failure is not None:
            raise failure.with_traceback(user_traceback(failure.__traceback__))

    def _abandon(self, error: BaseException) -> None:
        """The trace's own block raised `error` before the trace ran: it never will."""
        self._state = TraceState.CLOSED
        for invoke in self._invokes:
            if invoke.future is not None:
                invoke.future.resolve(None, error)  # what stopped the trace, as for a body
            invoke.scope = {}
            invoke.function = invoke.future = None
        self._invokes = []
        self._caches = []


def _where_made(indices: tuple[int, ...], lines: list[tuple[str, int] | None]) -> str:
    """Where the user made the invokes `indices`, for an error about their inputs."""
    made = [(index, lines[index]) for index in indices if index < len(lines)]
    return "".join(f"\n  invoke {index}: {where[0]}:{where[1]}" for index, where in made if where)


def _holds_tensor(value: Any) -> bool:
    """Whether a keyword given to `model.trace(...)` is an input (a tensor, or a tuple, list,
    dict or dataclass holding one) rather than a call option such as `output_hidden_states`."""
    return bool(tensors(value))


def _site_of(traced: Traced, module: Any) -> tuple[int, str]:
    """The site index and path of a module given as an Envoy or a path (aliases too)."""
    path = module if isinstance(module, str) else getattr(module, "path", None)
    if not isinstance(path, str):
        raise TypeError(f"tr.cache(modules=...) takes Envoys or paths, got {type(module).__name__}")
    site = traced.site_at(path)  # real names, aliases or both
    if site is not None:
        return site, path  # recorded under the name the user wrote
    hint = closest_hint(path, traced.paths)
    raise UsageError(f"tr.cache(): the model has no module {path!r} that it calls.{hint}")


_LAZY = (
    (inspect.CO_COROUTINE, "a coroutine"),
    (inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR, "a generator"),
)


def _lazy_kind(fn: Any) -> str | None:
    """ "a generator" or "a coroutine" if calling `fn` would only make one (also through
    `functools.partial` and bound methods), else None. One flag test: `.run` is on the hot path."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    code = getattr(getattr(fn, "__func__", fn), "__code__", None)
    flags = code.co_flags if isinstance(code, types.CodeType) else 0
    return next((kind for flag, kind in _LAZY if flags & flag), None)
