"""The release steps of one run, in one stack: what is acquired is registered at once.

`Releases` is a lean `contextlib.ExitStack` for the run engine (`_run.py`), which enters one for
every trace: a step is a plain call, and nothing is wrapped per step. As the block ends, the
steps run in reverse order of registration, each whatever the others did: a step that raises
replaces the error in flight (chained to it, as with `ExitStack`), and the rest still run. A step
registered with `on_exit` also sees the error in flight and may swallow it by returning True.

The state is the list of steps not yet run; it is empty once the block has ended.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

#: `step(error) -> swallow?` of `on_exit`, or a plain step (always called without the error).
_Step = tuple[Callable[..., Any], tuple[Any, ...], bool]


class Releases:
    """Release steps run in reverse order as the `with` block ends, each independently.

    Example:

        with Releases() as release:
            handle = acquire()
            release.call(give_back, handle)
            release.on_exit(report)         # report(error) -> True to swallow `error`
    """

    __slots__ = ("steps",)

    def __init__(self) -> None:
        self.steps: list[_Step] = []

    def call(self, step: Callable[..., Any], *args: Any) -> None:
        """Run `step(*args)` as the block ends."""
        self.steps.append((step, args, False))

    def on_exit(self, step: Callable[..., Any], *args: Any) -> None:
        """Run `step(*args, error)` as the block ends, `error` being the exception in flight
        (or None); a true result swallows it."""
        self.steps.append((step, args, True))

    def __enter__(self) -> Releases:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: types.TracebackType | None,
    ) -> bool:
        pending = error
        steps = self.steps
        while steps:
            step, args, sees_error = steps.pop()
            try:
                if sees_error:
                    if step(*args, pending):
                        pending = None
                else:
                    step(*args)
            except BaseException as raised:  # noqa: BLE001 - the next steps still run
                if pending is not None and raised is not pending:
                    raised.__context__ = pending
                pending = raised
        if pending is None:
            return error is not None  # swallowed by a step
        if pending is error:
            return False
        raise pending
