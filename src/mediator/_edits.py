"""Edits: interventions that persist, recorded by `model.edit()` and run first in every trace.

An edit is a with-body (compiled once into a function of the names it uses, as they were when
the edit was recorded) or a function with its arguments. A `Model` keeps its edits in a list;
every trace of it runs one more invoke before its own, without inputs (so it sees every row),
that runs the edits in the order they were made (`edit_invoke`). Being the first invoke, it is
served first at every boundary, so the trace's own invokes see what the edits did. `Editor`
owns the state of one `with model.edit()` block while it is entered; nothing else here has any.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from ._body import make_body
from ._frames import BodySkipper, read_names, write_names
from ._protocol import SkipBody
from ._run import InvokeSpec
from ._source import capture

#: One edit: a function, its positional and its keyword arguments.
Edit = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class Editor:
    """`model.edit()`: record a persistent intervention, as a with-body or with `.run(fn)`.

    The body does not run where it stands; it runs at the start of every trace, generation and
    plain call of the edited model, before the trace's own invokes, on every row. `as edited`
    binds the edited model: a new `Model` of the same module (the module and `model` are
    untouched), or `model` itself with `inplace=True`.

    Example:

        with model.edit() as edited:
            model.layers[0].output[:] = 0          # persists: every trace of `edited`
        with edited.trace(x):
            out = edited.output                     # computed with layers.0 zeroed
        y = edited(x)                               # plain calls too
    """

    def __init__(self, model: Any, inplace: bool) -> None:
        self._model = model
        self._inplace = inplace
        self._skipper: BodySkipper | None = None

    def _target(self) -> Any:
        return self._model if self._inplace else self._model._copy()

    def __enter__(self) -> Any:
        frame = sys._getframe(1)
        source = capture(frame, "model.edit()")
        scope = read_names(frame, source.reads)
        target = self._target()
        if source.as_name is not None:
            scope[source.as_name] = target
            write_names(frame, {source.as_name: target})
        if not source.trivial:
            body, args = make_body(source, scope, frozenset(), frame.f_globals, _keep, _lookup)
            target._edits.append((body, args, {}))
            self._skipper = BodySkipper(frame)
        return target

    def __exit__(self, kind: Any, error: Any, tb: Any) -> bool:
        if self._skipper is not None:
            self._skipper.restore()
            self._skipper = None
        return kind is SkipBody

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Record `fn(*args, **kwargs)` as the edit (it needs no source: for a REPL or
        library code); return the edited model.

        Example:

            def silence(layer):
                model.layers[layer].output[:] = 0

            edited = model.edit().run(silence, 0)
        """
        if not callable(fn):
            raise TypeError(f"model.edit().run() needs a callable, got {type(fn).__name__}")
        target = self._target()
        target._edits.append((fn, args, kwargs))
        return target


def edit_invoke(edits: list[Edit]) -> InvokeSpec:
    """The invoke that runs `edits` first in a trace (no inputs: every row)."""
    return InvokeSpec(None, function=(_apply, (tuple(edits),), {}))


def _apply(edits: tuple[Edit, ...]) -> None:
    for fn, args, kwargs in edits:
        fn(*args, **kwargs)


def _keep(final_locals: dict[str, Any]) -> None:
    """An edit's names stay its own: nothing is written back anywhere."""


def _lookup(name: str) -> Any:
    raise NameError(name)  # an edit reads only the names it had when it was recorded
