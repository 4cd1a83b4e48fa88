"""`LanguageModel`: a Hugging Face causal language model by name or path, its weights loaded late.

Given a name or path, `LanguageModel` builds the module tree on the meta device from the config
(`_pretrained.py`), so it can be printed and its Envoys taken at once; the weights load on the
first `trace`, `generate` or plain call, or on `dispatch()`, and the Model (its `Traced` and every
Envoy, also those the user already holds) is pointed at the loaded module. `scan` runs a trace on
a fresh copy of the tree built on fake tensors: shapes and dtypes, no weights, no compute.
Inputs may be text and token lists (`_tokenized.py`).

State of each LanguageModel: its `Loading` (what is still to load, the lock that makes loading
happen once, and the Models that share the weights: it and the edited copies `edit()` made of
it), how to build the tree again for a scan, and the renames it gives the modules
(`_aliases.py`).
"""

from __future__ import annotations

import functools
import os
import threading
import types
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ._aliases import standard_renames
from ._causal_lm import CausalLMBatcher
from ._default_batcher import default_batcher
from ._envoy import Model
from ._errors import UsageError
from ._pretrained import (
    build_tree,
    input_device,
    load_config,
    load_tokenizer,
    load_weights,
    prepare_tokenizer,
)
from ._renames import Renames
from ._skips import fake_copy
from ._tokenized import TextBatcher
from ._traced import Traced
from ._tracer import Tracer

#: Builds the module tree again under a context: the meta device, or a `FakeTensorMode`.
TreeBuilder = Callable[[Any], nn.Module]


class Loading:
    """What a LanguageModel and the edited copies made of it share: the path and options still to
    load (None once loaded, or for a module passed in), the lock that loads them once, and the
    Models to point at the loaded module."""

    def __init__(self, pending: tuple[str, dict[str, Any]] | None) -> None:
        self.pending = pending
        self.lock = threading.Lock()
        self.models: weakref.WeakSet[LanguageModel] = weakref.WeakSet()


class LanguageModel(Model):
    """A causal language model by hub id or path, loaded when first used; or a module you loaded.

    `LanguageModel(name_or_path, tokenizer=None, rename=None, **from_pretrained_kwargs)` reads
    only the config: the module tree is built on the meta device (print it, take Envoys, `scan`
    shapes); the weights load on the first `trace`, `generate` or plain call, or on
    `lm.dispatch()`, with `AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)`, so
    every option of it applies (`dtype`, `device_map`, `attn_implementation`, `gguf_file`, ...).
    Envoys taken before then address the loaded modules after. A module passed instead is used
    as it is. `lm.tokenizer` is the tokenizer saved with the model unless you pass one (given a
    pad token if it has none).

    Inputs of `trace`, `invoke`, `generate` and `scan`: a string, a list of strings (one row
    each), token ids (a list of ints, a list of lists, a tensor), or a `BatchEncoding`/dict.
    Rows are left-padded, and each row computes what its prompt computes alone, also next to
    other invokes; `generate` also moves the padding of rows padded on the right (a
    tokenizer's default) to the left. `tr.result` of `generate` is the token ids. A plain
    call, `lm(...)`, takes the same inputs.

    Beside the real paths, the standard names of `mediator.standard_renames` address the same
    modules (`lm.layers[3].self_attn`); `rename` adds aliases of your own, as for `Model`. A key
    of yours that the standard names also use replaces their alias for it.

    Example:

        lm = mediator.LanguageModel("path/to/model", dtype=torch.bfloat16)  # nothing loaded
        layer = lm.model.layers[3]
        with lm.scan("The Eiffel Tower is in"):        # shapes, without loading
            shape = layer.output.shape
        with lm.trace() as tr:                         # loads the weights, then runs
            with tr.invoke(["Hello", "A much longer prompt"]):
                logits = lm.output.logits
        with lm.generate("Once upon a time", max_new_tokens=8) as tr:
            hidden = layer.output
        print(lm.tokenizer.batch_decode(tr.result))
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike[str] | nn.Module,
        tokenizer: Any = None,
        rename: dict[str, str] | None = None,
        **from_pretrained_kwargs: Any,
    ) -> None:
        missing = None
        if isinstance(name_or_path, nn.Module):
            if from_pretrained_kwargs:
                raise TypeError(
                    f"mediator.LanguageModel got a module and loading options "
                    f"({', '.join(sorted(from_pretrained_kwargs))}): a module is used as it is; "
                    "pass a name or path to load one with these options"
                )
            module, pending = name_or_path, None
            rebuild: TreeBuilder = functools.partial(_fake_twin, module)
            if tokenizer is None:
                tokenizer, missing = load_tokenizer(getattr(module, "name_or_path", ""), {})
        elif isinstance(name_or_path, (str, os.PathLike)):
            path, options = os.fspath(name_or_path), dict(from_pretrained_kwargs)
            rebuild = functools.partial(build_tree, load_config(path, options), options)
            module, pending = rebuild(torch.device("meta")), (path, options)
            if tokenizer is None:
                tokenizer, missing = load_tokenizer(path, options)
        else:
            raise TypeError(
                "mediator.LanguageModel takes a hub id, a path or a torch.nn.Module, got "
                f"{type(name_or_path).__name__}"
            )
        if tokenizer is not None:
            prepare_tokenizer(tokenizer)
        renames = {**standard_renames(module), **(rename or {})}
        batcher = _text_batcher(module, tokenizer, missing)
        super().__init__(module, rename=renames, batcher=batcher)
        loading = Loading(pending)
        loading.models.add(self)
        object.__setattr__(self, "_loading", loading)
        object.__setattr__(self, "_rebuild", rebuild)
        object.__setattr__(self, "_renames", renames)
        if pending is None:
            batcher.device = input_device(module)

    @property
    def tokenizer(self) -> Any:
        """The tokenizer that turns text inputs into token ids (None where there is none).

        Set it to use another one; it is given a pad token if it has none.

        Example:

            ids = lm.tokenizer("The Eiffel Tower is in").input_ids
            print(lm.tokenizer.batch_decode(tr.result))
        """
        return self._batcher.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: Any) -> None:
        if tokenizer is not None:
            prepare_tokenizer(tokenizer)
        batcher = self._batcher
        batcher.tokenizer, batcher.missing = tokenizer, "it was set to None"

    @property
    def _batcher(self) -> TextBatcher:
        batcher = self._traced.batcher
        assert isinstance(batcher, TextBatcher)
        return batcher

    @property
    def dispatched(self) -> bool:
        """Whether the weights are loaded (always true for a module passed in).

        Example:

            lm = mediator.LanguageModel("path/to/model")
            lm.dispatched                   # False: only the config was read
            lm.dispatch()
            lm.dispatched                   # True
        """
        return self._loading.pending is None

    def dispatch(self) -> None:
        """Load the weights now (once; later calls do nothing), with the options given to
        `LanguageModel`. The first trace, `generate` or plain call does it otherwise.

        Example:

            lm = mediator.LanguageModel("path/to/model", device_map="auto")
            lm.dispatch()                   # the weights are loaded here
        """
        loading = self._loading
        with loading.lock:
            if loading.pending is None:
                return
            loaded = load_weights(*loading.pending)
            traced = self._traced_of(loaded)
            models = list(loading.models)  # this one, the one it was copied from, its copies
            for model in models:  # first all: an Envoy reads its Model's `_traced`
                object.__setattr__(model, "_traced", traced)
            for model in models:
                model._point_at(loaded)
            self._batcher.device = input_device(loaded)
            loading.pending = None

    def _copy(self) -> LanguageModel:
        """A Model of the same module for `edit()`, which loads the weights with this one."""
        copy = super()._copy()
        assert isinstance(copy, LanguageModel)
        self._loading.models.add(copy)
        return copy

    def trace(self, *args: Any, **kwargs: Any) -> Tracer:
        """`Model.trace`, after loading the weights if they are not loaded yet.

        Example:

            with lm.trace("The Eiffel Tower is in"):
                logits = lm.output.logits
        """
        self.dispatch()
        return super().trace(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Tracer:
        """`Model.generate`, after loading the weights if they are not loaded yet; `tr.result`
        is the token ids, prompt included.

        Example:

            with lm.generate("Once upon a time", max_new_tokens=8) as tr:
                hidden = lm.model.layers[0].output
            print(lm.tokenizer.batch_decode(tr.result))
        """
        self.dispatch()
        return super().generate(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """A plain call of the model (no interventions but its edits), after loading the
        weights. It takes what a trace takes: text and token lists are tokenized and padded,
        each row computing what its prompt computes alone.

        Example:

            logits = lm(["Hello", "A much longer prompt"]).logits
        """
        self.dispatch()
        if not self._edits and args and not isinstance(args[0], torch.Tensor):
            args, kwargs = self._batcher.name_inputs(self._module.forward, args, kwargs)
        return super().__call__(*args, **kwargs)

    def scan(self, *args: Any, **kwargs: Any) -> Tracer:
        """A trace on fake tensors: the bodies read the shapes and dtypes of any value, and
        their mistakes raise as in a trace, but no weight is loaded and nothing is computed.

        It runs on a new copy of the module tree whose parameters are fake tensors (the dtype
        the weights will have; their device is the CPU), so it works before `dispatch()` and
        leaves the model as it was (not loaded, if it was not). Takes what `trace` takes.

        Example:

            lm = mediator.LanguageModel("path/to/model")
            with lm.scan("The Eiffel Tower is in"):
                shape = lm.model.layers[3].output.shape
            lm.dispatched                   # still False
        """
        from torch._subclasses.fake_tensor import FakeTensorMode  # only here

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        tree = self._rebuild(mode)
        traced = self._traced
        fake = self._traced_of(tree)
        if fake.paths != traced.paths:
            raise UsageError(
                f"lm.scan() cannot copy {type(self._module).__name__} on fake tensors: a copy "
                "built from its config has other modules than it; use lm.trace(...)"
            )
        return _Scan(self, fake, mode, args, kwargs)

    def _traced_of(self, tree: nn.Module) -> Traced:
        """What a trace needs of `tree`, a tree like the model's (loaded, or on fake tensors)."""
        traced = self._traced
        renames = Renames(tree, self._renames, frozenset(dir(type(self))))
        return Traced.of(tree, traced.batcher, traced.pin_threads, renames)


class _Scan(Tracer):
    """A trace whose forward pass runs under a `FakeTensorMode` (see `LanguageModel.scan`)."""

    def __init__(
        self,
        model: Model,
        traced: Traced,
        mode: AbstractContextManager[Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        super().__init__(model, traced, args, kwargs)
        self._mode = mode

    def _run(self, frame: types.FrameType) -> None:
        with self._mode:
            super()._run(frame)


def _fake_twin(module: nn.Module, mode: Any) -> nn.Module:
    """A copy of `module` whose parameters and buffers are fake tensors of `mode`."""
    twin: nn.Module = fake_copy(mode, module, ())[0]
    return twin


def _text_batcher(module: nn.Module, tokenizer: Any, missing: str | None) -> TextBatcher:
    """The batcher of a language model; raises TypeError for a module that is none."""
    batcher = default_batcher(module)
    if not isinstance(batcher, CausalLMBatcher):
        raise TypeError(
            f"mediator.LanguageModel wraps a causal language model (with a config and "
            f"generate()), got {type(module).__name__}; use mediator.Model for other modules"
        )
    return TextBatcher.like(batcher, tokenizer, missing)  # type: ignore[no-any-return]
