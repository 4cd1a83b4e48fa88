"""A with-body is plain Python: the same lines give the same result inside `with model.trace(x):`
as inside a `with` that does nothing (the oracle), at module level, in a function and in a method.

Each case is a snippet that binds `result`; it runs from a real file (so the body has source),
once with `CM = lambda: model.trace(x)` and once with `CM = lambda: nullcontext()`. Other
interpreters and IPython: `test_plain_python_versions.py`.
"""

from __future__ import annotations

import contextlib
import json
import os
import runpy
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MLP
from torch import nn

import mediator
from mediator import SourceUnavailableError, UsageError

_PLACEMENTS = {
    "module": "{code}\n",
    "function": "def run():\n{code:4}\n    return result\n\nresult = run()\n",
    "method": (
        "class Base:\n"
        "    def who(self):\n"
        "        return 'base'\n\n"
        "class Holder(Base):\n"
        "    def run(self):\n"
        "{code:8}\n"
        "        return result\n\n"
        "result = Holder().run()\n"
    ),
}


def _place(code: str, placement: str) -> str:
    template = _PLACEMENTS[placement]
    code = textwrap.dedent(code).strip("\n")
    for width in (4, 8):
        template = template.replace(f"{{code:{width}}}", textwrap.indent(code, " " * width))
    return template.replace("{code}", code)


def _run(path: Path, code: str, placement: str, cm: Any) -> Any:
    path.write_text(_place(code, placement))
    namespace = runpy.run_path(str(path), init_globals={"CM": cm, "contextlib": contextlib})
    return namespace["result"]


@pytest.fixture
def model() -> mediator.Model:
    torch.manual_seed(0)
    return mediator.Model(MLP())


def _compare(tmp_path: Path, model: mediator.Model, code: str, placement: str) -> Any:
    """The snippet's result traced, checked against the same snippet run plainly."""
    x = torch.randn(2, 8)
    plain = _run(tmp_path / "plain.py", code, placement, contextlib.nullcontext)
    traced = _run(tmp_path / "traced.py", code, placement, lambda: model.trace(x))
    assert traced == plain
    return traced


EVERYWHERE = ["module", "function", "method"]
IN_FUNCTIONS = ["function", "method"]


@pytest.mark.parametrize("placement", EVERYWHERE)
def test_as_target_and_earlier_names_stay_bound_after_an_exception(tmp_path, model, placement):
    code = """
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
    """
    assert _compare(tmp_path, model, code, placement) == (1, "boom", True)


@pytest.mark.parametrize("placement", EVERYWHERE)
def test_global_declared_around_the_body_applies(tmp_path, model, placement):
    code = """
        global G
        G = 0
        with CM():
            G = G + 5
        result = (G, globals()["G"])
    """
    assert _compare(tmp_path, model, code, placement) == (5, 5)


@pytest.mark.parametrize("placement", IN_FUNCTIONS)
def test_nonlocal_declared_around_the_body_applies(tmp_path, model, placement):
    code = """
        count = 0
        def bump():
            nonlocal count
            with CM():
                count += 1
        bump()
        bump()
        result = count
    """
    assert _compare(tmp_path, model, code, placement) == 2


def test_private_names_are_mangled_and_super_works_in_a_method(tmp_path, model):
    code = """
        self.__secret = 1
        with CM():
            self.__secret += 1
            __local = self.__secret * 10
            seen = super().who()
            cls = __class__.__name__
        result = (seen, cls, __local, self._Holder__secret)
    """
    assert _compare(tmp_path, model, code, "method") == ("base", "Holder", 20, 2)


@pytest.mark.parametrize("placement", EVERYWHERE)
def test_del_unbinds_and_a_walrus_in_a_comprehension_binds(tmp_path, model, placement):
    code = """
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
    """
    assert _compare(tmp_path, model, code, placement) == (False, [0, 2, 4], 4)


@pytest.mark.parametrize("placement", EVERYWHERE)
def test_definitions_in_a_body_get_their_plain_qualified_names(tmp_path, model, placement):
    code = """
        with CM():
            class Inner:
                def method(self):
                    pass
            def helper():
                return lambda: None
        result = (Inner.__qualname__, Inner.method.__qualname__, helper().__qualname__)
    """
    _compare(tmp_path, model, code, placement)


@pytest.mark.parametrize("placement", EVERYWHERE)
def test_context_managers_before_the_trace_apply_to_the_body(tmp_path, model, placement):
    code = """
        import torch
        with torch.no_grad(), CM():
            grad = torch.is_grad_enabled()
        result = grad
    """
    assert _compare(tmp_path, model, code, placement) is False


@pytest.mark.parametrize("later", ["torch.no_grad()", "open(__file__) as f"])
@pytest.mark.parametrize("placement", EVERYWHERE)
def test_context_managers_after_the_trace_are_a_usage_error(tmp_path, model, placement, later):
    code = f"""
        import torch
        ran = []
        with CM(), {later}:
            ran.append(1)
        result = ran
    """
    path = tmp_path / "later.py"
    x = torch.randn(2, 8)
    with pytest.raises(UsageError, match=r"later\.py:\d+.*Write them first") as caught:
        _run(path, code, placement, lambda: model.trace(x))
    assert later.split(" as ")[0] in str(caught.value)


def test_context_managers_after_a_trace_without_inputs_are_a_usage_error(tmp_path, model):
    code = """
        import torch
        with CM() as tr, torch.no_grad():
            with tr.invoke(torch.ones(1, 8)):
                grad = torch.is_grad_enabled()
        result = grad
    """
    with pytest.raises(UsageError, match="nest them"):
        _run(tmp_path / "later.py", code, "function", lambda: model.trace())


@pytest.mark.parametrize(
    ("statement", "hint"),
    [
        ("break", "set a flag"),
        ("continue", "set a flag"),
        ("return 1", "`return` it after"),
        ("yield 1", "yield them after"),
    ],
)
def test_leaving_the_body_is_a_usage_error_before_the_forward(tmp_path, model, statement, hint):
    code = f"""
        def run():
            for i in range(2):
                with CM():
                    h = 1
                    {statement}
        result = run()
        if hasattr(result, "__next__"):  # a generator function
            result = list(result)
    """
    path = tmp_path / "leaving.py"
    path.write_text(textwrap.dedent(code))
    calls: list[int] = []
    hook = model.layers[0]._module.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 8)
    with pytest.raises(UsageError, match=rf"leaving\.py:6 would leave the with-body.*{hint}"):
        runpy.run_path(str(path), init_globals={"CM": lambda: model.trace(x)})
    hook.remove()
    assert calls == []


@pytest.mark.parametrize("statement", ["await asyncio.sleep(0)", "return 1"])
def test_leaving_a_body_in_a_coroutine_is_a_usage_error(tmp_path, model, statement):
    code = f"""
        import asyncio
        async def run():
            with CM():
                h = 1
                {statement}
        result = asyncio.run(run())
    """
    path = tmp_path / "coroutine.py"
    path.write_text(textwrap.dedent(code))
    x = torch.randn(2, 8)
    word = statement.split()[0]
    with pytest.raises(UsageError, match=rf"`{word}` at .*coroutine\.py:6 would leave"):
        runpy.run_path(str(path), init_globals={"CM": lambda: model.trace(x)})


def test_leaving_an_invoke_resolves_the_futures_of_the_trace(tmp_path, model):
    code = """
        import torch
        futures = []
        def run():
            with model.trace() as tr:
                futures.append(tr.invoke(torch.ones(1, 8)).run(lambda: 1))
                for i in range(2):
                    with tr.invoke(torch.ones(1, 8)):
                        break
        try:
            run()
        except Exception as error:
            result = (error, futures[0].exception(timeout=0))
    """
    path = tmp_path / "futures.py"
    path.write_text(textwrap.dedent(code))
    raised, held = runpy.run_path(str(path), init_globals={"model": model})["result"]
    assert isinstance(raised, UsageError) and held is raised


def test_an_edited_file_never_runs_another_blocks_body(tmp_path, model):
    first = "def first(CM):\n    with CM():\n        which = 'first'\n    return which\n\n"
    second = "def second(CM):\n    with CM():\n        other = 'second'\n    return other\n\n"
    path = tmp_path / "edited.py"
    path.write_text(first + second)
    functions = runpy.run_path(str(path))
    path.write_text(second.replace("second", "first") + first.replace("first", "second"))
    x = torch.randn(2, 8)
    with pytest.raises(SourceUnavailableError, match=r"edited\.py:2.*changed after it was import"):
        functions["first"](lambda: model.trace(x))


def test_a_body_read_before_its_file_was_edited_runs_as_imported(tmp_path, model):
    path = tmp_path / "edited.py"
    path.write_text("def first(CM):\n    with CM():\n        which = 'first'\n    return which\n")
    first = runpy.run_path(str(path))["first"]
    x = torch.randn(2, 8)
    assert first(lambda: model.trace(x)) == "first"
    path.write_text("def first(CM):\n    with CM():\n        which = 'edited'\n    return which\n")
    assert first(lambda: model.trace(x)) == "first"


def test_identical_functions_in_two_files_keep_their_own_file(tmp_path, model):
    code = "def fail(CM):\n    with CM():\n        raise KeyError('x')\n"
    x = torch.randn(2, 8)
    for name in ("one.py", "two.py"):
        path = tmp_path / name
        path.write_text(code)
        with pytest.raises(KeyError) as caught:
            runpy.run_path(str(path))["fail"](lambda: model.trace(x))
        files = [frame.filename for frame in traceback.extract_tb(caught.value.__traceback__)]
        assert files[-1] == str(path)


def test_python_dash_c_has_source(model):
    program = textwrap.dedent(
        """
        import torch, mediator
        from torch import nn
        model = mediator.Model(nn.Sequential(nn.Linear(2, 2)))
        with model.trace(torch.ones(1, 2)):
            out = model[0].output
        print(tuple(out.shape))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(1, 2)"


def test_exec_of_a_string_names_the_function_form(model):
    code = "with model.trace(x):\n    h = model.layers[0].output\n"
    with pytest.raises(SourceUnavailableError) as caught:
        exec(code, {"model": model, "x": torch.randn(2, 8)})
    message = str(caught.value)
    assert "exec() of a string" in message and ".run(fn)" in message
    assert "REPL" not in message


def test_a_body_frame_has_no_protocol_parameters_and_the_users_line(tmp_path, model):
    code = """
        with CM():
            a = 1
            raise IndexError("here")
    """
    path = tmp_path / "frames.py"
    x = torch.randn(2, 8)
    with pytest.raises(IndexError) as caught:
        _run(path, code, "function", lambda: model.trace(x))
    tb = caught.value.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    assert tb.tb_lineno == 4
    assert tb.tb_frame.f_code.co_name == "run"
    assert not any(name.startswith("__mediator") for name in tb.tb_frame.f_code.co_varnames)


def test_a_debugger_steps_through_a_body_without_jumping_back(tmp_path, model):
    code = """
        import sys
        lines = []
        def trace(frame, event, arg):
            if frame.f_code.co_filename == __file__ and frame.f_code.co_name == "run":
                if event == "line":
                    lines.append(frame.f_lineno)
                return trace
            return None
        with CM():
            sys.settrace(trace)
            a = 1
            b = 2
            sys.settrace(None)
        result = lines
    """
    x = torch.randn(2, 8)
    lines = _run(tmp_path / "steps.py", code, "function", lambda: model.trace(x))
    assert lines == sorted(lines), lines


@pytest.mark.parametrize("kind", ["generator", "coroutine"])
def test_run_with_a_generator_or_coroutine_function_is_a_usage_error(model, kind):
    def generator():
        yield 1

    async def coroutine():
        return 1

    fn = generator if kind == "generator" else coroutine
    with model.trace() as tr:
        with pytest.raises(UsageError, match=f"{kind} function"):
            tr.invoke(torch.ones(1, 8)).run(fn)
        tr.invoke(torch.ones(1, 8)).run(lambda: None)


def test_a_module_registered_twice_is_indexed_as_the_module_is():
    shared = nn.Linear(4, 4)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    model = mediator.Model(net)
    assert len(model) == len(net) == 3
    assert [envoy._module for envoy in model] == list(net)
    assert model[2]._module is net[2]
    assert model[-1] is model[0]
    with model.trace(torch.ones(1, 4)):
        first = model[2].output
    assert first.shape == (1, 4)


_IPYTHON_CELLS = textwrap.dedent(
    """
    import contextlib, io, json, sys
    sys.path.append(sys.argv[1])  # where IPython is installed, if not with torch
    from IPython.core.interactiveshell import InteractiveShell

    shell = InteractiveShell.instance()
    shell.run_line_magic("colors", "NoColor")
    shell.run_cell("import torch, mediator\\nfrom torch import nn\\n"
                   "model = mediator.Model(nn.Sequential(nn.Linear(2, 2)))", store_history=True)
    shown = []
    for cell in [
        "x = torch.ones(1, 2)\\nwith model.trace(x) as tr:\\n    h = model[0].output\\n"
        "    raise IndexError(h.shape)\\n",
        "%%time\\nwith model.trace(torch.ones(1, 2)):\\n    timed = model[0].output\\n",
    ]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            shell.run_cell(cell, store_history=True)
        shown.append(out.getvalue())
    names = [name in shell.user_ns for name in ("tr", "h", "timed")]
    print(json.dumps([shown, names]))
    """
)


def test_ipython_shows_the_cells_own_line_and_binds_names():
    major, minor, micro = sys.version_info[:3]
    site = f"/root/.pyenv/versions/{major}.{minor}.{micro}/lib/python{major}.{minor}/site-packages"
    done = subprocess.run(
        [sys.executable, "-c", _IPYTHON_CELLS, site],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "No module named 'IPython'" in done.stderr:
        pytest.skip("IPython is not installed for this interpreter")
    assert done.returncode == 0, done.stderr
    (error, timed), names = json.loads(done.stdout.strip().splitlines()[-1])
    assert "----> 4     raise IndexError(h.shape)" in error, error
    assert "__mediator" not in error
    assert "Wall time" in timed, timed
    assert names == [True, True, True]


def test_a_reloaded_module_runs_its_new_body(tmp_path, monkeypatch):
    """Edit a module's file and `importlib.reload` it (the notebook workflow): its with-body runs
    the new code, also when only a constant changed and `linecache` still holds the old text,
    and when the edit moved the body to other lines (oracle: a plain function of the same
    module, which Python reloads as it should)."""
    import importlib

    module_file = tmp_path / "reloaded_probe.py"
    template = textwrap.dedent(
        """
        {padding}
        def traced(model, x):
            with model.trace(x):
                out = model.layers[0].output {op} {factor}
            return out


        def plain(model, x):
            return model.layers[0](x) {op} {factor}
        """
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    net = MLP()
    model = mediator.Model(net)
    x = torch.randn(2, 8)
    module_file.write_text(template.format(padding="", op="*", factor=1))
    probe = importlib.import_module("reloaded_probe")
    try:
        torch.testing.assert_close(probe.traced(model, x), probe.plain(model, x))
        for padding, op, factor in [("", "*", 5), ("# moved\n# down", "*", 7), ("", "/", 7)]:
            module_file.write_text(template.format(padding=padding, op=op, factor=factor))
            os.utime(module_file, (time.time() + factor, time.time() + factor))  # a new mtime
            probe = importlib.reload(probe)
            expected = probe.plain(model, x)
            torch.testing.assert_close(probe.traced(model, x), expected)
            plain_value = net.layers[0](x)
            want = plain_value * factor if op == "*" else plain_value / factor
            torch.testing.assert_close(expected, want)
    finally:
        sys.modules.pop("reloaded_probe", None)


def test_code_the_compiler_drops_is_no_sign_of_an_edited_file(model, x):
    """A body whose compiled code lacks some of its source (code after a `raise`, the dead
    branch of a constant test) is still recognised as the code that runs (oracle: the same
    lines without the library)."""
    for trace in (model.trace, lambda x: contextlib.nullcontext()):
        with pytest.raises(ValueError, match="stop here"):
            with trace(x):
                raise ValueError("stop here")
                unreachable = model.layers[0].output  # noqa: F841
        with trace(x):
            c = 1 if True else model.no_such_module
        assert c == 1
