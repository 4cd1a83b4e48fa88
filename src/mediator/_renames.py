"""Aliases (`Model(net, rename={...})`): other names for a model's modules, beside the real ones.

The rule for each `key: alias` pair, applied in order:

- A key with dots is a module's path from the root (it may go through aliases given before it),
  and the alias is the new path from the root: `{"transformer.h": "layers"}` makes
  `model.layers` the same module as `model.transformer.h`. An alias with dots attaches under an
  existing module (`{"model.decoder.layers": "decoder.blocks"}`).
- A key without dots is a child's name: every child so named, anywhere in the tree, gets the
  alias (one name, no dots) beside it in its parent: `{"attn": "self_attn"}` makes
  `model.transformer.h[0].self_attn` the same module as `model.transformer.h[0].attn`.

An alias that names no module, has no parent, is not a public identifier or clashes with an
attribute the parent (or its Envoy) already has is a `UsageError` when the Model is built.
`Renames` owns the resolved table, parent module -> alias -> child module, built once and not
changed after; Envoys read it when they are built, so aliases cost nothing while a model runs.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from ._errors import UsageError
from ._names import closest_hint

_NONE: Mapping[str, nn.Module] = {}


class Renames:
    """The aliases of one model: `of(parent)` gives a module's alias children, `find(path)`
    resolves a path written with real names, aliases or both."""

    def __init__(
        self, root: nn.Module, rename: Mapping[str, str] | None, reserved: frozenset[str]
    ) -> None:
        self.root = root
        self.by_parent: dict[int, dict[str, nn.Module]] = {}
        self.rules: list[tuple[str, str, int]] = []  # (key, alias, modules renamed)
        self._reserved = reserved  # names an Envoy has itself: `output`, `trace`, ...
        if rename is not None and not isinstance(rename, Mapping):
            raise UsageError(
                f"rename= takes a dict of path or name -> alias, got {type(rename).__name__}"
            )
        for key, alias in (rename or {}).items():
            if not isinstance(key, str) or not isinstance(alias, str) or not key or not alias:
                raise UsageError(
                    f"rename= maps module paths or names to aliases, all non-empty strings; "
                    f"got {key!r}: {alias!r}"
                )
            renamed = self._path_rule(key, alias) if "." in key else self._name_rule(key, alias)
            self.rules.append((key, alias, renamed))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def of(self, parent: nn.Module) -> Mapping[str, nn.Module]:
        """The alias children of `parent` (alias -> module); empty for most modules."""
        return self.by_parent.get(id(parent), _NONE)

    def find(self, path: str) -> nn.Module | None:
        """The module at `path` ("" is the root), whose parts are real names or aliases."""
        module: nn.Module | None = self.root
        for part in path.split(".") if path else ():
            assert module is not None
            child = module._modules.get(part)
            module = child if child is not None else self.of(module).get(part)
            if module is None:
                return None
        return module

    def summary(self) -> str:
        """The aliases as lines for `print(model)` (empty without any)."""
        if not self.rules:
            return ""
        lines = []
        for key, alias, renamed in self.rules:
            if "." in key:
                lines.append(f"  {alias} -> {key}")
            else:
                lines.append(f"  *.{alias} -> *.{key} ({renamed} modules)")
        return "\nAliases (both names address the same module):\n" + "\n".join(lines)

    # -- building ---------------------------------------------------------------------------

    def _path_rule(self, key: str, alias: str) -> int:
        target = self.find(key)
        if target is None:
            known = [path for path, _ in self.root.named_modules()]
            hint = closest_hint(key, known, question=True)
            raise UsageError(
                f"rename {key!r} -> {alias!r}: the model ({type(self.root).__name__}) has no "
                f"module {key!r}.{hint} A key with dots is a module's path from the root"
            )
        parent_path, _, name = alias.rpartition(".")
        parent = self.find(parent_path)
        if parent is None:
            raise UsageError(
                f"rename {key!r} -> {alias!r}: the alias's parent {parent_path!r} is no module "
                "of the model; an alias with dots is a path from the root whose parent exists"
            )
        self._add(parent, parent_path, name, target, f"{key!r} -> {alias!r}")
        return 1

    def _name_rule(self, key: str, alias: str) -> int:
        if "." in alias:
            raise UsageError(
                f"rename {key!r} -> {alias!r}: a key without dots renames every child named "
                f"{key!r}, beside it in its parent, so its alias must be one name (no dots); "
                "to give a module a path from the root, use its full path as the key"
            )
        parents = {
            id(parent): (path, parent)
            for path, parent in self.root.named_modules()
            if parent._modules.get(key) is not None
        }
        if not parents:
            names = {name for _, m in self.root.named_modules() for name in m._modules}
            hint = closest_hint(key, names, question=True)
            raise UsageError(
                f"rename {key!r} -> {alias!r}: no module of the model ({type(self.root).__name__}) "
                f"has a child named {key!r}.{hint} A key without dots is a child's name"
            )
        for path, parent in parents.values():
            child = parent._modules[key]
            assert child is not None
            self._add(parent, path, alias, child, f"{key!r} -> {alias!r}")
        return len(parents)

    def _add(self, parent: nn.Module, path: str, name: str, child: nn.Module, rule: str) -> None:
        where = f"model.{path}" if path else "the model"
        if not name.isidentifier() or name.startswith("_"):
            raise UsageError(
                f"rename {rule}: an alias must be a public Python identifier (no leading "
                f"underscore), got {name!r}"
            )
        aliases = self.by_parent.setdefault(id(parent), {})
        if aliases.get(name, child) is not child:
            raise UsageError(
                f"rename {rule}: {where} already has an alias {name!r} for another module; "
                "give each alias one module"
            )
        if name in parent._modules or hasattr(parent, name) or name in self._reserved:
            raise UsageError(
                f"rename {rule}: {where} ({type(parent).__name__}) already has an attribute "
                f"{name!r}; an alias must be a new name, pick another one"
            )
        aliases[name] = child
