"""Carry the caller's thread-local torch state into a mediator thread, and take it out again.

Torch keeps grad mode, inference mode, autocast (for the CPU and CUDA: on or off, dtype, its
cache), the default device (`with torch.device(...)`, `torch.set_default_device`: a mode on the
thread's torch-function stack), saved-tensor hooks and the current CUDA device and stream per
thread; a fresh thread starts with the defaults. A body must compute under the state of the
thread that opened the trace (`with torch.no_grad(): with model.trace(x): ...` covers the body),
so each mediator sets the captured state (`TorchState.enter`) on its worker before it runs the
body.

Whatever a body changes ends with the body: when the job is over the worker pool calls `reset`,
which puts the worker's state back as a fresh thread has it (torch's defaults; the autocast dtypes
as read by `prepare` when the worker started), whether the body returned, raised or was
cancelled. A body's plain setter (`torch.set_grad_enabled(False)`, `torch.set_autocast_enabled`,
`torch.set_default_device`, a saved-tensor hook pushed and never popped) thus never reaches the
next trace that runs on the same thread. `reset` runs after the body's frame is gone and after a
pending cancellation was absorbed, so nothing interrupts it half-way. Torch has no setter for
inference mode, only guard objects: the caller's is held here for the body (`_local.guard`) and
dropped by `reset`; a thread left in inference mode by a guard the body kept alive cannot be put
back, and `reset` says so (the pool then ends that worker).

The default device is carried by pushing the caller's own `DeviceContext` (the torch-function
mode that `torch.device(...)` and `set_default_device` install) onto the worker's mode stack,
without entering it again: entering would change torch's process-wide record of the current
device (`torch.utils._device.CURRENT_DEVICE`). Other modes on the caller's stack are not carried.

This module owns `_local` of each worker thread: `base` (the autocast dtypes it started with) and
`guard` (the inference-mode guard held for the running body).

Cost per body: about 2 us (`enter` and `reset`, for a caller in torch's default state).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.utils._device import DeviceContext

_AUTOCAST_DEVICES = ("cpu", "cuda")
_ag = torch._C._autograd
_local = threading.local()  # of a worker thread: `base` dtypes, `guard`


class TorchState(NamedTuple):
    """The torch settings of one thread that a body must see (a tuple: read once per trace)."""

    grad_enabled: bool
    inference_mode: bool
    autocast: tuple[tuple[str, torch.dtype], ...]  # the devices it is on for, with their dtype
    autocast_cache: bool
    device: DeviceContext | None  # the default-device mode in force
    saved_tensors_hooks: tuple[Callable[..., Any], Callable[..., Any]] | None  # the top pair
    hooks_disabled: str | None  # `disable_saved_tensors_hooks`' message, if in force
    cuda_stream: Any

    @classmethod
    def capture(cls) -> TorchState:
        """Read the state of the calling thread."""
        autocast: tuple[tuple[str, torch.dtype], ...] = ()
        if torch._C._is_any_autocast_enabled():
            autocast = tuple(
                (device, torch.get_autocast_dtype(device))
                for device in _AUTOCAST_DEVICES
                if torch.is_autocast_enabled(device)
            )
        device = None
        for index in range(torch._C._len_torch_function_stack()):
            mode = torch._C._get_function_stack_at(index)
            if isinstance(mode, DeviceContext):
                device = mode
        stream = None
        if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            stream = torch.cuda.current_stream()
        return cls(
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            autocast,
            torch.is_autocast_cache_enabled(),
            device,
            _ag._top_saved_tensors_default_hooks(True),
            _ag._saved_tensors_hooks_get_disabled_error_message(),
            stream,
        )

    def enter(self) -> None:
        """Make the calling worker thread (in its state as `prepare`d) match this state; `reset`
        undoes it."""
        if self.inference_mode:
            _local.guard = torch._C._InferenceMode(True)  # first: it also sets grad mode
        if not self.grad_enabled:
            torch._C._set_grad_enabled(False)
        for device, dtype in self.autocast:
            torch.set_autocast_dtype(device, dtype)
            torch.set_autocast_enabled(device, True)
        if not self.autocast_cache:
            torch.set_autocast_cache_enabled(False)
        if self.device is not None:
            torch._C._push_on_torch_function_stack(self.device)
        if self.saved_tensors_hooks is not None:
            _ag._push_saved_tensors_default_hooks(*self.saved_tensors_hooks)
        if self.hooks_disabled is not None:
            _ag._saved_tensors_hooks_disable(self.hooks_disabled)
        if self.cuda_stream is not None:
            torch.cuda.set_device(self.cuda_stream.device)
            torch.cuda.set_stream(self.cuda_stream)


def prepare() -> None:
    """Note the state the calling (fresh) worker thread starts with, for `reset`."""
    _local.base = tuple(torch.get_autocast_dtype(device) for device in _AUTOCAST_DEVICES)
    _local.guard = None


def reset() -> bool:
    """Put the calling worker thread's torch state back to what it was at `prepare`; False if
    it stays in inference mode (a guard the body kept alive)."""
    _local.guard = None  # restores grad and inference mode as they were before `enter`
    if torch.is_inference_mode_enabled():
        return False
    if not torch.is_grad_enabled():
        torch._C._set_grad_enabled(True)
    if torch._C._is_any_autocast_enabled():
        for device in _AUTOCAST_DEVICES:
            torch.set_autocast_enabled(device, False)
    cpu_dtype, cuda_dtype = _local.base
    if torch.get_autocast_dtype("cpu") is not cpu_dtype:
        torch.set_autocast_dtype("cpu", cpu_dtype)
    if torch.get_autocast_dtype("cuda") is not cuda_dtype:
        torch.set_autocast_dtype("cuda", cuda_dtype)
    if not torch.is_autocast_cache_enabled():
        torch.set_autocast_cache_enabled(True)
    torch.clear_autocast_cache()  # casts cached while autocast was on hold weights' copies
    for _ in range(torch.autocast_increment_nesting()):  # the count is now one too many
        torch.autocast_decrement_nesting()
    if torch._C._len_torch_function_stack():
        if getattr(torch._GLOBAL_DEVICE_CONTEXT, "device_context", None) is not None:
            torch.set_default_device(None)  # the body's: its exit restores torch's own record
        while torch._C._len_torch_function_stack():
            torch._C._pop_torch_function_stack()
    while _ag._top_saved_tensors_default_hooks(True) is not None:
        _ag._pop_saved_tensors_default_hooks()
    if _ag._saved_tensors_hooks_get_disabled_error_message() is not None:
        _ag._saved_tensors_hooks_enable()
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        _reset_cuda()
    return True


def _reset_cuda() -> None:
    """Every device's current stream back to its default one, and device 0 current (where
    every thread starts)."""
    for index in range(torch.cuda.device_count()):
        default = torch.cuda.default_stream(index)
        if torch.cuda.current_stream(index) != default:
            torch.cuda.set_stream(default)
    if torch.cuda.current_device() != 0:
        torch.cuda.set_device(0)
