"""The user's handles on a forward's operations: `envoy.source` and `envoy.source.<name>`.

A `SourceEnvoy` shows a function's source with its calls named and hands out one
`OperationEnvoy` per call; an `OperationEnvoy` has the intervention API of a module Envoy
(`_interventions.py`) for its site, and `.source` for the function it calls. Both are made
once per operation and kept by it (`_operations.py` owns that state); this module owns none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import UsageError
from ._interventions import Interventions
from ._names import closest_hint
from ._operations import FunctionSource, OperationSite, nested_source

if TYPE_CHECKING:
    from ._mediator import Mediator
    from ._protocol import Key


class SourceEnvoy:
    """`envoy.source`: the calls a forward (or a function an operation calls) makes, by name.

    `print()` it to see the source with each line's calls named; an attribute is an operation
    (`.softmax_0`), which works like a module's Envoy. A name the source does not have raises
    `AttributeError` naming the closest real ones.

    Example:

        print(model.layers[0].attn.source)  # the forward, its calls named
        with model.trace(x):
            weights = model.layers[0].attn.source.softmax_0.output
    """

    def __init__(self, node: FunctionSource, model: Any) -> None:
        self._node = node
        self._model = model

    def __getattr__(self, name: str) -> OperationEnvoy:
        if name.startswith("__"):
            raise AttributeError(name)
        node = self._node
        rewrite = node.rewrite
        if rewrite is not None and name not in rewrite.names():
            hint = closest_hint(name, rewrite.names(), question=True)
            error = AttributeError(
                f"{node.label} has no operation {name!r}.{hint} Its operations: "
                f"{', '.join(rewrite.names()) or 'none'} (print({node.label}) shows them)"
            )
            error.name = None
            raise error
        operation = node.operation(name)
        if operation.envoy is None:
            operation.envoy = OperationEnvoy(operation, self._model)
        return operation.envoy  # type: ignore[no-any-return]

    def __dir__(self) -> list[str]:
        rewrite = self._node.rewrite
        return rewrite.names() if rewrite is not None else list(self._node.operations)

    def __repr__(self) -> str:
        return self._node.listing()


class OperationEnvoy(Interventions):
    """One call inside a forward (`model.layers[0].attn.source.softmax_0`): `.output`,
    `.inputs`, `.input` and `.skip(v)` work as on a module's Envoy, with the same call numbers
    (`tr.iter`), batching and errors; `.source` reaches the operations of the function it calls.

    Example:

        with model.trace(x):
            scores = model.layers[0].attn.source.softmax_0.input
            model.layers[0].attn.source.softmax_0.output[:, 0] = 0
    """

    def __init__(self, operation: OperationSite, model: Any) -> None:
        self._operation = operation
        self._model = model
        self._site = operation.site

    @property
    def path(self) -> str:
        """The operation's path: its module's, `.source.` and its name.

        Example:

            model.layers[0].attn.source.softmax_0.path  # "layers.0.attn.source.softmax_0"
        """
        return self._operation.path

    @property
    def source(self) -> SourceEnvoy:
        """The operations of the function this operation calls (see `Envoy.source`).

        Example:

            inner = model.layers[0].self_attn.source.attention_interface_0.source
            with model.trace(x):
                weights = inner.softmax_0.output
        """
        node = nested_source(self._operation)
        return source_envoy(node, self._model)

    def _label(self) -> str:
        return f"model.{self._operation.path}"

    def _request(self, what: str, kind: int) -> tuple[Mediator, Key]:
        mediator = self._mediator(what)
        interleaver = mediator.interleaver
        if interleaver is not None:
            interleaver.grow()  # this site may be newer than the trace
        return mediator, (self._site, kind, mediator.step)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """An operation cannot be called (`UsageError`): call its module or function instead.

        Example:

            model.layers[0].attn(x)                 # not model.layers[0].attn.source.fc_0(x)
        """
        raise UsageError(f"{self._label()} is an operation inside a forward: it cannot be called")

    def __repr__(self) -> str:
        return f"<operation {self._label()}>"


def source_envoy(node: FunctionSource, model: Any) -> SourceEnvoy:
    """The SourceEnvoy of `node`, made once."""
    if node.envoy is None:
        node.envoy = SourceEnvoy(node, model)
    return node.envoy  # type: ignore[no-any-return]
