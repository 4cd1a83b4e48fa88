"""The run engine's release stack behaves as `contextlib.ExitStack` does for what it offers:
steps in reverse order, each whatever the others did, errors chained, `on_exit` may swallow.
Oracle: `contextlib.ExitStack` with the same steps."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest

from mediator._releases import Releases


def _run(stack_kind: str, fail_body: bool, fail_step: bool, swallow: bool) -> tuple[list, Any]:
    calls: list[Any] = []

    def plain(name: str) -> None:
        calls.append(name)
        if fail_step and name == "second":
            raise KeyError(name)

    def seeing(error: BaseException | None) -> bool:
        calls.append(("saw", type(error).__name__ if error else None))
        return swallow

    outcome: Any = None
    try:
        if stack_kind == "ours":
            with Releases() as release:
                release.on_exit(seeing)
                release.call(plain, "first")
                release.call(plain, "second")
                if fail_body:
                    raise ValueError("body")
        else:
            with contextlib.ExitStack() as stack:
                stack.push(lambda kind, error, tb: seeing(error))
                stack.callback(plain, "first")
                stack.callback(plain, "second")
                if fail_body:
                    raise ValueError("body")
    except BaseException as error:  # noqa: BLE001 - compared below
        context = error.__context__
        outcome = (type(error).__name__, type(context).__name__ if context else None)
    return calls, outcome


@pytest.mark.parametrize("fail_body", [False, True])
@pytest.mark.parametrize("fail_step", [False, True])
@pytest.mark.parametrize("swallow", [False, True])
def test_releases_match_exit_stack(fail_body, fail_step, swallow):
    assert _run("ours", fail_body, fail_step, swallow) == _run(
        "exit_stack", fail_body, fail_step, swallow
    )
