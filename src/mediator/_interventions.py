"""The intervention API shared by module Envoys and operation Envoys: `.output`, `.inputs`,
`.input` and `.skip(v)`, each turned into a request of the calling thread's mediator.

A subclass says which site it is (`_request`) and how it is named in messages (`_label`); this
mixin owns no state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _context
from ._callsite import user_location
from ._errors import UsageError
from ._protocol import INPUT, OUTPUT, Key

if TYPE_CHECKING:
    from ._mediator import Mediator


class Interventions:
    """`.output`, `.inputs`, `.input` and `.skip(v)` of one site (a module or an operation)."""

    _model: Any

    def _label(self) -> str:
        raise NotImplementedError

    def _request(self, what: str, kind: int) -> tuple[Mediator, Key]:
        raise NotImplementedError

    def _mediator(self, what: str) -> Mediator:
        """The calling body's mediator, checked to trace this Envoy's model (or an edited
        Model of the same module)."""
        mediator = _context.current() or _context.require(f"{self._label()}.{what}")
        if mediator.tracer.model._traced is not self._model._traced:
            raise UsageError(
                f"{self._label()}.{what} belongs to another Model than the one this invoke "
                "traces; use the Envoys of the model passed to this trace"
            )
        return mediator

    @property
    def output(self) -> Any:
        """The module's output for this invoke's rows (blocks until the module has run).

        Reading it gives the real value the model computed, narrowed to this invoke's rows of the
        batch, on the device where the module made it (nothing is moved on read). Setting it
        (`.output = v`) replaces that value for the rest of the forward pass; `v` must have the
        same structure and shapes (else `ShapeError`), and its tensors are moved to the device
        and dtype of those they replace (a float32 value over a bfloat16 output becomes
        bfloat16, a CPU one over a CUDA output moves to the GPU; the same holds for `.inputs`,
        `.input` and `.skip`); a cast across kinds, which PyTorch does not make in place either
        (a float into an integer, a complex into a float), is a `ShapeError`. Editing the tensor
        in place (`.output[:, 0] = 0`) changes it too. Inside `tr.iter[...]` it is the output of the
        module's call numbered `step`, else of its first call. Calls are numbered in the order
        they start: a module that calls itself returns from its inner calls (higher numbers)
        before the outer one, so request their outputs first. It is what the module's
        `forward` returned: forward hooks registered on the module itself run after it (a hook
        that changes the output changes the value read or set here, as it would a plain
        output). Outside an invoke body it raises `UsageError`; a module the model has already
        run raises `OutOfOrderError`.

        Example:

            with model.trace(x):
                h = model.layers[1].output
                model.layers[1].output = h * 2      # the rest of the forward sees h * 2
                model.layers[2].output[:, 0] = 0    # an in-place edit of the real tensor
                logits = model.output               # the root module's output
        """
        mediator, key = self._request("output", OUTPUT)
        return mediator.value(key)

    @output.setter
    def output(self, value: Any) -> None:
        mediator, key = self._request("output", OUTPUT)
        mediator.swap(key, lambda old: value, user_location())

    @property
    def inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """`(args, kwargs)` of the module's call, for this invoke's rows.

        Set it to a new `(args, kwargs)` pair to call the module with other arguments; tensors
        must keep their shapes. Like `.output`, it waits until the model reaches the call, and
        must be requested before the module's output.

        Example:

            with model.trace(x):
                args, kwargs = model.layers[0].inputs
                model.layers[0].inputs = ((args[0] * 0.5,), kwargs)
        """
        mediator, key = self._request("inputs", INPUT)
        return mediator.value(key)  # type: ignore[no-any-return]

    @inputs.setter
    def inputs(self, value: tuple[Any, Any]) -> None:
        mediator, key = self._request("inputs", INPUT)
        try:
            args, kwargs = value
            new = (tuple(args), dict(kwargs))
        except (TypeError, ValueError):
            raise TypeError(
                f"{self._label()}.inputs must be set to (args, kwargs), e.g. ((x,), {{}})"
            ) from None
        mediator.swap(key, lambda old: new, user_location())

    @property
    def input(self) -> Any:
        """The first positional argument of the call (or the first keyword argument).

        Settable: `.input = v` replaces just that argument and keeps the others. A call without
        any argument has no `.input` (`UsageError`).

        Example:

            with model.trace(x):
                h = model.layers[1].input               # what layers.0 passed on
                model.layers[1].input = h + steer       # layers.1 runs on the edited value
        """
        mediator, key = self._request("input", INPUT)
        args, kwargs = mediator.value(key)
        if args:
            return args[0]
        if kwargs:
            return next(iter(kwargs.values()))
        raise UsageError(f"{self._label()} was called without arguments: it has no .input")

    @input.setter
    def input(self, value: Any) -> None:
        mediator, key = self._request("input", INPUT)
        label = self._label()

        def replace_first(old: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
            args, kwargs = old
            if args:
                return ((value, *args[1:]), kwargs)
            if kwargs:
                first = next(iter(kwargs))
                return (args, {**kwargs, first: value})
            raise UsageError(f"{label} was called without arguments: it has no .input to set")

        mediator.swap(key, replace_first, user_location())

    def skip(self, value: Any) -> None:
        """Do not run this module for this invoke: `value` is its output.

        Call it before the module runs. `value` must look like the output the module would have
        given for this invoke's rows (the same structure and shapes, else `ShapeError`); its
        tensors are moved to that output's devices and dtypes, as for `.output = v`. Other
        invokes of the trace still run the module on their own rows; when none does, a copy of
        the module runs on fake tensors (no data, no effect on the module, its inputs or hooks)
        to learn those shapes.

        Example:

            with model.trace(x):
                h = model.layers[1].output
                model.layers[2].skip(h)             # layers.2 does not run; h is its output
                out = model.output
        """
        mediator, key = self._request("skip()", INPUT)
        mediator.skip(key, value, user_location())
