"""`tr.iter[...]`: loops over the steps of a trace (call numbers of every module).

While a loop body runs, the mediator's `step` is the loop's step, so every request targets that
call of its module; when the loop ends, for any reason, it is 0 again. An open loop (`[a:]`)
waits for each next step (a STEP request) and ends when the traced call returns. The only state
is the mediator's `step`, and its `loop_ended` once an open loop ended.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from ._protocol import LoopEnd

if TYPE_CHECKING:
    from ._mediator import Mediator


class Steps:
    """`tr.iter`: index it with a step, a slice or a list of steps to loop over them.

    Example:

        with model.generate(input_ids, max_new_tokens=5) as tr:
            for step in tr.iter[1:4]:               # steps 1, 2 and 3
                model.layers[0].output[:, -1] += steer
    """

    def __init__(self, mediator: Mediator) -> None:
        self._mediator = mediator

    def __getitem__(self, selection: int | slice | list[int] | tuple[int, ...]) -> Iterator[int]:
        """An iterator over the selected steps: `[i]`, `[a:b]`, `[a:b:s]`, `[a:]` (open: until
        the traced call returns) or `[[i, j, ...]]`. Steps count up from 0; while the loop body
        runs, requests target step `step`, and step 0 again once the loop has ended.

        Example:

            outputs = []
            for step in tr.iter[[0, 3]]:            # inside an invoke body
                outputs.append(model.layers[0].output)
        """
        mediator = self._mediator
        if isinstance(selection, slice):
            start, stop = selection.start or 0, selection.stop
            stride = 1 if selection.step is None else selection.step
            if start < 0 or stride < 1 or (stop is not None and stop < 0):
                raise ValueError(f"tr.iter[{start}:{stop}:{stride}]: steps count up from 0")
            if stop is None:
                return _open_loop(mediator, start, stride)
            steps: list[int] = list(range(start, stop, stride))
        elif isinstance(selection, int):
            steps = [selection]
        else:
            steps = [int(step) for step in selection]
        if any(step < 0 for step in steps):
            raise ValueError(f"tr.iter[{selection!r}]: steps count up from 0")
        return _bounded_loop(mediator, steps)


def _bounded_loop(mediator: Mediator, steps: list[int]) -> Iterator[int]:
    try:
        for step in steps:
            mediator.step = step
            yield step
    finally:
        mediator.step = 0


def _open_loop(mediator: Mediator, start: int, stride: int) -> Iterator[int]:
    step = start
    try:
        while True:
            if step > 0:
                try:
                    mediator.wait_for_step(step)
                except LoopEnd:
                    mediator.loop_ended = True  # for the error of a request after the loop
                    return
            mediator.step = step
            yield step
            step += stride
    finally:
        mediator.step = 0
