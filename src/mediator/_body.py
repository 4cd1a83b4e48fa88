"""Compiling the body of a `with` block into a function a mediator thread can run.

`make_body` turns a `BodySource` (found by `_source.py`) into a function of the caller's
globals, and the arguments to call it with. `compile_body` compiles the body inside a copy of
its context (the enclosing class, for name mangling and the `__class__` cell of `super()`; the
enclosing function's `global` declarations and future flags), whose parameters are the
enclosing names it uses, whose loads of names bound by earlier bodies of the trace go through a
lookup that waits for them, and which hands its final locals back as it ends. A name the body
binds that another body binds, or a later one reads (`shared`), is never a parameter: its frame
says whether the body has bound it yet; until it has, a load of it (`mixed`: shared and read)
goes through the lookup as well: `(name if __mediator_bound__("name") else
__mediator_name__("name"))`, in nested scopes too, and `name += v` becomes
`name = operator.iadd(<that load>, v)`. Compiled code keeps the user's file name, line numbers
and qualified names, so tracebacks point at the user's own lines. This module owns one cache,
`_compiled`: the code per body, parameters and cross-body and mixed names, emptied when it grows
past 4096 entries.
"""

from __future__ import annotations

import ast
import builtins
import copy
import operator
import sys
import types
from collections.abc import Callable
from typing import Any

from ._source import CLASS_CELL, BodySource, assigned_names

#: Names the compiled body reaches through its closure: the mediator's hooks.
_KEEP, _LOOKUP, _LOCALS = "__mediator_keep__", "__mediator_name__", "__mediator_locals__"
_SCOPE, _BODY = "__mediator_scope__", "__mediator_body__"
_BOUND, _INPLACE = "__mediator_bound__", "__mediator_inplace__"
_HOOKS = (_KEEP, _LOOKUP, _LOCALS, _BOUND, _INPLACE)

_Key = tuple[BodySource, tuple[str, ...], frozenset[str], frozenset[str]]
_compiled: dict[_Key, types.CodeType] = {}

#: The `operator` function of each augmented assignment (`h += v` is `h = iadd(h, v)`).
_INPLACE_OPS = {
    ast.Add: "iadd",
    ast.Sub: "isub",
    ast.Mult: "imul",
    ast.MatMult: "imatmul",
    ast.Div: "itruediv",
    ast.FloorDiv: "ifloordiv",
    ast.Mod: "imod",
    ast.Pow: "ipow",
    ast.LShift: "ilshift",
    ast.RShift: "irshift",
    ast.BitOr: "ior",
    ast.BitXor: "ixor",
    ast.BitAnd: "iand",
}


class _CrossLoads(ast.NodeTransformer):
    """Rewrites loads of `cross` names (bound by earlier bodies, not by this one) into
    `__mediator_name__("name")`, and loads of `mixed` names (bound by this body and another)
    into `(name if __mediator_bound__("name") else __mediator_name__("name"))`, except where a
    nested scope binds the name itself."""

    def __init__(
        self, cross: frozenset[str], mixed: frozenset[str], mangle: Callable[[str], str]
    ) -> None:
        self.cross = cross
        self.mixed = mixed
        self.mangle = mangle
        self.shadowed: list[set[str]] = []

    def _visible(self, node: ast.Name) -> bool:
        return not any(node.id in scope for scope in self.shadowed)

    def _load(self, node: ast.Name) -> ast.expr:
        name = self.mangle(node.id)
        lookup = _call(_LOOKUP, ast.Constant(name))
        if name in self.cross:
            return ast.copy_location(lookup, node)
        own = ast.Name(id=node.id, ctx=ast.Load())
        load = ast.IfExp(test=_call(_BOUND, ast.Constant(name)), body=own, orelse=lookup)
        return ast.copy_location(load, node)

    def visit_Name(self, node: ast.Name) -> ast.AST:
        name = self.mangle(node.id)
        if (
            isinstance(node.ctx, ast.Load)
            and (name in self.cross or name in self.mixed)
            and self._visible(node)
        ):
            return self._load(node)
        return node

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST:
        target = node.target
        if not (
            isinstance(target, ast.Name)
            and self.mangle(target.id) in self.mixed
            and self._visible(target)
        ):
            return self.generic_visit(node)
        op = ast.Constant(_INPLACE_OPS[type(node.op)])
        value = _call(_INPLACE, op, self._load(target), self.visit(node.value))
        store = ast.Name(id=target.id, ctx=ast.Store())
        return ast.copy_location(ast.Assign(targets=[store], value=value), node)

    def _scoped(self, node: ast.AST, bound: set[str]) -> ast.AST:
        self.shadowed.append(bound)
        try:
            return self.generic_visit(node)
        finally:
            self.shadowed.pop()

    def visit_Lambda(self, node: ast.Lambda) -> ast.AST:
        return self._scoped(node, _argument_names(node.args))

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        return self._scoped(node, _argument_names(node.args) | assigned_names(node.body)[0])

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


def _call(hook: str, *args: ast.expr) -> ast.Call:
    return ast.Call(func=ast.Name(id=hook, ctx=ast.Load()), args=list(args), keywords=[])


def _inplace(op: str, target: Any, value: Any) -> Any:
    """`target op= value`, as the augmented assignment would compute it."""
    return getattr(operator, op)(target, value)


def _argument_names(arguments: ast.arguments) -> set[str]:
    every = arguments.posonlyargs + arguments.args + arguments.kwonlyargs
    names = {arg.arg for arg in every}
    for extra in (arguments.vararg, arguments.kwarg):
        if extra is not None:
            names.add(extra.arg)
    return names


def _parameters(
    source: BodySource, scope: dict[str, Any], hidden: frozenset[str]
) -> tuple[str, ...]:
    """The body function's parameters: the enclosing names it gets (not the `hidden` ones),
    the enclosing function's first parameter first (zero-argument `super()` reads it there)."""
    names = sorted(name for name in scope if name not in hidden and name != CLASS_CELL)
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
    shared: frozenset[str] = frozenset(),
) -> tuple[types.FunctionType, tuple[Any, ...]]:
    """The body as a function of the caller's globals, and the arguments to call it with.

    `cross` names are read through `lookup(...)`; `shared` names (those the body binds that
    another body binds too) are no parameters, and are read through `lookup(...)` until the
    body has bound them; as the body ends, for any reason, it calls `keep(locals())`.
    """
    params = _parameters(source, scope, cross | shared)
    mixed = shared & source.loads
    code = compile_body(source, params, cross, mixed)

    def bound(name: str) -> bool:
        """Whether the body running on this thread has bound `name` (outside the body, a
        closure it made reads its own cell)."""
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None and frame.f_code is not code:
            frame = frame.f_back
        return frame is None or name in frame.f_locals

    cells = {
        _KEEP: keep,
        _LOOKUP: lookup,
        _LOCALS: builtins.locals,
        _BOUND: bound,
        _INPLACE: _inplace,
        CLASS_CELL: scope.get(CLASS_CELL),
    }
    closure = tuple(types.CellType(cells[name]) for name in code.co_freevars)
    function = types.FunctionType(code, globals_, code.co_name, None, closure)
    return function, tuple(scope[name] for name in params)


def compile_body(
    source: BodySource,
    params: tuple[str, ...],
    cross: frozenset[str],
    mixed: frozenset[str],
) -> types.CodeType:
    """The code of a function `(*params)` running the body, with the hooks as free variables."""
    key = (source, params, cross, mixed)
    code = _compiled.get(key)
    if code is not None:
        return code
    statements = [_Undeclared().visit(copy.deepcopy(statement)) for statement in source.statements]
    if cross or mixed:
        loads = _CrossLoads(cross, mixed, source.mangle)
        statements = [loads.visit(statement) for statement in statements]
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
    function = function_def(_BODY, params, [*declared, body])
    scope = function_def(_SCOPE, _HOOKS, [function])
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
    if len(_compiled) > 4096:
        _compiled.clear()
    _compiled[key] = code
    return code


def function_def(name: str, params: tuple[str, ...], body: list[ast.stmt]) -> ast.FunctionDef:
    """A `def name(params): body` node, without decorators or annotations."""
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
