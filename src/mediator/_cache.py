"""`tr.cache(...)`: record module outputs (and inputs) as the rest of the forward sees them.

A cache is opened in a trace's block (whole batch) or inside an invoke body (that invoke's
rows). From then on, at every call of a cached module, the value after all interventions at that
boundary is appended under the module's path, one entry per call. It keeps references (views),
never copies, and nothing after the trace but what the user's names reach.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import Any


class Cache(Mapping[str, list[Any]]):
    """Outputs by module path, one entry per call: `cache["layers.0"][0]`. With
    `inputs=True`, `cache.inputs[path]` holds `(args, kwargs)` per call too.

    What `tr.cache(...)` returns. It is a read-only mapping (`in`, `keys()`, `items()`,
    `len()`) over the modules that have been called since it was opened; the values are the
    ones the rest of the forward saw, after every intervention.

    Example:

        with model.generate(input_ids, max_new_tokens=3) as tr:
            cache = tr.cache(modules=["lm_head"])
        len(cache["lm_head"])                   # 3: one entry per forward pass
        for path, outputs in cache.items():
            print(path, [tuple(o.shape) for o in outputs])
    """

    def __init__(self, paths: dict[int, str], rows: slice | None, inputs: bool) -> None:
        self.paths = paths  # site -> path, for the modules this cache records
        self.rows = rows
        self.record_inputs = inputs
        self.outputs: dict[str, list[Any]] = {}
        self.inputs: dict[str, list[Any]] = {}

    def __getitem__(self, path: str) -> list[Any]:
        """The recorded outputs of the module at `path`, one per call, in call order.

        A path this cache does not record raises `KeyError` naming the closest ones; so does a
        recorded module that was not called after the cache was opened.

        Example:

            first = cache["layers.0"][0]            # the output of layers.0's first call
        """
        if path in self.outputs:
            return self.outputs[path]
        known = list(self.paths.values())
        if path in known:
            raise KeyError(f"{path!r} is cached but was not called after the cache was opened")
        close = difflib.get_close_matches(path, known, n=3, cutoff=0.5)
        hint = f" Closest: {', '.join(map(repr, close))}." if close else ""
        raise KeyError(f"{path!r} is not a module this cache records.{hint}")

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)

    def __repr__(self) -> str:
        calls = ", ".join(f"{path}: {len(values)}" for path, values in self.outputs.items())
        return f"Cache({{{calls}}})"

    def record(self, site: int, output: bool, value: Any) -> None:
        """Append `value` (already narrowed to this cache's rows) for `site`.

        The trace calls this at every boundary of a cached module; it is not meant to be called
        by users. `output` says whether `value` is an output or an `(args, kwargs)` input.

        Example:

            cache.record(site, True, output)            # cache[path] gets one more entry
        """
        path = self.paths[site]
        (self.outputs if output else self.inputs).setdefault(path, []).append(value)
