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
import dis
import sys
import types
from collections.abc import Iterator
from typing import Any

_LOADS_CONSTANT = frozenset({"LOAD_CONST", "RETURN_CONST", "LOAD_SMALL_INT"})
_PLAIN_CONSTANTS = (int, float, complex, str, bytes)


def runs_as(
    body: list[ast.stmt], spelled: set[str], code: types.CodeType, first: int, last: int
) -> bool:
    """Whether `body` (spelling the names `spelled`) is what `code` runs on lines
    `first..last`."""
    if not spelled <= _names_on_lines(code, first, last):
        return False
    constants = _constants_of(body)
    return constants is None or constants <= _constants_on_lines(code, first, last)


def _names_on_lines(code: types.CodeType, first: int, last: int) -> set[str]:
    """The names and attributes `code`'s instructions on lines `first..last` use."""
    names: set[str] = set()
    for instruction, line in instructions(code):
        if first <= line <= last:
            value = instruction.argval  # 3.13 pairs names: LOAD_FAST_LOAD_FAST ("a", "b")
            for name in value if isinstance(value, tuple) else (value,):
                if isinstance(name, str):
                    names.add(name)
    return names


def instructions(code: types.CodeType) -> Iterator[tuple[dis.Instruction, int]]:
    """Each instruction of `code` with its line (3.10 gives the line where one starts only)."""
    line = code.co_firstlineno
    for instruction in dis.get_instructions(code):
        if instruction.starts_line is not None:
            line = instruction.starts_line
        positions = getattr(instruction, "positions", None)
        yield instruction, positions.lineno if positions and positions.lineno else line


def _constants_of(statements: list[ast.stmt]) -> set[Any] | None:
    """The constants the compiler loads for `statements` as a function body (folded as it
    folds them in the caller), or None if they do not compile on their own (`nonlocal`, say)."""
    function = ast.FunctionDef(
        name="_",
        args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
        body=statements,
        decorator_list=[],
        returns=None,
    )
    if "type_params" in ast.FunctionDef._fields:
        setattr(function, "type_params", [])  # noqa: B010 - Python 3.12+ only
    module = ast.fix_missing_locations(ast.Module(body=[function], type_ignores=[]))
    try:
        compiled = compile(module, "<body>", "exec", dont_inherit=True)
    except SyntaxError:
        return None
    code = next(c for c in compiled.co_consts if isinstance(c, types.CodeType))
    return _constants_on_lines(code, 0, sys.maxsize)


def _constants_on_lines(code: types.CodeType, first: int, last: int) -> set[Any]:
    """The constants `code`'s instructions on lines `first..last` load, as (type, value) pairs
    (1 and 1.0 and True are different constants). The qualified name Python 3.10 loads before
    making a function depends on the enclosing function's name, not the body: it is left out."""
    found = set()
    listed = list(instructions(code))
    for position, (instruction, line) in enumerate(listed):
        if not first <= line <= last or instruction.opname not in _LOADS_CONSTANT:
            continue
        value = instruction.argval
        following = listed[position + 1][0].opname if position + 1 < len(listed) else ""
        if isinstance(value, _PLAIN_CONSTANTS) and following != "MAKE_FUNCTION":
            found.add((type(value), value))
    return found
