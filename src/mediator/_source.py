"""Turning the body of a `with` block into a function a mediator thread can run.

`capture(frame)` finds, in the source of the caller's file (or IPython/Jupyter cell, `python -c`
command, 3.13 REPL input), the `with` statement that is entering, checks it against the code
that actually runs, and analyses its body: which names it reads and binds, and the scopes that
enclose it. `compile_body` compiles the body as a function inside a copy of that context (the
enclosing class, for name mangling and the `__class__` cell of `super()`; the enclosing
function's `global` declarations and future flags), whose parameters are the enclosing names it
uses, whose loads of names bound by *other* bodies of the trace go through a lookup that waits
for them, and which hands its final locals back as it ends. Compiled code keeps the user's file
name, line numbers and qualified names, so tracebacks point at the user's own lines. Both steps
are cached: `_captured` per call site (file, code object and instruction), `_compiled` per body
and parameters.
"""

from __future__ import annotations
import __future__

import ast
import builtins
import copy
import dis
import linecache
import re
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from ._errors import SourceUnavailableError, UsageError

_FUTURE_FLAGS = 0
for _name in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _name).compiler_flag

_COMPREHENSIONS = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
_NESTED_SCOPES = (*_FUNCTIONS, ast.ClassDef, *_COMPREHENSIONS)
_LOOPS = (ast.For, ast.AsyncFor, ast.While)

#: Names the compiled body reaches through its closure: the mediator's hooks, and the class
#: cell of zero-argument `super()`.
_KEEP, _LOOKUP, _LOCALS, _CLASS_CELL = (
    "__mediator_keep__",
    "__mediator_name__",
    "__mediator_locals__",
    "__class__",
)
_SCOPE, _BODY = "__mediator_scope__", "__mediator_body__"

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
    first_line: int
    first_column: int
    inline: bool  # the body starts on the line of the `with` header (`with ...: x = 1`)
    last_line: int
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
            names.add(_CLASS_CELL)
            if self.first_arg is not None:
                names.add(self.first_arg)
        return frozenset(names - self.declared_global)

    def mangle(self, name: str) -> str:
        """`name` as the compiler spells it in this body (`__x` in class C is `_C__x`)."""
        return _mangled(name, self.class_name)


_captured: dict[tuple[str, types.CodeType, int], BodySource] = {}
_compiled: dict[tuple[BodySource, tuple[str, ...], frozenset[str]], types.CodeType] = {}
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
            _compiled.clear()
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
    """Whether the body found in the source is the code the caller runs: every name the body
    spells is used by the caller's instructions on the body's lines. A file edited after import,
    or another block moved to these lines, fails this."""
    first = node.body[0].lineno
    last = _last_line(node)
    owner = _class_of(around)
    spelled = {_mangled(name, owner) for name in _spelled(node.body)}
    return spelled <= _names_on_lines(frame.f_code, first, last)


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


def _names_on_lines(code: types.CodeType, first: int, last: int) -> set[str]:
    """The names and attributes `code`'s instructions on lines `first..last` use."""
    names: set[str] = set()
    for instruction, line in _instructions(code):
        if first <= line <= last:
            value = instruction.argval  # 3.13 pairs names: LOAD_FAST_LOAD_FAST ("a", "b")
            for name in value if isinstance(value, tuple) else (value,):
                if isinstance(name, str):
                    names.add(name)
    return names


def _instructions(code: types.CodeType) -> Iterator[tuple[dis.Instruction, int]]:
    """Each instruction of `code` with its line (3.10 gives the line where one starts only)."""
    line = code.co_firstlineno
    for instruction in dis.get_instructions(code):
        if instruction.starts_line is not None:
            line = instruction.starts_line
        positions = getattr(instruction, "positions", None)
        yield instruction, positions.lineno if positions and positions.lineno else line


def _analyse(
    node: ast.With, around: list[ast.AST], frame: types.FrameType, what: str
) -> BodySource:
    filename = frame.f_code.co_filename
    _reject_later_items(node, frame, what)
    _reject_crossing(node.body, filename)
    scope = around[-1] if around else None
    owner = _class_of(around)
    function = scope if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    assigns, declared = _assigned_names(node.body)
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
        first_line=node.body[0].lineno,
        first_column=node.body[0].col_offset,
        inline=node.body[0].lineno == _header_end(node),
        last_line=_last_line(node),
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
        for instruction, line in _instructions(frame.f_code)
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


def _assigned_names(statements: list[ast.stmt]) -> tuple[set[str], set[str]]:
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
    return {
        node.id
        for statement in statements
        for node in ast.walk(statement)
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)
    }


class _CrossLoads(ast.NodeTransformer):
    """Rewrites loads of names bound by other bodies into `__mediator_name__("name")`,
    except where a nested scope binds the name itself."""

    def __init__(self, names: frozenset[str], mangle: Callable[[str], str]) -> None:
        self.names = names
        self.mangle = mangle
        self.shadowed: list[set[str]] = []

    def visit_Name(self, node: ast.Name) -> ast.AST:
        name = self.mangle(node.id)
        if (
            isinstance(node.ctx, ast.Load)
            and name in self.names
            and not any(node.id in scope for scope in self.shadowed)
        ):
            call = ast.Call(
                func=ast.Name(id=_LOOKUP, ctx=ast.Load()),
                args=[ast.Constant(name)],
                keywords=[],
            )
            return ast.copy_location(call, node)
        return node

    def _scoped(self, node: ast.AST, bound: set[str]) -> ast.AST:
        self.shadowed.append(bound)
        try:
            return self.generic_visit(node)
        finally:
            self.shadowed.pop()

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        return self._scoped(node, _argument_names(node.args))

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        return self._scoped(node, _argument_names(node.args) | _assigned_names(node.body)[0])

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def _comprehension(self, node: ast.AST) -> ast.AST:
        targets = {
            name.id
            for generator in node.generators  # type: ignore[attr-defined]
            for name in ast.walk(generator.target)
            if isinstance(name, ast.Name)
        }
        return self._scoped(node, targets)

    visit_ListComp = visit_SetComp = visit_DictComp = visit_GeneratorExp = _comprehension


class _Undeclared(ast.NodeTransformer):
    """Drops the body's own `global` and `nonlocal` statements: the compiled function declares
    the globals once at its top, and a `nonlocal` name is the caller's to write back."""

    def visit_Global(self, node: ast.Global) -> ast.AST:
        return ast.copy_location(ast.Pass(), node)

    visit_Nonlocal = visit_Global  # type: ignore[assignment]

    def _keep(self, node: ast.AST) -> ast.AST:
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = visit_ClassDef = _keep


def _argument_names(arguments: ast.arguments) -> set[str]:
    every = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
    names = {arg.arg for arg in every}
    for extra in (arguments.vararg, arguments.kwarg):
        if extra is not None:
            names.add(extra.arg)
    return names


def _parameters(
    source: BodySource, scope: dict[str, Any], cross: frozenset[str]
) -> tuple[str, ...]:
    """The body function's parameters: the enclosing names it gets, the enclosing function's
    first parameter first (zero-argument `super()` reads it there)."""
    names = sorted(name for name in scope if name not in cross and name != _CLASS_CELL)
    first = source.first_arg
    if first is not None and first in names:
        names.remove(first)
        names.insert(0, first)
    return tuple(names)


def make_body(
    source: BodySource,
    scope: dict[str, Any],
    cross: frozenset[str],
    globals_: dict[str, Any],
    keep: Callable[[dict[str, Any]], None],
    lookup: Callable[[str], Any],
) -> tuple[types.FunctionType, tuple[Any, ...]]:
    """The body as a function of the caller's globals, and the arguments to call it with.

    `cross` names are read through `lookup(...)`; as the body ends, for any reason, it calls
    `keep(locals())`.
    """
    params = _parameters(source, scope, cross)
    code = compile_body(source, params, cross)
    cells = {
        _KEEP: keep,
        _LOOKUP: lookup,
        _LOCALS: builtins.locals,
        _CLASS_CELL: scope.get(_CLASS_CELL),
    }
    closure = tuple(types.CellType(cells[name]) for name in code.co_freevars)
    function = types.FunctionType(code, globals_, code.co_name, None, closure)
    return function, tuple(scope[name] for name in params)


def compile_body(
    source: BodySource, params: tuple[str, ...], cross: frozenset[str]
) -> types.CodeType:
    """The code of a function `(*params)` running the body, with the hooks as free variables."""
    key = (source, params, cross)
    code = _compiled.get(key)
    if code is not None:
        return code
    statements = [_Undeclared().visit(copy.deepcopy(statement)) for statement in source.statements]
    if cross:
        statements = [_CrossLoads(cross, source.mangle).visit(s) for s in statements]
    keep = ast.Expr(
        ast.Call(
            func=ast.Name(_KEEP, ast.Load()),
            args=[ast.Call(ast.Name(_LOCALS, ast.Load()), [], [])],
            keywords=[],
        )
    )
    declared: list[ast.stmt] = []
    if source.declared_global:
        declared.append(ast.Global(sorted(source.declared_global)))
    body = ast.Try(body=statements, handlers=[], orelse=[], finalbody=[keep])
    function = _function(_BODY, params, [*declared, body])
    scope = _function(_SCOPE, (_KEEP, _LOOKUP, _LOCALS), [function])
    outer: ast.stmt = scope
    if source.class_name is not None:
        outer = ast.ClassDef(
            name=source.class_name, bases=[], keywords=[], body=[scope], decorator_list=[]
        )
        if "type_params" in ast.ClassDef._fields:
            setattr(outer, "type_params", [])  # noqa: B010 - Python 3.12+ only
    for node in (outer, scope, function, body, *declared):
        ast.copy_location(node, source.statements[0])
    ast.copy_location(keep, source.statements[-1])  # a debugger steps on, not back
    module = ast.fix_missing_locations(ast.Module(body=[outer], type_ignores=[]))
    compiled = compile(module, source.filename, "exec", flags=source.flags, dont_inherit=True)
    code = _find_code(compiled, _BODY)
    owner = f"{source.class_name}." if source.class_name is not None else ""
    code = _requalified(code, f"{owner}{_SCOPE}.<locals>.{_BODY}.<locals>.", source.prefix)
    code = code.replace(co_name=source.name)
    if _HAS_QUALNAME:
        code = code.replace(co_qualname=source.qualname)  # type: ignore[call-arg,unused-ignore]
    _compiled[key] = code
    return code


def _function(name: str, params: tuple[str, ...], body: list[ast.stmt]) -> ast.FunctionDef:
    function = ast.FunctionDef(
        name=name,
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg(param) for param in params],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        ),
        body=body,
        decorator_list=[],
        returns=None,
    )
    if "type_params" in ast.FunctionDef._fields:
        setattr(function, "type_params", [])  # noqa: B010 - Python 3.12+ only
    return function


def _find_code(code: types.CodeType, name: str) -> types.CodeType:
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_name == name:
                return const
            try:
                return _find_code(const, name)
            except LookupError:
                pass
    raise LookupError(name)


def _requalified(code: types.CodeType, old: str, new: str) -> types.CodeType:
    """`code` with the qualified names of what it defines starting `new` instead of `old`: a
    class or function defined in a body is named as if the body ran where it stands."""
    consts = tuple(
        _requalified(const, old, new)
        if isinstance(const, types.CodeType)
        else new + const[len(old) :]
        if isinstance(const, str) and const.startswith(old)
        else const
        for const in code.co_consts
    )
    code = code.replace(co_consts=consts)
    qualname: str = getattr(code, "co_qualname", "")
    if qualname.startswith(old):
        code = code.replace(co_qualname=new + qualname[len(old) :])  # type: ignore[call-arg,unused-ignore]
    return code


_HAS_QUALNAME = hasattr(types.CodeType, "co_qualname")
