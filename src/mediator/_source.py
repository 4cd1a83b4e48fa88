"""Turning the body of a `with` block into a function a mediator thread can run.

`capture(frame)` finds, in the source of the caller's file (or IPython/Jupyter cell), the `with`
statement that is entering, and analyses its body: which names it reads and binds. `compile_body`
turns the body into a function whose parameters are the enclosing names it uses, whose loads of
names bound by *other* bodies of the trace go through a lookup that waits for them, and which
hands its final locals back as it ends. Compiled code keeps the user's file name and line
numbers, so tracebacks point at the user's own lines. Both steps are cached per call site.
"""

from __future__ import annotations
import __future__

import ast
import copy
import linecache
import types
from dataclasses import dataclass

from ._errors import SourceUnavailableError, UsageError

_FUTURE_FLAGS = 0
for _name in __future__.all_feature_names:
    _FUTURE_FLAGS |= getattr(__future__, _name).compiler_flag

_NESTED_SCOPES = (
    ast.FunctionDef,
    ast.AsyncFunctionDef,
    ast.Lambda,
    ast.ClassDef,
    ast.ListComp,
    ast.SetComp,
    ast.DictComp,
    ast.GeneratorExp,
)

#: Parameters every compiled body takes before the user's names.
PROTOCOL_PARAMS = ("__mediator_keep__", "__mediator_name__", "__mediator_locals__")


@dataclass(frozen=True, eq=False)
class BodySource:
    """The body of one `with` statement, found in the caller's source."""

    filename: str
    statements: list[ast.stmt]
    first_line: int
    first_column: int
    inline: bool  # the body starts on the line of the `with` header (`with ...: x = 1`)
    last_line: int
    as_name: str | None  # the name bound by `as` for this with item, if any
    loads: frozenset[str]  # names read anywhere in the body
    assigns: frozenset[str]  # names bound at the body's own level
    declared_global: frozenset[str]
    trivial: bool  # only `pass`, `...` or strings: nothing to run
    flags: int


_captured: dict[tuple[types.CodeType, int], BodySource] = {}
_compiled: dict[tuple[BodySource, tuple[str, ...], frozenset[str]], types.CodeType] = {}


def capture(frame: types.FrameType, what: str) -> BodySource:
    """The body of the `with` statement that frame `frame` is entering."""
    key = (frame.f_code, frame.f_lasti)
    found = _captured.get(key)
    if found is None:
        found = _find(frame, what)
        if len(_captured) > 4096:
            _captured.clear()
            _compiled.clear()
        _captured[key] = found
    return found


def _find(frame: types.FrameType, what: str) -> BodySource:
    filename = frame.f_code.co_filename
    lines = linecache.getlines(filename, frame.f_globals)
    if not lines:
        raise SourceUnavailableError(
            f"cannot read the source of this `with {what}` block ({filename}): a plain Python "
            "REPL and exec() of a string keep no source. Use the function form instead: "
            "`with model.trace() as tr: future = tr.invoke(x).run(fn)`"
        )
    tree = ast.parse("".join(lines), filename)
    line = frame.f_lineno
    candidates = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.With) and node.lineno <= line <= _header_end(node)
    ]
    if not candidates:
        raise SourceUnavailableError(
            f"cannot find the `with {what}` statement at {filename}:{line} in its source; "
            "was the file changed after it was imported? Use the function form "
            "`tr.invoke(x).run(fn)` if the source is not available"
        )
    node = max(candidates, key=lambda n: (n.lineno, n.col_offset))
    _reject_unsupported(node.body, filename)
    assigns, declared = _assigned_names(node.body)
    return BodySource(
        filename=filename,
        statements=node.body,
        first_line=node.body[0].lineno,
        first_column=node.body[0].col_offset,
        inline=node.body[0].lineno == _header_end(node),
        last_line=max(getattr(s, "end_lineno", s.lineno) or s.lineno for s in node.body),
        as_name=_as_name(node),
        loads=frozenset(_loaded_names(node.body)),
        assigns=frozenset(assigns - declared),
        declared_global=frozenset(declared),
        trivial=all(_is_trivial(s) for s in node.body),
        flags=frame.f_code.co_flags & _FUTURE_FLAGS,
    )


def _header_end(node: ast.With) -> int:
    last = node.items[-1]
    end = last.optional_vars if last.optional_vars is not None else last.context_expr
    return end.end_lineno or end.lineno


def _as_name(node: ast.With) -> str | None:
    named = [item for item in node.items if isinstance(item.optional_vars, ast.Name)]
    ours = [
        item
        for item in named
        if isinstance(item.context_expr, ast.Call)
        and isinstance(item.context_expr.func, ast.Attribute)
        and item.context_expr.func.attr in ("trace", "invoke")
    ]
    candidates = ours or named
    if not candidates:
        return None
    chosen = candidates[-1]
    assert isinstance(chosen.optional_vars, ast.Name)
    return chosen.optional_vars.id


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


def _reject_unsupported(statements: list[ast.stmt], filename: str) -> None:
    for node in _own_scope(statements):
        if isinstance(node, (ast.Return, ast.Yield, ast.YieldFrom, ast.Await, ast.Nonlocal)):
            word = type(node).__name__.lower().replace("yieldfrom", "yield from")
            raise UsageError(
                f"`{word}` inside a trace body is not supported ({filename}:{node.lineno}): "
                "the body runs as its own function in a mediator thread; move the "
                f"`{word}` after the `with` block"
            )


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
    return assigned, declared


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

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names
        self.shadowed: list[set[str]] = []

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if (
            isinstance(node.ctx, ast.Load)
            and node.id in self.names
            and not any(node.id in scope for scope in self.shadowed)
        ):
            call = ast.Call(
                func=ast.Name(id=PROTOCOL_PARAMS[1], ctx=ast.Load()),
                args=[ast.Constant(node.id)],
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


def _argument_names(arguments: ast.arguments) -> set[str]:
    every = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
    names = {arg.arg for arg in every}
    for extra in (arguments.vararg, arguments.kwarg):
        if extra is not None:
            names.add(extra.arg)
    return names


def compile_body(
    source: BodySource, params: tuple[str, ...], cross: frozenset[str]
) -> types.CodeType:
    """The code of a function `(keep, name, locals, *params)` running the body.

    `cross` names are read through `name(...)`; as the body ends, for any reason, it calls
    `keep(locals())`.
    """
    key = (source, params, cross)
    code = _compiled.get(key)
    if code is not None:
        return code
    statements = [copy.deepcopy(statement) for statement in source.statements]
    if cross:
        statements = [_CrossLoads(cross).visit(statement) for statement in statements]
    keep = ast.Expr(
        ast.Call(
            func=ast.Name(PROTOCOL_PARAMS[0], ast.Load()),
            args=[ast.Call(ast.Name(PROTOCOL_PARAMS[2], ast.Load()), [], [])],
            keywords=[],
        )
    )
    body = ast.Try(body=statements, handlers=[], orelse=[], finalbody=[keep])
    function = ast.FunctionDef(
        name="__mediator_body__",
        args=ast.arguments(
            posonlyargs=[],
            args=[ast.arg(name) for name in PROTOCOL_PARAMS + params],
            kwonlyargs=[],
            kw_defaults=[],
            defaults=[],
        ),
        body=[body],
        decorator_list=[],
        returns=None,
    )
    if "type_params" in ast.FunctionDef._fields:
        setattr(function, "type_params", [])  # noqa: B010 - Python 3.12+ only
    for node in (function, body, keep):
        ast.copy_location(node, source.statements[0])
    module = ast.fix_missing_locations(ast.Module(body=[function], type_ignores=[]))
    compiled = compile(module, source.filename, "exec", flags=source.flags, dont_inherit=True)
    code = next(c for c in compiled.co_consts if isinstance(c, types.CodeType))
    label = "<trace body>"
    code = code.replace(co_name=label)
    if _HAS_QUALNAME:
        code = code.replace(co_qualname=label)  # type: ignore[call-arg,unused-ignore]
    _compiled[key] = code
    return code


_HAS_QUALNAME = hasattr(types.CodeType, "co_qualname")
