"""Rewriting a function from its source so that each call it makes goes through a wrapper.

`rewrite_of(fn)` reads the source of a plain Python function (`inspect.getsource`), parses it,
and names every call in its body after the called expression, numbered per name in source
order (`softmax_0`, `o_proj_0`, `transpose_2`). `Rewrite.instantiate(wrappers)` then gives a
copy of the function in which call `i`, `f(*a, **k)`, runs `wrappers[i](f, *a, **k)`: the
called expression and the arguments are evaluated as before, in the same order. The copy is
compiled with the function's own file name and line numbers (tracebacks show the real source),
runs with its globals, defaults and closure cells (shared with the original, not copied), and
has its name; a method is compiled inside a class of its class's name, so that its private
names are mangled as they were. Decorated functions are rewritten at their innermost
`__wrapped__` function, and `rewrap` rebuilds each decorator's wrapper around the copy where it
holds the wrapped function in a closure cell (as `functools.wraps` decorators do). What cannot
be rewritten (no source, a lambda, a builtin, a source that does not define the function)
raises `SourceUnavailableError`.

This module owns one cache, `_rewrites`: the parsed and compiled rewrite per code object.
"""

from __future__ import annotations
import __future__

import ast
import inspect
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._body import function_def
from ._errors import SourceUnavailableError

_OPS = "__mediator_ops__"
_FACTORY = "__mediator_factory__"
_UNWRAPPED = ("super",)  # zero-argument super() must stay a direct call

_rewrites: dict[types.CodeType, Rewrite] = {}


@dataclass(frozen=True)
class Operation:
    """One call inside a function: its name, line, and the expression it calls."""

    name: str  # e.g. "softmax_0"
    line: int  # in the function's file
    called: str  # the called expression as written, e.g. "nn.functional.softmax"
    expression: ast.expr


@dataclass(frozen=True, eq=False)
class Rewrite:
    """A function's source with its calls named, and its code with each call wrapped."""

    function: types.FunctionType
    lines: list[str]  # the source as `inspect.getsourcelines` gives it
    first_line: int
    operations: tuple[Operation, ...]
    code: types.CodeType  # the rewritten function's code (its free variables include _OPS)

    def names(self) -> list[str]:
        return [operation.name for operation in self.operations]

    def instantiate(self, wrappers: Sequence[Callable[..., Any]]) -> types.FunctionType:
        """The function with call `i` going through `wrappers[i]`."""
        original = self.function
        cells = dict(zip(original.__code__.co_freevars, original.__closure__ or (), strict=True))
        cells[_OPS] = types.CellType(list(wrappers))
        closure = tuple(cells[name] for name in self.code.co_freevars)
        copy = types.FunctionType(
            self.code, original.__globals__, original.__name__, original.__defaults__, closure
        )
        copy.__kwdefaults__ = original.__kwdefaults__
        copy.__qualname__ = original.__qualname__
        copy.__module__ = original.__module__
        copy.__doc__ = original.__doc__
        return copy

    def listing(self, prefix: str = "") -> str:
        """The source, each line followed by the names of the calls it makes."""
        at: dict[int, list[str]] = {}
        for operation in self.operations:
            at.setdefault(operation.line, []).append(prefix + operation.name)
        width = min(max((len(line.rstrip()) for line in self.lines), default=0), 80)
        shown = []
        for offset, line in enumerate(self.lines):
            number = self.first_line + offset
            text = line.rstrip()
            names = at.get(number)
            mark = f"{' ' * max(0, width - len(text))}  # {', '.join(names)}" if names else ""
            shown.append(f"{number:>5}  {text}{mark}")
        return "\n".join(shown)


def unwrap(function: Any) -> list[Any]:
    """`function` and what it wraps (`__wrapped__`), outermost first."""
    chain = [function]
    while hasattr(chain[-1], "__wrapped__") and len(chain) < 100:
        chain.append(chain[-1].__wrapped__)
    return chain


def rewrap(chain: list[Any], inner: types.FunctionType) -> Callable[..., Any]:
    """`chain` (from `unwrap`) rebuilt around `inner`, the rewritten last function: each
    wrapper that holds the next function in a closure cell is copied with `inner` there. The
    first wrapper that does not is left out, with every one above it."""
    built: Callable[..., Any] = inner
    for wrapper, wrapped in zip(reversed(chain[:-1]), reversed(chain[1:]), strict=True):
        cells = getattr(wrapper, "__closure__", None) or ()
        if not isinstance(wrapper, types.FunctionType) or not any(
            cell.cell_contents is wrapped for cell in cells if _filled(cell)
        ):
            break
        closure = tuple(
            types.CellType(built) if _filled(cell) and cell.cell_contents is wrapped else cell
            for cell in cells
        )
        copy = types.FunctionType(
            wrapper.__code__, wrapper.__globals__, wrapper.__name__, wrapper.__defaults__, closure
        )
        copy.__kwdefaults__ = wrapper.__kwdefaults__
        copy.__dict__.update(wrapper.__dict__)
        copy.__wrapped__ = built  # type: ignore[attr-defined]
        built = copy
    return built


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def rewrite_of(function: Any, what: str) -> Rewrite:
    """The rewrite of a plain function (`what` names it for errors)."""
    if not isinstance(function, types.FunctionType):
        kind = type(function).__name__
        raise SourceUnavailableError(
            f"{what} is a {kind}, not a Python function: it has no source to rewrite"
        )
    found = _rewrites.get(function.__code__)
    if found is None:
        found = _rewrite(function, what)
        if len(_rewrites) > 1024:
            _rewrites.clear()
        _rewrites[function.__code__] = found
    return found


def _rewrite(function: types.FunctionType, what: str) -> Rewrite:
    if function.__name__ == "<lambda>":
        raise SourceUnavailableError(f"{what} is a lambda: only a def can be rewritten")
    try:
        lines, first = inspect.getsourcelines(function)
    except (OSError, TypeError) as error:
        raise SourceUnavailableError(
            f"{what} ({function.__qualname__}) has no source file to read ({error}); a "
            "function built by exec() or compiled elsewhere cannot be rewritten"
        ) from None
    definition = _definition(lines, first, function.__code__.co_name)
    if definition is None:
        raise SourceUnavailableError(
            f"{what}: the source of {function.__qualname__} at "
            f"{function.__code__.co_filename}:{first} does not define it (edited since?)"
        )
    calls = _calls(definition)
    operations = tuple(
        Operation(name, call.func.lineno, ast.unparse(call.func), call.func) for name, call in calls
    )
    _WrapCalls({id(call): index for index, (_, call) in enumerate(calls)}).visit(definition)
    definition.decorator_list = []
    code = _compile(definition, function)
    return Rewrite(function, lines, first, operations, code)


def _definition(lines: list[str], first: int, name: str) -> ast.FunctionDef | None:
    """The parsed `def` of `lines` (starting at line `first` of its file), with real line
    numbers and columns; None if it is not a def of `name`."""
    text = "".join(lines)
    indented = bool(lines) and lines[0][:1] in (" ", "\t")
    try:
        tree = ast.parse(f"if 1:\n{text}" if indented else text)
    except SyntaxError:
        return None
    ast.increment_lineno(tree, first - (2 if indented else 1))
    body = tree.body[0].body if indented and isinstance(tree.body[0], ast.If) else tree.body
    node = body[0] if body else None
    if isinstance(node, ast.FunctionDef) and node.name == name:
        return node
    return None


def _calls(definition: ast.FunctionDef) -> list[tuple[str, ast.Call]]:
    """The calls in the body of `definition`, named and numbered in source order."""
    found = [
        node
        for statement in definition.body
        for node in ast.walk(statement)
        if isinstance(node, ast.Call) and not _unwrappable(node)
    ]
    found.sort(key=lambda call: (call.func.end_lineno or 0, call.func.end_col_offset or 0))
    counts: dict[str, int] = {}
    named = []
    for call in found:
        base = _called_name(call.func)
        counts[base] = counts.get(base, -1) + 1
        named.append((f"{base}_{counts[base]}", call))
    return named


def _unwrappable(call: ast.Call) -> bool:
    return isinstance(call.func, ast.Name) and call.func.id in _UNWRAPPED


def _called_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return "call"


class _WrapCalls(ast.NodeTransformer):
    """`f(*a, **k)` -> `__mediator_ops__[i](f, *a, **k)` for the calls numbered in `index`."""

    def __init__(self, index: dict[int, int]) -> None:
        self.index = index

    def visit_Call(self, node: ast.Call) -> ast.AST:
        position = self.index.get(id(node))
        self.generic_visit(node)
        if position is None:
            return node
        wrapper = ast.Subscript(ast.Name(_OPS, ast.Load()), ast.Constant(position), ast.Load())
        new = ast.Call(wrapper, [node.func, *node.args], node.keywords)
        ast.copy_location(wrapper, node.func)
        ast.fix_missing_locations(ast.copy_location(new, node))
        return new


def _compile(definition: ast.FunctionDef, function: types.FunctionType) -> types.CodeType:
    """Compile `definition` inside a factory whose parameters are the function's free
    variables and `_OPS`, so that they stay closure variables; return the function's code."""
    params = [_OPS, *function.__code__.co_freevars]
    factory = function_def(
        _FACTORY, tuple(params), [_in_its_class(definition, function), ast.Pass()]
    )
    ast.copy_location(factory, definition)
    module = ast.fix_missing_locations(ast.Module([factory], type_ignores=[]))
    flags = function.__code__.co_flags & __future__.annotations.compiler_flag
    code = compile(module, function.__code__.co_filename, "exec", flags=flags, dont_inherit=True)
    return _function_code(code, function, definition.name)


def _in_its_class(definition: ast.FunctionDef, function: types.FunctionType) -> ast.stmt:
    """`definition`, inside a class named as the one it was defined in (if any), so that the
    compiler mangles its private names (`self.__x` -> `self._Class__x`) as it did there."""
    owner = _owner_class(function)
    if owner is None:
        return definition
    holder = ast.ClassDef(name=owner, bases=[], keywords=[], body=[definition], decorator_list=[])
    if sys.version_info >= (3, 12):
        holder.type_params = []
    return ast.copy_location(holder, definition)


def _owner_class(function: types.FunctionType) -> str | None:
    """The name of the class `function` was defined in, from its qualified name."""
    parts = function.__qualname__.split(".")
    if len(parts) < 2 or parts[-2] == "<locals>":
        return None
    return parts[-2]


def _function_code(code: types.CodeType, function: types.FunctionType, name: str) -> types.CodeType:
    """The code of the function `name` that `_compile` compiled into `code` (a module)."""
    scope = next(c for c in code.co_consts if isinstance(c, types.CodeType))  # the factory
    owner = _owner_class(function)
    if owner is not None:  # the class that holds it
        scope = next(
            c for c in scope.co_consts if isinstance(c, types.CodeType) and c.co_name == owner
        )
    return next(c for c in scope.co_consts if isinstance(c, types.CodeType) and c.co_name == name)
