"""The plain-Python cases of `test_plain_python.py` on every CPython installed here, and in
IPython, without threads or torch: a runner runs each with-body the way a trace does (capture,
compile in context, write back, skip) but in the calling thread, and each snippet's result is
compared with the same snippet run plainly. The driver itself runs under `python -c`, so its own
with-block checks that source too."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
from pathlib import Path

import pytest
from conftest import ROOT
from test_plain_python import _place

SRC = str(ROOT / "src" / "mediator")
VERSIONS = ["3.10.13", "3.11.7", "3.12.1", "3.13.0"]

_DRIVER = textwrap.dedent(
    '''
    import contextlib, importlib.util, json, linecache, runpy, sys, types

    package = types.ModuleType("fake"); package.__path__ = [sys.argv[1]]
    sys.modules["fake"] = package
    for name in ("_errors", "_protocol", "_frames", "_match", "_source", "_body"):
        spec = importlib.util.spec_from_file_location(f"fake.{name}", f"{sys.argv[1]}/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"fake.{name}"] = module
        spec.loader.exec_module(module)
    errors, protocol, frames, source_, body_ = (
        sys.modules[f"fake.{n}"] for n in ("_errors", "_protocol", "_frames", "_source", "_body")
    )


    class Run:
        """Runs the with-body as a trace does, in this thread; then skips it."""

        def __enter__(self):
            frame = sys._getframe(1)
            body = source_.capture(frame, "Run()")
            scope = frames.read_names(frame, body.reads)
            frames.check_unbinding(frame, body.deletes, scope)
            if body.as_name:
                scope[body.as_name] = self
                frames.write_names(frame, {body.as_name: self})
            kept = []
            function, args = body_.make_body(
                body, scope, frozenset(), frame.f_globals, kept.append, None)
            try:
                function(*args)
            finally:
                final = kept[0]
                frames.write_names(frame, {
                    n: final.get(n, frames.UNBOUND)
                    for n in body.assigns if n in final or n in scope})
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


    def outcome(path, cm):
        try:
            return repr(runpy.run_path(path, init_globals={"CM": cm})["result"])
        except Exception as error:
            return f"{type(error).__name__}: {error}"


    report = {path: [outcome(path, contextlib.nullcontext), outcome(path, Run)]
              for path in sys.argv[2:]}

    with Run():  # this driver runs under `python -c`: its source is sys.orig_argv
        report["-c"] = "ran"

    try:
        exec("with Run():\\n    x = 1\\n", {"Run": Run})
    except errors.SourceUnavailableError as error:
        report["exec"] = str(error)

    if hasattr(linecache, "_register_code"):  # the 3.13 REPL keeps what was typed this way
        typed = "with Run():\\n    typed = 7\\n"
        linecache._register_code("<python-input-0>", typed, "<stdin>")
        namespace = {"Run": Run}
        exec(compile(typed, "<python-input-0>", "exec"), namespace)
        report["repl"] = namespace["typed"]
    print(json.dumps(report))
    '''
)

#: (snippet, placements) that need no torch; each result must equal the plain run's.
CASES = {
    "exception": (
        """
        a = 0
        try:
            with CM() as tr:
                a = 1
                raise ValueError("boom")
        except ValueError as error:
            caught = str(error)
        try:
            tr
            has_tr = True
        except NameError:
            has_tr = False
        result = (a, caught, has_tr)
        """,
        ["module", "function", "method"],
    ),
    "locals": (
        """
        a, b = 1, 2
        with CM():
            total = a + b
            if __debug__:
                checked = True
        result = (total, checked)
        """,
        ["module", "function", "method"],
    ),
    "global": (
        """
        global G
        G = 0
        with CM():
            G = G + 5
        result = (G, globals()["G"])
        """,
        ["module", "function", "method"],
    ),
    "nonlocal": (
        """
        count = 0
        def bump():
            nonlocal count
            with CM():
                count += 1
        bump()
        result = count
        """,
        ["function", "method"],
    ),
    "super": (
        """
        self.__secret = 1
        with CM():
            self.__secret += 1
            seen = super().who()
        result = (seen, self._Holder__secret)
        """,
        ["method"],
    ),
    "del-walrus": (
        """
        gone = 1
        with CM():
            del gone
            doubled = [last := i * 2 for i in range(3)]
        try:
            gone
            has_gone = True
        except NameError:
            has_gone = False
        result = (has_gone, doubled, last)
        """,
        ["module", "function", "method"],
    ),
    "del-temporary": (
        """
        with CM():
            temporary = 1
            del temporary
            kept = 2
        try:
            temporary
            has_temporary = True
        except NameError:
            has_temporary = False
        result = (has_temporary, kept)
        """,
        ["module", "function", "method"],
    ),
    "qualnames": (
        """
        with CM():
            class Inner:
                def method(self):
                    pass
        result = (Inner.__qualname__, Inner.method.__qualname__)
        """,
        ["module", "function", "method"],
    ),
}


def _drive(python: str, tmp_path: Path) -> tuple[dict[str, str], dict[str, object]]:
    paths = {}
    for case, (code, placements) in CASES.items():
        for placement in placements:
            path = tmp_path / f"{case}_{placement}.py".replace("-", "_")
            path.write_text(_place(code, placement))
            paths[str(path)] = f"{case}/{placement}"
    done = subprocess.run(
        [python, "-I", "-c", _DRIVER, SRC, *paths],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return paths, json.loads(done.stdout)


@pytest.mark.parametrize("version", VERSIONS)
def test_plain_python_cases_on_python(version: str, tmp_path: Path) -> None:
    python = f"/root/.pyenv/versions/{version}/bin/python"
    if not os.path.exists(python):
        pytest.skip(f"{python} is not installed")
    paths, report = _drive(python, tmp_path)
    for path, case in paths.items():
        plain, traced = report[path]
        if version >= "3.12" and case in ("del-walrus/function", "del-walrus/method"):
            assert traced.startswith("UsageError") and "write `del gone` after the" in traced
            continue
        assert traced == plain, case
    assert report["-c"] == "ran"
    assert "exec() of a string" in str(report["exec"]) and "REPL" not in str(report["exec"])
    if version.startswith("3.13"):
        assert report["repl"] == 7


_IPYTHON = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("colors", "NoColor")
    shell.run_cell(sys.argv[1], store_history=True)  # the driver, up to its report
    Run = shell.user_ns["Run"]
    report = {}

    def cell(text):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            shell.run_cell(text, store_history=True)
        return out.getvalue()

    cell("with Run() as tr:\\n    plain = 1\\n")
    report["cell"] = shell.user_ns.get("plain")
    cell("%%time\\nwith Run():\\n    timed = 2\\n")
    report["%%time"] = shell.user_ns.get("timed")
    cell("%time with Run(): line_timed = 3\\n")
    report["%time"] = shell.user_ns.get("line_timed")
    report["%timeit"] = cell("%timeit -n1 -r1 with Run(): timeit_line = 5\\n")
    report["%%timeit"] = cell("%%timeit -n1 -r1\\nwith Run():\\n    timeit_ran = 4\\n")
    report["traceback"] = cell("x = 1\\nwith Run():\\n    y = 2\\n    raise IndexError(y)\\n")
    report["def"] = cell(
        "def f():\\n    with Run():\\n        q = 1\\n        raise KeyError(q)\\nf()\\n"
    )
    print(json.dumps(report))
    """
)


def test_ipython_cells_and_magics_have_source(tmp_path: Path) -> None:
    python = "/root/.pyenv/versions/3.11.7/bin/python"
    if not os.path.exists(python):
        pytest.skip(f"{python} is not installed")
    check = subprocess.run([python, "-c", "import IPython"], capture_output=True, timeout=60)
    if check.returncode != 0:
        pytest.skip("IPython is not installed for 3.11")
    driver = _DRIVER.split("\ndef outcome")[0].replace("sys.argv[1]", repr(SRC))
    done = subprocess.run(
        [python, "-I", "-c", _IPYTHON, driver], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["cell"] == 1
    assert report["%%time"] == 2
    assert report["%time"] == 3
    assert "per loop" in report["%timeit"], report["%timeit"]
    assert "per loop" in report["%%timeit"], report["%%timeit"]
    shown = report["traceback"]
    assert re.search(r"----> 4\s+raise IndexError\(y\)", shown), shown
    assert "__mediator" not in shown
    shown = report["def"]
    assert re.search(r"in f\(\)\n(.*\n)*----> 4\s+raise KeyError\(q\)", shown), shown
    assert "__mediator" not in shown
