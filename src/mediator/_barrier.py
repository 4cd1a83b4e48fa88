"""`tr.barrier(n)`: a meeting point for the bodies of one trace.

A Barrier's state is the list of mediators that arrived and wait; the interleaver releases them
(in definition order) once `parties` have arrived, or fails them when the forward pass ends
first. Only the thread holding the baton touches that list.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import _context

if TYPE_CHECKING:
    from ._mediator import Mediator


@dataclass(eq=False)
class Barrier:
    """`tr.barrier(n)`: calling it blocks a body until `n` bodies have called it.

    Invokes are served in the order they are defined, and a body waits for a name an earlier
    invoke has not bound yet, which covers most exchanges between invokes. A barrier is for the
    rest: a body that needs something another invoke does later, such as an entry that invoke
    puts into a shared dict. The bodies are released in definition order. A barrier that fewer
    than `n` bodies reach before the forward pass ends raises `MediatorError`.

    Example:

        with model.trace() as tr:
            both = tr.barrier(2)
            norms = {}
            with tr.invoke(x1):
                norms[0] = model.layers[1].output.norm()
                both()                          # until the other invoke stored its norm too
                scale = norms[1] / norms[0]
                model.layers[2].output = model.layers[2].output * scale
            with tr.invoke(x2):
                norms[1] = model.layers[1].output.norm()
                both()
    """

    parties: int
    arrived: list[Mediator] = field(default_factory=list)

    def __call__(self) -> None:
        """Wait here until every party of the barrier has called it (inside a body only).

        Example:

            both = tr.barrier(2)
            with tr.invoke(x1):
                both()                      # waits for the other invoke's call
        """
        _context.require("a barrier").wait_at_barrier(self)
