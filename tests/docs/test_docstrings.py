"""Every public name of `mediator` has a docstring with a usage example, and every example compiles.

Covered: the package itself, each name in `mediator.__all__` (but the `models` module, whose
names are checked on their own), every public method and property defined on those classes and
on the classes the API hands out without naming them (`tr.cache()` -> `Cache`, `tr.iter` ->
`Steps`), and the dunders users call directly (`model.layers[0]`, `model.lm_head(h)`). A new
public name without an example fails here.

An example is an indented block after a line that ends in "Example:" or "For example:". The
blocks are plain Python in the README's style: they are compiled, not run.
"""

from __future__ import annotations

import inspect
import textwrap
from typing import Any

import pytest

import mediator
from mediator._cache import Cache
from mediator._edits import Editor
from mediator._operation_envoy import OperationEnvoy, SourceEnvoy
from mediator._steps import Steps

EXEMPT = {"models"}  # the module of built-in models: its public names are collected below
RETURNED = (
    Cache,
    Steps,
    SourceEnvoy,
    OperationEnvoy,
    Editor,
)  # public classes reached through the API rather than by name
CALLED_DUNDERS = {"__getitem__", "__call__"}  # documented where a public class defines them
UNDOCUMENTED_DUNDERS: set[str] = set()


def _own_doc(value: Any) -> str | None:
    """The object's own docstring (`inspect.getdoc` would inherit a base class's)."""
    doc = value.fget.__doc__ if isinstance(value, property) else value.__doc__
    return doc if isinstance(doc, str) else None


def _members(cls: type) -> dict[str, Any]:
    """What `cls` defines, with what it inherits from the package's own (private) bases."""
    members: dict[str, Any] = {}
    for base in reversed(cls.__mro__):
        if base is cls or base.__module__.startswith("mediator."):
            members.update(vars(base))
    return members


def _public_objects() -> dict[str, Any]:
    found: dict[str, Any] = {"mediator": mediator}
    classes: list[type] = []
    for name in mediator.__all__:
        if name in EXEMPT:
            continue
        obj = getattr(mediator, name)
        found[f"mediator.{name}"] = obj
        if inspect.isclass(obj):
            classes.append(obj)
    classes += [cls for cls in RETURNED if cls not in classes]
    for name, obj in vars(mediator.models).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != "mediator.models":
            continue
        found[f"mediator.models.{name}"] = obj
        if inspect.isclass(obj):
            classes.append(obj)
    for cls in classes:
        for attr, value in _members(cls).items():
            qualified = f"{cls.__name__}.{attr}"
            if attr.startswith("_") and (
                attr not in CALLED_DUNDERS or qualified in UNDOCUMENTED_DUNDERS
            ):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            if isinstance(value, property) or inspect.isfunction(value):
                found[qualified] = value
    return found


def examples(doc: str) -> list[str]:
    """The code blocks of a docstring: the lines after one ending in "Example:" (or "For
    example:") that are indented deeper than it, dedented."""
    lines = inspect.cleandoc(doc).splitlines()
    blocks = []
    for index, line in enumerate(lines):
        if not line.rstrip().endswith(("Example:", "example:")):
            continue
        indent = len(line) - len(line.lstrip())
        block = []
        for following in lines[index + 1 :]:
            if following.strip() and len(following) - len(following.lstrip()) <= indent:
                break
            block.append(following)
        code = textwrap.dedent("\n".join(block)).strip("\n")
        if code:
            blocks.append(code)
    return blocks


PUBLIC = _public_objects()


@pytest.fixture(autouse=True)
def no_busy_worker() -> None:
    """Overrides conftest's check after every test (a gc.collect()): these tests run no trace."""


def test_the_public_api_is_all_collected() -> None:
    expected = {
        "mediator.Model",
        "Model.trace",
        "Model.generate",
        "Envoy.path",
        "Envoy.output",
        "Envoy.inputs",
        "Envoy.input",
        "Envoy.skip",
        "Envoy.__getitem__",
        "Envoy.__call__",
        "Tracer.invoke",
        "Tracer.barrier",
        "Tracer.iter",
        "Tracer.all",
        "Tracer.result",
        "Tracer.cache",
        "Tracer.stop",
        "Invoke.run",
        "Batcher.batch",
        "Batcher.narrow",
        "Batcher.merge",
        "Batcher.check_replacement",
        "CausalLMBatcher.batch",
        "Cache.__getitem__",
        "Steps.__getitem__",
        "mediator.UsageError",
        "mediator.SourceUnavailableError",
    }
    assert expected <= set(PUBLIC), sorted(expected - set(PUBLIC))


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_has_a_docstring_with_an_example(name: str) -> None:
    doc = _own_doc(PUBLIC[name])
    assert doc and doc.strip(), f"{name} has no docstring"
    assert examples(doc), (
        f"{name}'s docstring shows no example: add a line ending in 'Example:' followed by an "
        "indented block of code"
    )


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_examples_compile(name: str) -> None:
    for number, block in enumerate(examples(_own_doc(PUBLIC[name]) or "")):
        compile(block, f"<example {number} of {name}>", "exec")


def test_examples_finds_only_indented_blocks() -> None:
    doc = """Summary.

    Example:

        a = 1
        if a:
            b = 2

    Back to prose, which is not code.
    For example: nothing indented follows this one.
    """
    assert examples(doc) == ["a = 1\nif a:\n    b = 2"]
