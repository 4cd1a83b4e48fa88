"""Finding the body of a `with` block in the caller's source, and what it reads and binds.

`capture(frame)` finds, in the source of the caller's file (or IPython/Jupyter cell, `python -c`
command, 3.13 REPL input), the `with` statement that is entering, checks it against the code
that actually runs (a file edited after import fails), refuses what cannot run as a function of
its own (`return`, `yield`, `await`, `break`/`continue` leaving the body, items after ours in the
header), and analyses the body into a `BodySource`: which names it reads, binds, deletes and
declares global, the future flags and the scopes that enclose it (class, function, qualified
name). `check_items` only does the header check. `_body.py` compiles a `BodySource` into a
function. This module owns two caches, both per call site (file, code object and instruction):
`_captured`, the `BodySource` of each with-block, and `_checked`, the headers already checked.
"""

from __future__ import annotations
import __future__

import ast
import linecache
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ._errors import SourceUnavailableError, UsageError
from ._match import instructions, runs_as

_FUTURE_FLAGS = 0
for _name in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _name).compiler_flag

_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
_NESTED_SCOPES = (*_FUNCTIONS, ast.ClassDef, *_COMPREHENSIONS)
_LOOPS = (ast.For, ast.AsyncFor, ast.While)

#: The cell zero-argument `super()` reads its class from: a name the body may need (`reads`).
CLASS_CELL = "__class__"

_FUNCTION_FORM = (
    "Use the function form instead, which needs no source: "
    "`with model.trace() as tr: future = tr.invoke(x).run(fn)`"
)


@dataclass(frozen=True, eq=False)
class BodySource:
    """The body of one `with` statement, found in the caller's source, and its context.

    Name sets hold names as the caller's code spells them (mangled inside a class).
    """

    filename: str
    statements: list[ast.stmt]
    as_name: str | None  # the name bound by `as` for this with item, if any
    loads: frozenset[str]  # names read anywhere in the body
    assigns: frozenset[str]  # names bound or deleted in the caller's scope by the body
    declared_global: frozenset[str]  # by the body or the scope around it
    deletes: tuple[tuple[str, int], ...]  # (name, line) of each `del name` at the body's level
    trivial: bool  # only `pass`, `...` or strings: nothing to run
    flags: int
    class_name: str | None  # the innermost enclosing class: mangling, `__class__`
    first_arg: str | None  # the enclosing function's first parameter (`self` for `super()`)
    name: str  # the enclosing scope's own name and qualified name ("<module>" at top level)
    qualname: str
    prefix: str  # qualified-name prefix of what the body defines ("C.m.<locals>.")

    @property
    def reads(self) -> frozenset[str]:
        """The caller's names to hand to the body: what it uses, rebinds, or needs for
        zero-argument `super()`."""
        names = set(self.loads | self.assigns)
        if "super" in self.loads and self.class_name is not None:
            names.add(CLASS_CELL)
            if self.first_arg is not None:
                names.add(self.first_arg)
        return frozenset(names - self.declared_global)

    def mangle(self, name: str) -> str:
        """`name` as the compiler spells it in this body (`__x` in class C is `_C__x`)."""
        return _mangled(name, self.class_name)


_captured: dict[tuple[str, types.CodeType, int], BodySource] = {}
_checked: set[tuple[str, types.CodeType, int]] = set()  # `with model.trace() ...` sites


def capture(frame: types.FrameType, what: str) -> BodySource:
    """The body of the `with` statement that frame `frame` is entering."""
    code = frame.f_code
    key = (code.co_filename, code, frame.f_lasti)  # code equality ignores the file name
    found = _captured.get(key)
    if found is None:
        found = _find(frame, what)
        if len(_captured) > 4096:
            _captured.clear()
        _captured[key] = found
    return found


def check_items(frame: types.FrameType, what: str) -> None:
    """Raise `UsageError` if the `with` statement `frame` is entering has items after `what`
    (they would be entered after it, and left before its block ends). Without source, nothing
    can be checked and nothing is raised."""
    code = frame.f_code
    key = (code.co_filename, code, frame.f_lasti)
    if key in _checked:
        return
    found = _locate(frame)
    if found is not None:
        _reject_later_items(found[0], frame, what)
    if len(_checked) > 4096:
        _checked.clear()
    _checked.add(key)


def _find(frame: types.FrameType, what: str) -> BodySource:
    found = _locate(frame)
    if found is not None:
        return _analyse(*found, frame, what)
    filename = frame.f_code.co_filename
    where = f"{filename}:{frame.f_lineno}"
    if next(_sources(frame), None) is None:
        why = _why_no_source(filename)
    elif filename == "<string>":
        why = "exec() of a string keeps no source"
    else:
        raise SourceUnavailableError(
            f"the source of this `with {what}` block ({where}) is not the code that runs: "
            f"{filename} changed after it was imported. Re-import it (or restart), or use the "
            "function form, which needs no source: `tr.invoke(x).run(fn)`"
        )
    raise SourceUnavailableError(
        f"cannot read the source of this `with {what}` block ({where}): {why}. {_FUNCTION_FORM}"
    )


def _locate(frame: types.FrameType) -> tuple[ast.With, list[ast.AST]] | None:
    """The `with` statement `frame` is entering, found in a source that matches the code the
    frame runs, and the classes and functions around it."""
    for lines in _sources(frame):
        try:
            tree = ast.parse("".join(lines), frame.f_code.co_filename)
        except SyntaxError:
            continue
        found = _with_at(tree, frame)
        if found is not None and _runs_as(*found, frame):
            return found
    return None


def _why_no_source(filename: str) -> str:
    if filename == "<stdin>":
        return "the Python REPL before 3.13 keeps no source of what you type"
    if filename == "<string>":
        return "exec() of a string keeps no source"
    if filename.startswith("<"):
        return f"nothing keeps the source of {filename}"
    return f"the file {filename} cannot be read"


def _sources(frame: types.FrameType) -> Iterator[list[str]]:
    """Texts that may hold the caller's source, most likely first."""
    filename = frame.f_code.co_filename
    lines = linecache.getlines(filename, frame.f_globals)
    if lines:
        yield lines
        linecache.checkcache(filename)  # a module reloaded since: its file as it is now
        fresh = linecache.getlines(filename, frame.f_globals)
        if fresh and fresh != lines:
            yield fresh
    if filename == "<string>":
        argv = getattr(sys, "orig_argv", [])
        if "-c" in argv[:-1]:  # `python -c "..."`: the command is the source
            yield _split(argv[argv.index("-c") + 1])
    elif filename in ("<timed exec>", "<magic-timeit>"):
        yield from _ipython_magic_sources()


def _split(text: str) -> list[str]:
    return [line + "\n" for line in text.splitlines()]


def _ipython_magic_sources() -> Iterator[list[str]]:
    """IPython's `%%time`/`%%timeit` cell and `%time` line: the current cell, as typed, without
    the magic (IPython numbers the lines of what follows it from 1)."""
    shell = _ipython()
    if shell is None:
        return
    raw: list[str] = getattr(getattr(shell, "history_manager", None), "input_hist_raw", [])
    if not raw:
        return
    cell = raw[-1]
    if cell.lstrip().startswith("%%"):
        yield _split(cell.lstrip().split("\n", 1)[1] if "\n" in cell.lstrip() else "")
    for line in cell.splitlines():
        found = re.match(r"\s*%time(?:it)?((?:\s+-\S+(?:\s+\d+)?)*)\s+(.*)", line)
        if found:
            yield [found.group(2) + "\n"]


def _ipython() -> Any:
    module = sys.modules.get("IPython")
    get = getattr(module, "get_ipython", None)
    return get() if get is not None else None


def _with_at(tree: ast.Module, frame: types.FrameType) -> tuple[ast.With, list[ast.AST]] | None:
    """The innermost `with` statement whose header holds the frame's line, and the classes and
    functions around it (outermost first)."""
    line = frame.f_lineno
    best: tuple[ast.With, list[ast.AST]] | None = None
    stack: list[tuple[ast.AST, list[ast.AST]]] = [(tree, [])]
    while stack:
        node, around = stack.pop()
        if isinstance(node, ast.With) and node.lineno <= line <= _header_end(node):
            if best is None or (node.lineno, node.col_offset) > (
                best[0].lineno,
                best[0].col_offset,
            ):
                best = (node, around)
        inner = [*around, node] if isinstance(node, (*_FUNCTIONS, ast.ClassDef)) else around
        stack.extend((child, inner) for child in ast.iter_child_nodes(node))
    return best


def _runs_as(node: ast.With, around: list[ast.AST], frame: types.FrameType) -> bool:
    """Whether the body found in the source is the code the caller runs (`_match.runs_as`). A
    file edited after import, or another block moved to these lines, fails this."""
    first = node.body[0].lineno
    last = _last_line(node)
    owner = _class_of(around)
    spelled = {_mangled(name, owner) for name in _spelled(node.body)}
    return runs_as(node.body, spelled, frame.f_code, first, last, owner)


def _class_of(around: list[ast.AST]) -> str | None:
    """The name of the innermost class around a statement, if any."""
    classes = [outer.name for outer in around if isinstance(outer, ast.ClassDef)]
    return classes[-1] if classes else None


def _mangled(name: str, owner: str | None) -> str:
    """`name` as the compiler spells it inside class `owner` (`__x` in class C is `_C__x`)."""
    stripped = (owner or "").lstrip("_")
    if stripped and name.startswith("__") and not name.endswith("__") and "." not in name:
        return f"_{stripped}{name}"
    return name


def _spelled(statements: list[ast.stmt]) -> set[str]:
    """Names and attributes the body's own code is sure to mention in its instructions (not in
    annotations, asserts or constant-condition branches the compiler may drop)."""
    names: set[str] = set()
    stack: list[ast.AST] = list(statements)
    while stack:
        node = stack.pop()
        if isinstance(node, (*_NESTED_SCOPES, ast.Assert)):
            continue
        if isinstance(node, (ast.If, ast.While)) and isinstance(node.test, ast.Constant):
            continue
        if isinstance(node, ast.Name) and node.id != "__debug__":  # a constant to the compiler
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        for field, child in ast.iter_fields(node):
            if field in ("annotation", "returns"):
                continue
            if isinstance(child, ast.AST):
                stack.append(child)
            elif isinstance(child, list):
                stack.extend(item for item in child if isinstance(item, ast.AST))
    return names


def _analyse(
    node: ast.With, around: list[ast.AST], frame: types.FrameType, what: str
) -> BodySource:
    filename = frame.f_code.co_filename
    _reject_later_items(node, frame, what)
    _reject_crossing(node.body, filename)
    scope = around[-1] if around else None
    owner = _class_of(around)
    function = scope if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    assigns, declared = assigned_names(node.body)
    if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        declared |= _globals(scope.body)
    prefix = "".join(
        outer.name + (".<locals>." if isinstance(outer, _FUNCTIONS) else ".")  # type: ignore[attr-defined]
        for outer in around
    )
    arguments = function.args.posonlyargs + function.args.args if function else []
    as_name = _as_name(node, _ours(node, frame))

    def mangle(names: set[str]) -> frozenset[str]:
        return frozenset(_mangled(name, owner) for name in names)

    return BodySource(
        filename=filename,
        statements=node.body,
        as_name=_mangled(as_name, owner) if as_name is not None else None,
        loads=mangle(_loaded_names(node.body)),
        assigns=mangle(assigns - declared),
        declared_global=mangle(declared),
        deletes=tuple((_mangled(name, owner), line) for name, line in _deleted(node.body)),
        trivial=all(_is_trivial(s) for s in node.body),
        flags=frame.f_code.co_flags & _FUTURE_FLAGS,
        class_name=owner,
        first_arg=_mangled(arguments[0].arg, owner) if arguments else None,
        name=getattr(scope, "name", "<module>"),
        qualname=prefix.removesuffix(".<locals>.").removesuffix(".") or "<module>",
        prefix=prefix,
    )


def _header_end(node: ast.With) -> int:
    last = node.items[-1]
    end = last.optional_vars if last.optional_vars is not None else last.context_expr
    return end.end_lineno or end.lineno


def _last_line(node: ast.With) -> int:
    return max(getattr(s, "end_lineno", s.lineno) or s.lineno for s in node.body)


_ENTERING = frozenset({"SETUP_WITH", "BEFORE_WITH", "SETUP_ASYNC_WITH", "BEFORE_ASYNC_WITH"})


def _ours(node: ast.With, frame: types.FrameType) -> int:
    """Which item of the `with` statement the frame is entering: the number of items of this
    statement entered before the instruction it stands at."""
    header = range(node.lineno, _header_end(node) + 1)
    entered = sum(
        1
        for instruction, line in instructions(frame.f_code)
        if instruction.offset < frame.f_lasti and instruction.opname in _ENTERING and line in header
    )
    return min(entered, len(node.items) - 1)


def _as_name(node: ast.With, ours: int) -> str | None:
    target = node.items[ours].optional_vars
    return target.id if isinstance(target, ast.Name) else None


def _reject_later_items(node: ast.With, frame: types.FrameType, what: str) -> None:
    ours = _ours(node, frame)
    if ours == len(node.items) - 1:
        return
    later = ", ".join(ast.unparse(item) for item in node.items[ours + 1 :])
    raise UsageError(
        f"`with {what}, {later}:` ({frame.f_code.co_filename}:{node.lineno}): the body runs "
        f"alongside the model while `with {what}` is entered, before `{later}` would be. "
        f"Write them first (`with {later}, {what}:`) or nest them inside the body"
    )


def _is_trivial(statement: ast.stmt) -> bool:
    if isinstance(statement, ast.Pass):
        return True
    return isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)


def _own_scope(statements: list[ast.stmt]) -> list[ast.AST]:
    """Every node of `statements` outside nested functions, classes and comprehensions
    (the nested scope's own node is included, its inside is not)."""
    found: list[ast.AST] = []
    stack: list[ast.AST] = list(reversed(statements))
    while stack:
        node = stack.pop()
        found.append(node)
        if isinstance(node, _NESTED_SCOPES):
            continue
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return found


_INSTEAD = {
    "return": "bind the value to a name in the body and `return` it after the `with` block",
    "yield": "collect the values in a list in the body and yield them after the `with` block",
    "yield from": "bind the iterable in the body and `yield from` it after the `with` block",
    "await": "await before or after the `with` block, or use a synchronous call in the body",
    "break": "set a flag in the body and `break` after the `with` block",
    "continue": "set a flag in the body and `continue` after the `with` block",
}


def _reject_crossing(statements: list[ast.stmt], filename: str) -> None:
    """`return`, `yield`, `await`, and `break`/`continue` outside a loop of the body: they would
    leave the body, which runs as its own function in another thread."""
    stack: list[tuple[ast.AST, bool]] = [(statement, False) for statement in statements]
    while stack:
        node, in_loop = stack.pop()
        if isinstance(node, _NESTED_SCOPES):
            continue
        leaving = (ast.Return, ast.Yield, ast.YieldFrom, ast.Await, ast.Break, ast.Continue)
        if isinstance(node, leaving) and not (
            in_loop and isinstance(node, (ast.Break, ast.Continue))
        ):
            word = {"YieldFrom": "yield from"}.get(type(node).__name__, type(node).__name__.lower())
            raise UsageError(
                f"`{word}` at {filename}:{node.lineno} would leave the with-body, which runs as "
                f"its own function alongside the model: {_INSTEAD[word]}"
            )
        loop_body = node.body if isinstance(node, _LOOPS) else []
        stack.extend(
            (child, in_loop or any(child is inner for inner in loop_body))
            for child in ast.iter_child_nodes(node)
        )


def _globals(statements: list[ast.stmt]) -> set[str]:
    """The names a scope's own code declares `global`."""
    return {
        name
        for node in _own_scope(statements)
        if isinstance(node, ast.Global)
        for name in node.names
    }


def _deleted(statements: list[ast.stmt]) -> list[tuple[str, int]]:
    """The names the body's own code unbinds with `del`, and where."""
    return [
        (target.id, node.lineno)
        for node in _own_scope(statements)
        if isinstance(node, ast.Delete)
        for target in node.targets
        if isinstance(target, ast.Name)
    ]


def assigned_names(statements: list[ast.stmt]) -> tuple[set[str], set[str]]:
    """The names a scope's own code binds or deletes, and those it declares `global`."""
    assigned: set[str] = set()
    declared: set[str] = set()
    for node in _own_scope(statements):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            assigned.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            assigned.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                assigned.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ExceptHandler) and node.name:
            assigned.add(node.name)
        elif isinstance(node, (ast.MatchAs, ast.MatchStar)) and node.name:
            assigned.add(node.name)
        elif isinstance(node, ast.MatchMapping) and node.rest:
            assigned.add(node.rest)
        elif isinstance(node, ast.Global):
            declared.update(node.names)
        elif isinstance(node, _COMPREHENSIONS):
            assigned.update(_walrus_targets(node))
    return assigned, declared


def _walrus_targets(comprehension: ast.AST) -> set[str]:
    """Names a `:=` in a comprehension binds: they belong to the scope around it."""
    found: set[str] = set()
    stack = list(ast.iter_child_nodes(comprehension))
    while stack:
        node = stack.pop()
        if isinstance(node, (*_FUNCTIONS, ast.ClassDef)):
            continue
        if isinstance(node, ast.NamedExpr) and isinstance(node.target, ast.Name):
            found.add(node.target.id)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _loaded_names(statements: list[ast.stmt]) -> set[str]:
    """Names the statements read, the targets of augmented assignments (`n += 1`) included."""
    return {
        node.id
        for statement in statements
        for node in ast.walk(statement)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    } | {
        node.target.id
        for statement in statements
        for node in ast.walk(statement)
        if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name)
    }
