"""Suggestions for a name that does not exist: the closest real ones, phrased for a message.

This module owns no state.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest_hint(name: str, known: Iterable[str], question: bool = False) -> str:
    """The up to three `known` names closest to `name` as the end of a message
    (`" Closest: 'a', 'b'."`, or `" Did you mean: 'a'?"` with `question`); empty if none is."""
    close = difflib.get_close_matches(name, [k for k in known if k], n=3, cutoff=0.5)
    if not close:
        return ""
    names = ", ".join(map(repr, close))
    return f" Did you mean: {names}?" if question else f" Closest: {names}."
