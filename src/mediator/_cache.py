"""`tr.cache(...)`: record module outputs (and inputs) as the rest of the forward sees them.

A cache is opened in a trace's block (whole batch) or inside an invoke body (that invoke's
rows). From then on, at every call of a cached module, the value after all interventions at that
boundary is appended under the module's path, one entry per call. It keeps references (views),
never copies, and nothing after the trace but what the user's names reach.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ._names import closest_hint

RealPath = Callable[[str], "str | None"]  # a path written with aliases -> the module's real path


class _Calls(Mapping[str, list[Any]]):
    """Recorded values by module path, one list per module, one entry per call; a path that is
    not there is explained (closest recorded paths, or why nothing is recorded)."""

    def __init__(
        self, paths: dict[int, str], what: str, real_path: RealPath, missing: str = ""
    ) -> None:
        self.paths = paths  # site -> path, for the modules the cache records
        self.real_path = real_path  # a path written with aliases -> the real one
        self.recorded: dict[str, list[Any]] = {}
        self._what = what  # "outputs" or "inputs", for errors
        self._missing = missing  # why nothing at all is recorded, if so

    def __getitem__(self, path: str) -> list[Any]:
        if path in self.recorded:
            return self.recorded[path]
        real = self.real_path(path)
        if real is not None and real in self.recorded:  # an alias of a module recorded
            return self.recorded[real]
        if self._missing:
            raise KeyError(f"{path!r}: {self._missing}")
        known = list(self.paths.values())
        if path in known:
            raise KeyError(f"{path!r} is cached but was not called after the cache was opened")
        hint = closest_hint(path, known)
        raise KeyError(f"{path!r} is not a module whose {self._what} this cache records.{hint}")

    def __iter__(self) -> Iterator[str]:
        return iter(self.recorded)

    def __len__(self) -> int:
        return len(self.recorded)

    def __repr__(self) -> str:
        calls = ", ".join(f"{path}: {len(values)}" for path, values in self.recorded.items())
        return f"{{{calls}}}"


class Cache(Mapping[str, list[Any]]):
    """Outputs by module path, one entry per call: `cache["layers.0"]`. With `inputs=True`,
    `cache.inputs[path]` holds `(args, kwargs)` per call too.

    What `tr.cache(...)` returns. It is a read-only mapping (`in`, `keys()`, `items()`,
    `len()`) over the modules that have been called since it was opened; the values are the
    ones the rest of the forward saw, after every intervention. `cache.inputs` is the same kind
    of mapping; a path either one lacks raises `KeyError` naming the closest recorded ones.
    Values are kept under the paths given to `tr.cache(modules=...)`, aliases included, else
    under the real paths; a module's alias finds them too (`cache["layers.0"]` for
    `transformer.h.0`).

    Example:

        with model.generate(input_ids, max_new_tokens=3) as tr:
            cache = tr.cache(modules=["lm_head"])
        len(cache["lm_head"])                   # 3: one entry per forward pass
        for path, outputs in cache.items():
            print(path, [tuple(o.shape) for o in outputs])
    """

    def __init__(
        self,
        paths: dict[int, str],
        rows: slice | None,
        inputs: bool,
        real_path: RealPath = lambda path: None,
    ) -> None:
        self.paths = paths  # site -> path, for the modules this cache records
        self.rows = rows
        self.record_inputs = inputs
        self.outputs = _Calls(paths, "outputs", real_path)
        missing = "" if inputs else "this cache records no inputs: open it with inputs=True"
        self.inputs = _Calls(paths, "inputs", real_path, missing)

    def __getitem__(self, path: str) -> list[Any]:
        """The recorded outputs of the module at `path`, one per call, in call order.

        A path this cache does not record raises `KeyError` naming the closest ones; so does a
        recorded module that was not called after the cache was opened.

        Example:

            first = cache["layers.0"][0]            # the output of layers.0's first call
        """
        return self.outputs[path]

    def __iter__(self) -> Iterator[str]:
        return iter(self.outputs)

    def __len__(self) -> int:
        return len(self.outputs)

    def __repr__(self) -> str:
        return f"Cache({self.outputs!r})"

    def record(self, site: int, output: bool, value: Any) -> None:
        """Append `value` (already narrowed to this cache's rows) for `site`.

        The trace calls this at every boundary of a cached module; it is not meant to be called
        by users. `output` says whether `value` is an output or an `(args, kwargs)` input.

        Example:

            cache.record(site, True, output)            # cache[path] gets one more entry
        """
        calls = self.outputs if output else self.inputs
        calls.recorded.setdefault(self.paths[site], []).append(value)
