"""What a trace needs to know about its model: the module, the sites it taps, the batcher.

`Model` builds one `Traced` when it wraps a module and hands it to every trace it opens, so a
trace never reaches into the Model itself. Site numbers index `paths` and `taps`; a module
registered under several names is one site (its first path); `dims` says where each site's
values hold the batch (`_layouts.py`), decided once here; `renames` holds the aliases of its
modules (`_renames.py`). The modules are the first `len(taps)` sites. Later sites are
operations inside a forward (`envoy.source`, `_operations.py`): `add_site` appends them, under
`_SITES_LOCK`, when the user first names one, possibly while a trace runs (its Interleaver then
grows its per-site counts, see `Interleaver.grow`); `sources` holds the rewritten forward of
each module site that has one. Nothing else changes after the object is built, except that a
tap replaced behind the library's back is re-made in `taps` (`_tap.py`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ._batcher import Batcher
from ._layouts import Dims, check_overrides, site_dims
from ._renames import Renames
from ._tap import Tap

_SITES_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class Traced:
    """A wrapped module's sites (modules with a `forward` of their own), in tree order."""

    module: nn.Module
    paths: list[str]  # site -> path ("" for the root)
    taps: list[Tap]  # module site -> its tap
    sites: dict[int, int]  # id(module) -> site
    batcher: Batcher
    pin_threads: bool
    dims: tuple[list[Dims], list[Dims]]  # INPUT/OUTPUT -> site -> where its values' rows are
    renames: Renames  # the aliases of its modules (`Model(net, rename=...)`)
    sources: dict[int, Any] = field(default_factory=dict)  # module site -> its `.source`

    @classmethod
    def of(
        cls, module: nn.Module, batcher: Batcher, pin_threads: bool, renames: Renames | None = None
    ) -> Traced:
        """Find the sites of `module`; `renames` are its aliases (none by default)."""
        paths: list[str] = []
        taps: list[Tap] = []
        sites: dict[int, int] = {}
        for path, sub in module.named_modules():
            if id(sub) in sites or type(sub).forward is nn.Module.forward:
                continue
            sites[id(sub)] = len(paths)
            paths.append(path)
            taps.append(Tap(sub))
        check_overrides(batcher.batch_dims, paths)
        layouts = {path: batcher.layout(path, sub) for path, sub in module.named_modules()}
        dims = site_dims(module, paths, layouts)
        renames = Renames(module, None, frozenset()) if renames is None else renames
        return cls(module, paths, taps, sites, batcher, pin_threads, dims, renames)

    def site_at(self, path: str) -> int | None:
        """The site of the module at `path`, written with real names, aliases or both."""
        found = self.renames.find(path)
        return None if found is None else self.sites.get(id(found))

    def real_path(self, path: str) -> str | None:
        """The path of the site at `path` (which may use aliases), if there is one."""
        site = self.site_at(path)
        return None if site is None else self.paths[site]

    def add_site(self, path: str) -> int:
        """A new site (an operation inside a forward) at `path`; its values hold the batch
        where the default rule says. Returns its number."""
        with _SITES_LOCK:
            self.dims[0].append(None)
            self.dims[1].append(None)
            self.paths.append(path)
            return len(self.paths) - 1
