"""Whether a with-body recovered from source is the code the caller actually runs.

A file can change after it was imported, and a module can be reloaded while `linecache` still
holds the text it had before; either way the body found at the caller's lines may not be the
code Python compiled there. `runs_as` compares the two: every name and attribute the body spells
must be used by the caller's instructions on the body's lines, and every constant the body
loads (numbers, strings, folded as the compiler folds them) must be loaded there too. This
module owns no state.
"""

from __future__ import annotations

import ast
import copy
import dis
import sys
import types
from collections.abc import Iterator
from typing import Any

_LOADS_CONSTANT = frozenset({"LOAD_CONST", "RETURN_CONST", "LOAD_SMALL_INT"})
_PLAIN_CONSTANTS = (int, float, complex, str, bytes)
_CELLS = frozenset({"MAKE_CELL", "LOAD_CLOSURE", "COPY_FREE_VARS"})  # scope plumbing only
_OPERATORS = ("BINARY_", "UNARY_", "INPLACE_", "COMPARE_OP", "CONTAINS_OP", "IS_OP")


def runs_as(
    body: list[ast.stmt],
    spelled: set[str],
    code: types.CodeType,
    first: int,
    last: int,
    owner: str | None = None,
) -> bool:
    """Whether `body` is what `code` runs on lines `first..last`. The body is compiled on its
    own, as a function (inside class `owner`, for name mangling), so that the compiler drops and
    folds exactly what it dropped and folded in the caller (code after a `raise`, a branch of a
    constant test); its names and constants must then all be used on those lines. A body that
    does not compile on its own (`nonlocal`, say) is compared by the names it `spelled`."""
    alone = _compile_alone(body, owner)
    if alone is None:
        return spelled <= _names_on_lines(code, first, last)
    everywhere = (0, sys.maxsize)
    return _names_on_lines(alone, *everywhere) <= _names_on_lines(
        code, first, last
    ) and _constants_on_lines(alone, *everywhere) <= _constants_on_lines(code, first, last)


def _names_on_lines(code: types.CodeType, first: int, last: int) -> set[str]:
    """The names, attributes, strings and operators `code`'s instructions on lines
    `first..last` use."""
    names: set[str] = set()
    for instruction, line, following in _listed(code):
        if (
            first <= line <= last
            and not _qualname(instruction, following)
            and instruction.opname not in _CELLS
        ):
            if instruction.opname.startswith(_OPERATORS):  # `* 2` and `/ 2` differ here
                names.add(f"{instruction.opname} {instruction.argrepr}")
            value = instruction.argval  # 3.13 pairs names: LOAD_FAST_LOAD_FAST ("a", "b")
            for name in value if isinstance(value, tuple) else (value,):
                if isinstance(name, str):
                    names.add(name)
    return names


def _qualname(instruction: dis.Instruction, following: str) -> bool:
    """Python 3.10 loads a function's qualified name before making it: it depends on the
    enclosing function's name, not on the body."""
    return instruction.opname == "LOAD_CONST" and following == "MAKE_FUNCTION"


def _listed(code: types.CodeType) -> list[tuple[dis.Instruction, int, str]]:
    """Each instruction of `code`, its line, and the name of the instruction after it."""
    listed = list(instructions(code))
    names = [instruction.opname for instruction, _ in listed[1:]] + [""]
    pairs = zip(listed, names, strict=True)
    return [(instruction, line, name) for (instruction, line), name in pairs]


def instructions(code: types.CodeType) -> Iterator[tuple[dis.Instruction, int]]:
    """Each instruction of `code` with its line (3.10 gives the line where one starts only)."""
    line = code.co_firstlineno
    for instruction in dis.get_instructions(code):
        if instruction.starts_line is not None:
            line = instruction.starts_line
        positions = getattr(instruction, "positions", None)
        yield instruction, positions.lineno if positions and positions.lineno else line


def _compile_alone(statements: list[ast.stmt], owner: str | None) -> types.CodeType | None:
    """The code of `statements` compiled as the body of a function (in a class named `owner`,
    if given), or None if they do not compile on their own."""
    function = ast.FunctionDef(
        name="_",
        args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
        body=copy.deepcopy(statements),  # its own nodes: compiling shared ones from two
        decorator_list=[],  # threads at once trips CPython's AST recursion-depth check
        returns=None,
    )
    if "type_params" in ast.FunctionDef._fields:
        setattr(function, "type_params", [])  # noqa: B010 - Python 3.12+ only
    outer: ast.stmt = function
    if owner is not None:
        outer = ast.ClassDef(name=owner, bases=[], keywords=[], body=[function], decorator_list=[])
        if "type_params" in ast.ClassDef._fields:
            setattr(outer, "type_params", [])  # noqa: B010 - Python 3.12+ only
    module = ast.fix_missing_locations(ast.Module(body=[outer], type_ignores=[]))
    try:
        compiled = compile(module, "<body>", "exec", dont_inherit=True)
    except SyntaxError:
        return None
    for _ in range(2 if owner is not None else 1):  # into the class, then the function
        compiled = next(c for c in compiled.co_consts if isinstance(c, types.CodeType))
    return compiled


def _constants_on_lines(code: types.CodeType, first: int, last: int) -> set[Any]:
    """The constants `code`'s instructions on lines `first..last` load, as (type, value) pairs
    (1 and 1.0 and True are different constants)."""
    found = set()
    for instruction, line, following in _listed(code):
        value = instruction.argval
        if (
            first <= line <= last
            and instruction.opname in _LOADS_CONSTANT
            and isinstance(value, _PLAIN_CONSTANTS)
            and not _qualname(instruction, following)
        ):
            found.add((type(value), value))
    return found
