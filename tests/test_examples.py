"""Every example runs and says its results match plain PyTorch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("quickstart.py", "same as plain hooks: read yes, ablate yes, patch yes"),
        ("steering.py", "same tokens as a plain forward hook and as a solo run: yes"),
    ],
)
def test_example_runs_and_agrees_with_plain_pytorch(script: str, expected: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
