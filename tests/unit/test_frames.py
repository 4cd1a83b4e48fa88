"""Unit tests of `mediator._frames`: reading and writing the names of the frame that holds a
`with` block (function locals, cells, module and class namespaces), releasing what was written
(the f_locals snapshot of CPython 3.11/3.12 keeps what it holds), skipping a body; and, in
subprocesses, the same on the other CPython versions installed here (PEP 667 on 3.13)."""

# Bodies read values only to make a request (B018) and bind names to show they are bound (F841).
# ruff: noqa: B018, F841

from __future__ import annotations

import gc
import os
import subprocess
import sys
import textwrap
import weakref

import pytest
from conftest import ROOT

from mediator._frames import BodySkipper, read_names, write_names
from mediator._protocol import SkipBody

SRC = str(ROOT / "src" / "mediator")


class Value:
    """Weak-referenceable, compared by identity."""


# -- read_names ---------------------------------------------------------------------------------


def test_read_names_in_a_function():
    a = Value()
    b = "text"
    found = read_names(sys._getframe(), ["a", "b", "missing"])
    assert found.keys() == {"a", "b"}
    assert found["a"] is a and found["b"] is b


def test_read_names_skips_unbound_locals():
    found = read_names(sys._getframe(), ["later"])
    assert found == {}
    later = 1
    assert later == 1


def test_read_names_of_a_cell_and_a_free_variable():
    cell = Value()

    def inner() -> dict:
        free = cell
        return read_names(sys._getframe(), ["cell", "free"])

    found = inner()
    assert found["cell"] is cell and found["free"] is cell


def test_read_names_leaves_no_reference_to_what_it_read():
    a = Value()
    ref = weakref.ref(a)
    found = read_names(sys._getframe(), ["a"])
    assert found["a"] is a
    del a, found
    gc.collect()
    assert ref() is None


def test_read_names_leaves_no_reference_to_other_locals():
    a = Value()
    other = Value()
    ref = weakref.ref(other)
    read_names(sys._getframe(), ["a"])
    del other
    gc.collect()
    assert ref() is None


def test_read_names_at_module_level():
    namespace = {"read": read_names, "sys": sys, "q": 5}
    exec("found = read(sys._getframe(), ('q', 'nope'))", namespace)
    assert namespace["found"] == {"q": 5}
    assert namespace["q"] == 5  # module namespaces are not popped


# -- write_names --------------------------------------------------------------------------------


def test_write_names_binds_function_locals():
    if False:  # makes `bound` a local of this function, as a skipped with-body does
        bound = None
    write_names(sys._getframe(), {"bound": 42})
    assert bound == 42


def test_write_names_overwrites_and_leaves_the_rest_alone():
    kept = "kept"
    replaced = "old"
    if False:
        unbound = None
    write_names(sys._getframe(), {"replaced": "new"})
    assert replaced == "new"
    assert kept == "kept"
    with pytest.raises(UnboundLocalError):
        unbound  # noqa: B018


def test_write_names_twice_keeps_both():
    """Each call writes its own snapshot back: the second read of f_locals loses nothing."""
    if False:
        first = second = None
    frame = sys._getframe()
    write_names(frame, {"first": 1})
    write_names(frame, {"second": 2})
    assert (first, second) == (1, 2)


def test_write_names_empty_does_nothing():
    a = 1
    write_names(sys._getframe(), {})
    assert a == 1


def test_write_names_then_del_releases_the_value():
    """On 3.11/3.12 the f_locals snapshot would keep a written value alive after
    the user deletes the name, unless the writer removes it from the snapshot."""
    if False:
        held = None
    write_names(sys._getframe(), {"held": Value()})
    ref = weakref.ref(held)
    del held
    gc.collect()
    assert ref() is None


def test_write_names_leaves_no_reference_to_other_locals():
    """Reading f_locals on 3.11/3.12 copies every local into the snapshot: it must not keep
    them alive after the user deletes them."""
    if False:
        bound = None
    other = Value()
    ref = weakref.ref(other)
    write_names(sys._getframe(), {"bound": 1})
    del other
    gc.collect()
    assert bound == 1
    assert ref() is None


def test_write_names_into_a_cell_variable():
    if False:
        cell = None

    def inner():
        return cell  # noqa: F821 - bound by write_names, deleted below

    write_names(sys._getframe(), {"cell": 7})
    assert cell == 7
    assert inner() == 7


def test_write_names_into_a_free_variable_reaches_the_enclosing_function():
    shared = "outer"

    def inner() -> str:
        nonlocal shared
        if False:
            shared = None
        write_names(sys._getframe(), {"shared": "written by inner"})
        return shared

    assert inner() == "written by inner"
    assert shared == "written by inner"


def test_write_names_into_a_cell_then_del_releases_the_value():
    if False:
        cell = None

    def inner():
        return cell  # noqa: F821 - bound by write_names, deleted below

    write_names(sys._getframe(), {"cell": Value()})
    ref = weakref.ref(cell)
    assert inner() is ref()
    del cell
    gc.collect()
    assert ref() is None


def test_write_names_at_module_level():
    def bind() -> None:
        write_names(sys._getframe(1), {"z": 21})

    namespace = {"bind": bind}
    exec("bind()\nresult = z * 2", namespace)
    assert namespace["result"] == 42
    assert namespace["z"] == 21


def test_write_names_in_a_class_body():
    def bind() -> None:
        write_names(sys._getframe(1), {"z": 1})

    class Body:
        bind()
        w = z + 1  # noqa: F821 - bound by bind()

    assert Body.w == 2 and Body.z == 1


# -- BodySkipper --------------------------------------------------------------------------------


class _Skip:
    """Skips the body of its own `with` block, as a trace does."""

    def __enter__(self) -> _Skip:
        self.skipper = BodySkipper(sys._getframe(1))
        return self

    def __exit__(self, kind, error, tb) -> bool:
        self.skipper.restore()
        return kind is SkipBody


def test_body_skipper_skips_a_body_and_restores_tracing():
    before_global = sys.gettrace()
    frame = sys._getframe()
    before_local = frame.f_trace
    before_opcodes = frame.f_trace_opcodes
    ran = []
    with _Skip():
        ran.append("first")
        ran.append("second")
    ran.append("after")
    assert ran == ["after"]
    assert sys.gettrace() is before_global
    assert frame.f_trace is before_local
    assert frame.f_trace_opcodes == before_opcodes


def test_body_skipper_keeps_a_previous_trace_function():
    original = sys.gettrace()
    events = []

    def tracer(frame, event, arg):
        events.append((event, frame.f_code.co_name))
        return None

    def probe() -> None:
        pass

    sys.settrace(tracer)
    try:
        ran = []
        with _Skip():
            ran.append("body")
        reinstated = sys.gettrace()
        probe()
    finally:
        sys.settrace(original)
    assert ran == []
    assert reinstated is tracer
    assert ("call", "probe") in events  # and it goes on receiving events


def test_body_skipper_restore_twice_is_harmless():
    before = sys.gettrace()

    class Twice(_Skip):
        def __exit__(self, kind, error, tb) -> bool:
            self.skipper.restore()
            self.skipper.restore()
            return kind is SkipBody

    ran = []
    with Twice():
        ran.append("body")
    assert ran == [] and sys.gettrace() is before


def test_body_skipper_skips_an_inline_body():
    ran = []
    with _Skip(): ran.append("body")  # noqa: E701  # fmt: skip
    ran.append("after")
    assert ran == ["after"]


def _opens_try(ran: list[str]) -> None:
    with _Skip():
        try:
            ran.append("body")
        except BaseException:
            ran.append("handler")
        finally:
            ran.append("finally")


def _opens_with(ran: list[str]) -> None:
    with _Skip():
        with open(__file__):
            ran.append("body")


def _opens_for(ran: list[str]) -> None:
    with _Skip():
        for _ in range(2):
            ran.append("body")


@pytest.mark.parametrize("body", [_opens_try, _opens_with, _opens_for])
def test_body_skipper_skips_a_body_that_opens_a_block_first(body):
    """The body's first statement opens a block (`try:` compiles to an instruction no handler
    covers): nothing of the body runs in the caller, not even its handlers, because the skip
    lands before the body, inside the with statement's own protected range."""
    ran: list[str] = []
    body(ran)
    assert ran == []


# -- other Python versions ----------------------------------------------------------------------

_CHECK = textwrap.dedent(
    """
    import gc, importlib.util, sys, types, weakref

    src = sys.argv[1]
    package = types.ModuleType("fakemed")
    package.__path__ = []
    sys.modules["fakemed"] = package

    def load(name):
        spec = importlib.util.spec_from_file_location("fakemed." + name, f"{src}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    errors = load("_errors")
    protocol = load("_protocol")
    frames = load("_frames")
    assert frames._PEP_667 == (sys.version_info >= (3, 13))

    class Value:
        pass

    def check_write():
        if False:
            bound = None
        kept = "kept"
        frames.write_names(sys._getframe(), {"bound": 42})
        assert bound == 42, bound
        assert kept == "kept"

    def check_twice():
        if False:
            first = second = None
        frame = sys._getframe()
        frames.write_names(frame, {"first": 1})
        frames.write_names(frame, {"second": 2})
        assert (first, second) == (1, 2)

    def check_release():
        if False:
            held = None
        frames.write_names(sys._getframe(), {"held": Value()})
        ref = weakref.ref(held)
        del held
        gc.collect()
        assert ref() is None, "a written value outlived its name"

    def check_cell():
        if False:
            cell = None
        def inner():
            return cell
        frames.write_names(sys._getframe(), {"cell": 7})
        assert cell == 7 and inner() == 7

    def check_read():
        a = Value()
        ref = weakref.ref(a)
        found = frames.read_names(sys._getframe(), ["a", "missing"])
        assert list(found) == ["a"] and found["a"] is a
        del a, found
        gc.collect()
        assert ref() is None, "a read value outlived its name"

    def check_module():
        namespace = {"bind": lambda: frames.write_names(sys._getframe(1), {"z": 21})}
        exec("bind()\\nresult = z * 2", namespace)
        assert namespace["result"] == 42

    def check_skipper():
        class Skip:
            def __enter__(self):
                frame = sys._getframe(1)
                line = frame.f_lineno + 1
                self.skipper = frames.BodySkipper(frame)
            def __exit__(self, kind, error, tb):
                self.skipper.restore()
                return kind is protocol.SkipBody
        ran = []
        with Skip():
            ran.append("body")
        ran.append("after")
        assert ran == ["after"], ran
        assert sys.gettrace() is None

    def check_other_locals():
        if False:
            bound = None
        other = Value()
        ref = weakref.ref(other)
        frames.read_names(sys._getframe(), ["missing"])
        frames.write_names(sys._getframe(), {"bound": 1})
        del other
        gc.collect()
        assert ref() is None, "the f_locals snapshot kept another local alive"

    checks = [check_write, check_twice, check_release, check_cell, check_read, check_module,
              check_skipper]
    if sys.argv[2:] == ["other-locals"]:
        checks = [check_other_locals]
    for check in checks:
        check()
    print("OK", sys.version_info[:2])
    """
)


VERSIONS = ["3.10.13", "3.12.1", "3.13.0"]


def _check_on(version: str, *extra: str) -> None:
    python = f"/root/.pyenv/versions/{version}/bin/python"
    if not os.path.exists(python):
        pytest.skip(f"{python} is not installed")
    done = subprocess.run(
        [python, "-I", "-c", _CHECK, SRC, *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK"), done.stdout


@pytest.mark.parametrize("version", VERSIONS)
def test_frames_on_other_python_versions(version):
    _check_on(version)


@pytest.mark.parametrize("version", VERSIONS)
def test_frames_keep_no_other_local_on_other_python_versions(version):
    _check_on(version, "other-locals")
