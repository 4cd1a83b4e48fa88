"""The future of a function invoke (`tr.invoke(x).run(fn)`): its result once the trace ran.

The future keeps its trace only until it is resolved, to explain a `.result()` called too early;
it owns no other state.
"""

from __future__ import annotations

import concurrent.futures
from typing import TYPE_CHECKING, Any

from . import _context
from ._errors import UsageError
from ._protocol import TraceState

if TYPE_CHECKING:
    from ._tracer import Tracer


class InvokeFuture(concurrent.futures.Future):  # type: ignore[type-arg]
    """A Future that explains itself when waited on before its trace ran."""

    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self._tracer: Tracer | None = tracer

    def resolve(self, result: Any, error: BaseException | None) -> None:
        """Set the invoke's result, or its error (the run engine calls this once)."""
        self._tracer = None  # a kept future must not keep the trace (and its output) alive
        if error is None:
            self.set_result(result)
        else:
            self.set_exception(error)

    def result(self, timeout: float | None = None) -> Any:
        tracer = self._tracer
        if not self.done() and tracer is not None:
            mediator = _context.current()
            if tracer._state is TraceState.OPEN or (
                mediator is not None and mediator.tracer is tracer
            ):
                raise UsageError(
                    "this invoke's result is not there yet: it is set when the trace has run, "
                    "after its `with model.trace()` block. Call .result() after the block; to "
                    "pass values between invokes, bind names in with-bodies instead"
                )
        return super().result(timeout)
