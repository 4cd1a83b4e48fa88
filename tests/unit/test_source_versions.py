"""The with-block pipeline (find the body, compile it, skip it in the caller, write its names
back) on every CPython installed here, without threads or torch: `_errors`, `_frames`, `_source`
and `_body` need only the standard library. The thread and torch side is tested on 3.11."""

from __future__ import annotations

import os
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT

SRC = str(ROOT / "src" / "mediator")

_PROGRAM = textwrap.dedent(
    '''
    import importlib.util, sys, types

    package = types.ModuleType("fake"); package.__path__ = [sys.argv[1]]
    sys.modules["fake"] = package
    for name in ("_errors", "_protocol", "_frames", "_match", "_source", "_body"):
        spec = importlib.util.spec_from_file_location(f"fake.{name}", f"{sys.argv[1]}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"fake.{name}"] = module
        spec.loader.exec_module(module)
    protocol, frames, source_, body_ = (
        sys.modules[f"fake.{n}"] for n in ("_protocol", "_frames", "_source", "_body")
    )

    class Run:
        """Runs the with-body as a compiled function, the way a trace does, then skips it."""

        def __init__(self, shared=frozenset(), mine=frozenset()):
            self.shared = shared
            self.mine = mine  # names the body binds that another body binds too

        def __enter__(self):
            frame = sys._getframe(1)
            body = source_.capture(frame, "Run()")
            scope = frames.read_names(frame, body.reads)
            if body.as_name:
                scope[body.as_name] = self
            cross = frozenset((body.loads - body.assigns) & self.shared)
            kept = []
            function, args = body_.make_body(
                body, scope, cross, frame.f_globals, kept.append, lambda name: ("shared", name),
                self.mine)
            function(*args)
            frames.write_names(frame, {n: kept[0][n] for n in body.assigns if n in kept[0]})
            if body.as_name:  # the skip lands where Python would bind it: bind it here
                frames.write_names(frame, {body.as_name: self})
            self.skipper = None
            if not body.trivial:
                self.skipper = frames.BodySkipper(frame)
            return self

        def __exit__(self, kind, error, tb):
            if self.skipper:
                self.skipper.restore()
            return kind is protocol.SkipBody

    calls = []

    def in_a_function(a):
        with Run() as run:
            b = a + 1
            squares = [b * i for i in range(3)]
            calls.append(b)
            adder = lambda k: k + b
        return b, squares, adder(10), run is not None

    result = in_a_function(1)
    assert result == (2, [0, 2, 4], 12, True), result
    assert calls == [2], calls  # the body ran once: by Run, and was skipped in the caller

    def rebinding(x):
        with Run():
            x = x * 3
        return x

    assert rebinding(5) == 15

    def shared_name():
        with Run(shared=frozenset({"other"})):
            seen = other
        return seen

    assert shared_name() == ("shared", "other")

    def own_name_later(h):
        with Run(mine=frozenset({"h"})):
            first = h  # not bound by the body yet: through the lookup, in every scope
            firsts = [h for _ in range(1)]
            early = lambda: h
            before = early()
            def nested():
                return h
            class Early:
                seen = h
            h = 1
            h += 1  # then its own binding, in every scope
            after = [h for _ in range(1)]
            class Late:
                seen = h
        seen = ("shared", "h")
        return first, firsts, before, Early.seen, h, after, early(), nested(), Late.seen, seen

    *got, seen = own_name_later(0)
    assert got == [seen, [seen], seen, seen, 2, [2], 2, 2, 2], got

    def one_line(v):
        with Run(): w = v * 2
        return w

    if sys.version_info >= (3, 11):
        assert one_line(4) == 8

    with Run():  # at module level: names go back into the module's namespace
        g = 40 + 2
    assert g == 42
    assert sys.gettrace() is None
    print("OK", sys.version_info[:2])
    '''
)


@pytest.mark.parametrize("version", ["3.10.13", "3.11.7", "3.12.1", "3.13.0"])
def test_with_block_pipeline_on_python(version: str, tmp_path: Path) -> None:
    python = f"/root/.pyenv/versions/{version}/bin/python"
    if not os.path.exists(python):
        pytest.skip(f"{python} is not installed")
    script = tmp_path / "program.py"  # a file, so the with-blocks have source
    script.write_text(_PROGRAM)
    done = subprocess.run(
        [python, "-I", str(script), SRC], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("OK"), done.stdout
