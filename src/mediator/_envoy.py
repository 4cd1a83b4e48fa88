"""Envoys: the user's handle on each module, and `Model`, the handle on the whole network.

An Envoy mirrors one submodule (children by attribute, index or name) and turns `.output`,
`.output = v`, `.inputs`, `.input` and `.skip(v)` into requests of the calling thread's
mediator. Anything else falls through to the wrapped module (`model.config`), and calling an
Envoy calls its module plainly, without interventions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, overload

from torch import nn

from ._batcher import Batcher
from ._default_batcher import default_batcher
from ._edits import Editor
from ._errors import UsageError
from ._interventions import Interventions
from ._mediator import Mediator
from ._names import closest_hint
from ._operation_envoy import SourceEnvoy, source_envoy
from ._operations import module_source
from ._protocol import Key
from ._renames import Renames
from ._traced import Traced
from ._tracer import Tracer
from ._tree import tensors

_API = ("output", "input", "inputs", "path")


class Envoy(Interventions):
    """A proxy for one module of a `Model`: `model.layers[0].mlp` is the Envoy of that module.

    Envoys mirror the module tree: a child by attribute (`model.layers`), by position
    (`model.layers[0]`) or by name (`model["layers"]`); `len()` and iteration work for
    `ModuleList` and `Sequential`. Inside an invoke body, `.output`, `.inputs`, `.input` and
    `.skip(v)` read and change what the module computes for that invoke's rows. Every other
    attribute is the wrapped module's own (`model.config`, `model.layers[0].weight`), and calling
    an Envoy calls its module plainly. A misspelled child raises `AttributeError` naming the
    closest real ones.

    Example:

        model = mediator.Model(net)
        block = model.layers[0]             # an Envoy; block.path == "layers.0"
        for layer in model.layers:          # one Envoy per child, in order
            print(layer.path, layer.weight.shape)
        with model.trace(x):
            h = block.output
    """

    _module: nn.Module
    _plain: nn.Module
    _path: str
    _model: Model
    _site: int | None
    _children: dict[str, Envoy]
    _items: tuple[Envoy, ...]
    _aliases: Mapping[str, nn.Module]
    _aliased: bool

    def __init__(self, module: nn.Module, path: str, model: Model) -> None:
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_aliases", {})
        self._point_at(module)

    def _point_at(self, module: nn.Module) -> None:
        """Address `module` (and its children) from now on. Called again when the model's
        modules are replaced by others of the same tree (`LanguageModel` loading its weights):
        children and aliases keep their Envoys by name, so Envoys the user holds follow; new
        children get new Envoys, and those gone are dropped. The model's `_traced` must be the
        new one."""
        model, path, before = self._model, self._path, self._children
        aliased = {name: self.__dict__[name] for name in self._aliases if name in self.__dict__}
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_plain", module)  # what a plain call calls
        site = model._traced.sites.get(id(module))
        object.__setattr__(self, "_site", site)
        object.__setattr__(self, "_aliases", model._traced.renames.of(module))
        # reached through an alias: requests tell the mediator the name to use in errors
        object.__setattr__(self, "_aliased", site is not None and model._traced.paths[site] != path)
        made: dict[int, Envoy] = {}  # a module registered twice is one Envoy, at its first path
        children: dict[str, Envoy] = {}
        for name, child in module._modules.items():
            if child is not None:
                if id(child) not in made:
                    envoy = before.get(name)
                    if envoy is None:
                        envoy = Envoy(child, f"{path}.{name}" if path else name, model)
                    else:
                        envoy._point_at(child)
                    made[id(child)] = envoy
                children[name] = made[id(child)]
        for name in [*before, *aliased]:
            self.__dict__.pop(name, None)
        object.__setattr__(self, "_children", children)
        object.__setattr__(self, "_items", tuple(children.values()))
        for name, envoy in children.items():
            if not hasattr(type(self), name):  # the Envoy API keeps precedence over children
                self.__dict__[name] = envoy  # found by plain lookup, without __getattr__
        for name, envoy in aliased.items():
            if name in self._aliases:
                envoy._point_at(self._aliases[name])
                self.__dict__[name] = envoy

    # -- the module tree ------------------------------------------------------------------

    @property
    def path(self) -> str:
        """The module's path in the model, e.g. `"layers.0.mlp"` (the root's is `""`).

        It is the name `net.named_modules()` gives the module, and the key a `tr.cache()` uses.

        Example:

            model.layers[0].mlp.path        # "layers.0.mlp"
            model.path                      # ""
        """
        return self._path

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            f"{self._label()} is an Envoy of a mediator Model: it cannot be copied or pickled, "
            "as it holds the threads and taps of its traces. Copy or save the torch module "
            "instead (copy.deepcopy(net), net.save_pretrained(...)) and wrap the copy in a new "
            "mediator.Model or mediator.LanguageModel; for a variant with other interventions, "
            "use model.edit()"
        )

    def __getattr__(self, name: str) -> Any:
        children = self.__dict__["_children"]
        if name in children:
            return children[name]
        if name in self.__dict__["_aliases"]:
            return self._alias(name)
        module = self.__dict__["_module"]
        try:
            return getattr(module, name)
        except AttributeError:
            pass
        error = AttributeError(self._unknown(name))
        error.name = None  # no second "Did you mean" from Python
        raise error from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _API or name in type(self).__dict__:
            object.__setattr__(self, name, value)
        else:
            setattr(self._module, name, value)

    @overload
    def __getitem__(self, key: int | str) -> Envoy: ...

    @overload
    def __getitem__(self, key: slice) -> tuple[Envoy, ...]: ...

    def __getitem__(self, key: int | str | slice) -> Envoy | tuple[Envoy, ...]:
        """A child by position (`model.layers[0]`, negative too) or by name (`block["output"]`,
        also for children whose names clash with the Envoy API); a slice gives a tuple of them.

        An unknown name raises `KeyError` naming the closest real children; a position out of
        range raises `IndexError`.

        Example:

            first, last = model.layers[0], model.layers[-1]
            early = model.layers[:2]        # a tuple of the first two Envoys
            proj = block["output"]          # a child named "output", not the block's .output
        """
        children = self._children
        if isinstance(key, str):
            if key in self._aliases:
                return getattr(self, key)  # type: ignore[no-any-return]
            if key not in children:
                raise KeyError(self._unknown(key))
            return children[key]
        items = self._items
        try:
            return items[key]
        except IndexError:
            raise IndexError(
                f"{self._label()} has {len(items)} children; index {key} is out of range"
            ) from None

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Envoy]:
        return iter(self._items)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the module plainly: no interventions, not counted as one of the model's calls.

        Inside a body this runs the module on any value you give it, for example the model's own
        head on an intermediate value (the logit lens); the trace does not see this call.

        Example:

            with model.trace(input_ids):
                h = model.layers[0].output
                lens = model.lm_head(model.ln_f(h))   # logits as if the model ended at layer 0
        """
        return self._plain(*args, **kwargs)

    def __repr__(self) -> str:
        return repr(self._module)

    def __dir__(self) -> list[str]:
        names = set(super().__dir__()) | set(self._children) | set(self._aliases)
        return sorted(names | set(dir(self._module)))

    def _alias(self, name: str) -> Envoy:
        """The Envoy of alias child `name`: the same module, under the path the user wrote.
        Built on first use and then found by plain attribute lookup."""
        path = f"{self._path}.{name}" if self._path else name
        envoy = Envoy(self._aliases[name], path, self._model)
        self.__dict__[name] = envoy
        return envoy

    def _label(self) -> str:
        return f"model.{self._path}" if self._path else "model"

    def _unknown(self, name: str) -> str:
        module = self._module
        known = [*self._children, *self._aliases, *module._parameters, *module._buffers]
        known += [n for n in vars(module) if not n.startswith("_")]
        hint = closest_hint(name, known, question=True)
        children = ", ".join(self._children) or "none"
        aliases = f"; its aliases: {', '.join(self._aliases)}" if self._aliases else ""
        return (
            f"{self._label()} ({type(self._module).__name__}) has no child or attribute "
            f"{name!r}.{hint} Its children: {children}{aliases}"
        )

    # -- interventions ------------------------------------------------------------------------

    def _request(self, what: str, kind: int) -> tuple[Mediator, Key]:
        mediator = self._mediator(what)
        site = self._site
        if site is None and type(self._module).__name__ == "OptimizedModule":
            raise UsageError(
                f"{self._label()} is a torch.compile() wrapper inside the traced model, whose "
                "compiled graph cannot stop to hand values to a body. Compile the whole model "
                f"instead (mediator.Model(torch.compile(net))), or compile the submodule in "
                "place (submodule.compile()), which traces run eagerly"
            )
        if site is None:
            raise UsageError(
                f"{self._label()} is a {type(self._module).__name__} that the model never calls "
                "itself; use one of its children, e.g. "
                f"{self._label()}[0].{what}"
            )
        if self._aliased or mediator.spelled:
            mediator.spelled[site] = self._path  # errors name the module as the body did
        return mediator, (site, kind, mediator.step)

    # -- operations inside the forward --------------------------------------------------------

    @property
    def source(self) -> SourceEnvoy:
        """The operations inside the module's `forward`: each call it makes, by name.

        `print(envoy.source)` shows the forward's source, each line followed by the names of
        the calls it makes: the called name and a number in source order (`softmax_0`,
        `o_proj_0`, `transpose_2`). `envoy.source.<name>` then has `.output`, `.input`,
        `.inputs` and `.skip(v)` like a module, and `.source` of its own for the function it
        calls. The forward is rewritten the first time `.source` is used, and the rewrite runs
        only inside traces: plain calls run the module's own forward. A forward without Python
        source raises `SourceUnavailableError`.

        Example:

            attention = model.layers[0].self_attn
            print(attention.source)             # the forward, its calls named
            with model.trace(input_ids):
                weights = attention.source.attention_interface_0.output[1]
                attention.source.o_proj_0.input[:, :, :8] = 0   # ablate head 0
        """
        site = self._site
        if site is None:
            raise UsageError(
                f"{self._label()} is a {type(self._module).__name__} that the model never calls "
                "itself: its forward has no operations to reach"
            )
        return source_envoy(module_source(self._model._traced, site, self._path), self._model)


class Model(Envoy):
    """Wraps any `torch.nn.Module` for tracing. The module is not copied and not changed.

    The `Model` is the Envoy of the root module: children, `.output` and plain calls work as on
    any Envoy, and `trace` and `generate` open traces. `net` itself stays usable and computes
    what it did before. `batcher` chooses how several invokes are batched into one forward pass
    (by default `CausalLMBatcher` for language models that have `generate` and a `config`, else
    `Batcher`); `pin_threads=False` stops a trace from keeping its threads on the caller's CPU.

    `rename` gives modules aliases beside their real names; both address the same module, and
    errors and `tr.cache()` keys use the name a body wrote. A key with dots is a module's path
    from the root and its alias a path from the root (`{"transformer.h": "layers"}`: then
    `model.layers[0]` is `model.transformer.h[0]`); a key without dots is a child's name, and
    every child so named gets the alias (one name) beside it (`{"attn": "self_attn"}`). An alias
    that names no module or clashes with an existing attribute is a `UsageError`.
    `mediator.standard_renames(net)` gives the standard names of Hugging Face language models.

    A compiled module works too. `Model(torch.compile(net))` has the paths of `net`, and plain
    calls (`model(x)`) run the compiled code; traces run the module eagerly, since interventions
    run in Python between its modules, and leave dynamo's caches as they were, so that plain calls
    after a trace run the compiled code again (also for `net.compile()`).

    Example:

        import torch, mediator

        model = mediator.Model(net)
        y = model(x)                        # a plain call: the same as net(x)
        with model.trace(x):
            h = model.layers[1].output
            model.layers[1].output = h * 2
            logits = model.output
        model = mediator.Model(gpt2, rename={"transformer.h": "layers", "attn": "self_attn"})
        model.layers[0].self_attn                   # the Envoy of transformer.h.0.attn
    """

    _traced: Traced

    def __init__(
        self,
        module: nn.Module,
        *,
        rename: Mapping[str, str] | None = None,
        batcher: Batcher | None = None,
        pin_threads: bool = True,
    ) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"mediator.Model wraps a torch.nn.Module, got {type(module).__name__}")
        plain, module = module, _uncompiled(module)
        renames = Renames(module, rename, frozenset(dir(type(self))))
        traced = Traced.of(module, batcher or default_batcher(module), pin_threads, renames)
        object.__setattr__(self, "_traced", traced)
        object.__setattr__(self, "_edits", [])  # (fn, args, kwargs) run first in every trace
        super().__init__(module, "", self)
        object.__setattr__(self, "_plain", plain)

    def __repr__(self) -> str:
        return repr(self._module) + self._traced.renames.summary()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model: plainly (the same as the module), or, when it has edits, as a
        trace that applies them (keyword arguments that hold no tensor are call options).

        Example:

            y = model(x)                        # net(x)
            edited = model.edit().run(silence)
            y = edited(x)                       # net(x) with the edit applied
        """
        if not self._edits:
            return self._plain(*args, **kwargs)
        inputs = {key: value for key, value in kwargs.items() if tensors(value)}
        options = {key: value for key, value in kwargs.items() if key not in inputs}
        tracer = Tracer(self, self._traced, (), options)
        with tracer:
            tracer.invoke(*args, **inputs).run(_nothing)
        return tracer.result

    def edit(self, *, inplace: bool = False) -> Editor:
        """Record a persistent intervention: `with model.edit() as edited:` (or
        `model.edit().run(fn, *args)`). The body runs first in every trace, generation and
        call of `edited`, on every row, before the trace's own invokes; as any body, its
        requests target step 0 (in generation, the pass over the prompt). `edited` is a new
        `Model` of the same module, with this Model's edits and the new one; the module and
        this Model are untouched. `inplace=True` adds the edit to this Model instead.

        Example:

            with model.edit() as edited:
                model.layers[0].output[:] = 0
            with edited.trace(x):
                h = edited.layers[1].output         # after layers.0 was zeroed
            model.edit(inplace=True).run(silence)   # now `model` itself applies `silence`
            model.clear_edits()
        """
        return Editor(self, inplace)

    def clear_edits(self) -> None:
        """Remove every edit of this Model (Models made from it keep theirs).

        Example:

            model.clear_edits()
            y = model(x)                            # a plain call again
        """
        self._edits.clear()

    def _copy(self) -> Model:
        """A Model of the same module and sites, with a copy of this one's edits."""
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        object.__setattr__(copy, "_edits", list(self._edits))
        return copy

    def trace(self, *args: Any, **kwargs: Any) -> Tracer:
        """A trace: with inputs, its with-body is the single invoke; without, it holds
        `tr.invoke(...)` blocks. All invokes run in one batched forward pass.

        Positional and tensor keyword arguments are the inputs of the module's forward. Given no
        inputs, other keyword arguments are options passed to the forward of the batched call.
        Names bound in the bodies are bound in your scope after the block.

        Example:

            with model.trace(x):                    # x is the input; the body is the invoke
                h = model.layers[1].output

            with model.trace() as tr:               # several invokes, one forward pass
                with tr.invoke(clean):
                    clean_h = model.layers[3].output
                with tr.invoke(corrupt):
                    model.layers[3].output = clean_h
                    patched = model.output
        """
        return Tracer(self, self._traced, args, kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Tracer:
        """A trace of the module's own `generate` (Hugging Face style). Step 0 is the forward
        pass over the prompt, which gives the first new token; step k is the next pass, which
        gives new token k + 1. Loop over them with `tr.iter[...]`. Options such as
        `max_new_tokens` go to `generate`.

        `tr.result` is what `generate` returned. A module without `generate` raises
        `UsageError`.

        Example:

            with model.generate(input_ids, max_new_tokens=5) as tr:
                logits = []
                for step in tr.iter[:]:
                    logits.append(model.lm_head.output)
            tokens = tr.result
        """
        if not callable(getattr(self._module, "generate", None)):
            raise UsageError(
                f"{type(self._module).__name__} has no generate() method; use model.trace(...) "
                "for a forward pass"
            )
        return Tracer(self, self._traced, args, kwargs, method="generate")


def _nothing() -> None:
    """The body of a plain call of an edited model: the edits do the work."""


def _uncompiled(module: nn.Module) -> nn.Module:
    """The module that a `torch.compile(net)` wrapper compiles (`net`), else `module` itself."""
    while type(module).__name__ == "OptimizedModule":
        from torch._dynamo.eval_frame import OptimizedModule  # loaded already: it made `module`

        if not isinstance(module, OptimizedModule):
            return module
        module = module._orig_mod
    return module
