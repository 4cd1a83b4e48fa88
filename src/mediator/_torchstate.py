"""Carry the caller's thread-local torch state into a mediator thread.

Torch keeps grad mode, inference mode, autocast and the current CUDA device and stream per
thread; a fresh thread starts with the defaults. A body must compute under the state of the
thread that opened the trace (`with torch.no_grad(): with model.trace(x): ...` covers the body),
so each mediator enters the captured state before it runs the body and leaves it afterwards.
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import torch

_AUTOCAST_DEVICES = ("cpu", "cuda")


class TorchState(NamedTuple):
    """The torch settings of one thread that a body must see (a tuple: read once per trace)."""

    grad_enabled: bool
    inference_mode: bool
    autocast: tuple[tuple[str, Any], ...]
    cuda_stream: Any

    @classmethod
    def capture(cls) -> TorchState:
        """Read the state of the calling thread."""
        autocast = tuple(
            (device, torch.get_autocast_dtype(device))
            for device in _AUTOCAST_DEVICES
            if torch.is_autocast_enabled(device)
        )
        stream = None
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            stream = torch.cuda.current_stream()
        return cls(torch.is_grad_enabled(), torch.is_inference_mode_enabled(), autocast, stream)

    def enter(self, stack: contextlib.ExitStack) -> None:
        """Make the calling thread match this state until `stack` closes."""
        if self.inference_mode:
            stack.enter_context(torch.inference_mode())
        elif not self.grad_enabled:
            stack.enter_context(torch.no_grad())
        for device, dtype in self.autocast:
            stack.enter_context(torch.autocast(device_type=device, dtype=dtype))
        if self.cuda_stream is not None:
            stack.enter_context(torch.cuda.device(self.cuda_stream.device))
            stack.enter_context(torch.cuda.stream(self.cuda_stream))
