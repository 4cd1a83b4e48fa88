"""Misuse fuzzing (issue 4): random small models and random intervention programs, each checked
against an oracle that runs the same program without mediator.

What is drawn (hypothesis)
    A tiny model built from a seed (width 4-8): *sequential* (a chain of Linear / ReLU / Tanh /
    custom modules, some nested, some mixing rows of the batch), *branching* (a router whose forward
    calls one of its two children depending on a Python flag, so one child is never called) or
    *recurrent* (a cell called T times in one forward). Then 1-4 invokes (batch 1-3 rows each, or an
    empty invoke: the whole batch) and one program per invoke, run with `tr.invoke(x).run(fn)`:
    reads of `.output` / `.input`, swaps (`v * 2 + c` of the value read, a constant, or a constant
    of the WRONG shape), `skip(value)`, `for step in tr.iter[a:b]` / `[a:]` / `[k]` / `[[i, j]]`
    around reads and swaps, barriers shared by several invokes (sometimes with a party that never
    comes), a user exception, and misuse of the API. Operations are mostly in the order the model
    computes them, sometimes shuffled.

The oracle (`Sim`)
    Runs the same batched forward with every module's `forward` wrapped (the place where mediator
    meets a module; a forward hook would do for reads and swaps, but cannot skip a call) and
    simulates the user-facing contract (README) and the protocol in `_interleaver.py` with
    generators instead of threads: reads block until the model reaches the value; at each boundary
    invokes are served in definition order, each invoke's own earlier swaps and skips applied
    first; each invoke
    reads and writes only its own rows (an empty invoke: all rows); `tr.iter` steps select call
    numbers; an open loop wakes when a module starts a call numbered >= its step and ends when the
    forward returns; barriers release when all parties arrived. It predicts the values every
    program reads and the model output, or the error the trace must raise (and from which invoke):
    OutOfOrderError, MissedProviderError, ShapeError, MediatorError (a barrier not reached by all
    parties), UsageError, or the user's own exception.

    Where the contract does not decide, the oracle does not guess: once the forward has returned,
    several bodies may each wait for something it can no longer give, and which is told first is
    the library's choice, so any of their errors is accepted (`Sim.finish`); two empty invokes
    skipping the same call make values unpredicted, not the outcome (`Sim.run_skipped`).

After every example: no busy mediator worker, no tap, no hook, and the model computes exactly what
it computed before. A trace that does not return within `HANG_S` seconds fails the example.

Regression: BUG_OWN_EDIT (a body released early at a boundary by a barrier did not see its own
earlier set there), found by this fuzzer and fixed; its shrunk cases are tests at the end.

Runs `CI_EXAMPLES` + `WITH_EXAMPLES` examples by default (a few seconds). Soak run (more cases,
the same checks; the with-block form gets a tenth of them):

    MEDIATOR_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py -p no:cacheprovider

Add `-rP` to print how the cases ended, `--hypothesis-show-statistics` for hypothesis' own
counts. The example database is off; a failure prints the falsifying `Case`, which
`check_case(case)` replays.
"""

# Bodies read values only to make a request (B018); with-bodies bind names read back (F841).
# ruff: noqa: B018, F841

from __future__ import annotations

import functools
import os
import threading
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import torch
from conftest import busy_workers, hook_count, patched_forwards
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from torch import nn

import mediator
from mediator import (
    MediatorError,
    MissedProviderError,
    OutOfOrderError,
    ShapeError,
    UsageError,
    _workers,
)

SOAK = int(os.environ.get("MEDIATOR_FUZZ_EXAMPLES", "0") or 0)
CI_EXAMPLES = 250
WITH_EXAMPLES = 50
FUNCTION_EXAMPLES = SOAK or CI_EXAMPLES
WITH_FORM_EXAMPLES = max(WITH_EXAMPLES, SOAK // 10) if SOAK else WITH_EXAMPLES
HANG_S = 30.0  # one trace of a tiny model takes milliseconds; this long is a hang
TEST_TIMEOUT = 60 + 2 * max(FUNCTION_EXAMPLES, WITH_FORM_EXAMPLES)  # pytest-timeout, seconds

FUZZ = settings(
    deadline=None,
    derandomize=False,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)

OUTCOMES: Counter[str] = Counter()  # outcome of every example run in this session


class FuzzError(Exception):
    """The user's own exception, raised by a program: it must reach the caller unchanged."""


# == models ========================================================================================


class Scale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


class Mix(nn.Module):
    """Mixes the rows of the batch: an edit of one invoke's rows reaches every other invoke."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * x.mean(0, keepdim=True)


class Chain(nn.Module):
    """Sequential: `blocks` (a ModuleList, never called itself) one after another, then `head`."""

    def __init__(self, blocks: list[nn.Module], head: nn.Module | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.head is None else self.head(x)


class Router(nn.Module):
    """Calls `a` or `b` depending on a Python flag: the other child is never called."""

    def __init__(self, a: nn.Module, b: nn.Module, flag: bool) -> None:
        super().__init__()
        self.a = a
        self.b = b
        self.flag = flag

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) if self.flag else self.b(x)


class Branching(nn.Module):
    def __init__(self, width: int, router: Router, calls: int, head: nn.Module | None) -> None:
        super().__init__()
        self.pre = nn.Linear(width, width)
        self.router = router
        self.calls = calls
        self.post = head if head is not None else nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        for _ in range(self.calls):
            h = self.router(h)
        return self.post(h)


class Cell(nn.Module):
    def __init__(self, width: int, mixed: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.mix = Mix() if mixed else None

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        z = self.lin(h)
        if self.mix is not None:
            z = self.mix(z)
        return torch.tanh(z + x)


class Recurrent(nn.Module):
    """`cell` is called `steps` times in one forward: calls 0..steps-1 of one module."""

    def __init__(self, width: int, steps: int, mixed: bool, head: nn.Module | None) -> None:
        super().__init__()
        self.encode = nn.Linear(width, width)
        self.cell = Cell(width, mixed)
        self.steps = steps
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encode(x)
        h = torch.zeros_like(x)
        for _ in range(self.steps):
            h = self.cell(h, x)
        return h if self.head is None else self.head(h)


BLOCKS = ("linear", "relu", "tanh", "scale", "mix", "pair")


@dataclass(frozen=True)
class NetSpec:
    family: str  # "seq" | "branch" | "rec"
    width: int
    head: int = 0  # width of a final Linear head; 0: none
    blocks: tuple[str, ...] = ()  # seq: the chain; branch: the router's two children
    root: str = "chain"  # seq: "chain" (custom root) or "sequential" (nn.Sequential root)
    flag: bool = True  # branch: which child the router calls
    calls: int = 1  # branch: router calls; rec: cell calls
    mixed: bool = False  # rec: the cell mixes rows
    seed: int = 0


def _block(kind: str, width: int) -> nn.Module:
    return {
        "linear": lambda: nn.Linear(width, width),
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "scale": lambda: Scale(width),
        "mix": Mix,
        "pair": lambda: nn.Sequential(nn.Linear(width, width), nn.ReLU()),
    }[kind]()


def build(spec: NetSpec) -> nn.Module:
    width = spec.width
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        head = nn.Linear(width, spec.head) if spec.head else None
        if spec.family == "seq":
            blocks = [_block(kind, width) for kind in spec.blocks]
            if spec.root == "sequential":
                return nn.Sequential(*blocks, *([head] if head is not None else []))
            return Chain(blocks, head)
        if spec.family == "branch":
            a, b = (_block(kind, width) for kind in spec.blocks)
            return Branching(width, Router(a, b, spec.flag), spec.calls, head)
        return Recurrent(width, spec.calls, spec.mixed, head)


def tapped(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules that are ever called (those with a forward of their own), by path."""
    return [(p, m) for p, m in net.named_modules() if type(m).forward is not nn.Module.forward]


@dataclass(frozen=True)
class Probe:
    """What one plain forward shows of a model's structure."""

    paths: tuple[str, ...]  # modules that have a forward, in named_modules() order
    order: tuple[tuple[str, str, int], ...]  # boundaries (path, "in"/"out", call) in forward order
    feats: dict[tuple[str, str], tuple[int, ...]]  # per-row shape of each (path, io)
    calls: dict[str, int]  # calls per module in one forward
    container: str | None  # a module that is never called itself (a ModuleList)

    def position(self, path: str, io: str, call: int) -> int:
        try:
            return self.order.index((path, io, call))
        except ValueError:
            return len(self.order)  # never reached: anywhere in a shuffled program


@functools.lru_cache(maxsize=1024)
def probe(spec: NetSpec) -> Probe:
    net = build(spec)
    order: list[tuple[str, str, int]] = []
    feats: dict[tuple[str, str], tuple[int, ...]] = {}
    calls: Counter[str] = Counter()

    def recorder(path: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            call = calls[path]
            calls[path] += 1
            order.append((path, "in", call))
            feats[(path, "in")] = tuple(args[0].shape[1:])
            output = original(*args, **kwargs)
            order.append((path, "out", call))
            feats[(path, "out")] = tuple(output.shape[1:])
            return output

        return forward

    modules = tapped(net)
    for path, module in modules:
        module.forward = recorder(path, module.forward)
    try:
        net(torch.zeros(1, spec.width))
    finally:
        for _, module in modules:
            del module.__dict__["forward"]
    container = next(
        (p for p, m in net.named_modules() if type(m).forward is nn.Module.forward), None
    )
    return Probe(tuple(p for p, _ in modules), tuple(order), feats, dict(calls), container)


# == programs =====================================================================================
#
# A program is a tuple of operations (plain tuples, so a failing case prints readably):
#   ("read", path, io)                 io: "out" (.output) or "in" (.input)
#   ("swap", path, io, how, c)         how: "scale" (v * 2 + c of the value read), "const", "wrong"
#   ("skip", path, c)                  .skip(a constant c of the output's shape)
#   ("loop", selection, body)          for step in tr.iter[...]: body; selection is
#                                      ("range", a, b) | ("open", a) | ("at", k) | ("list", (i, j))
#   ("barrier", b)                     bars[b]()
#   ("raise",)                         raise FuzzError(invoke index)
#   ("misuse", what)                   "container": .output of a module the model never calls;
#                                      "nested": tr.invoke(x).run(...) inside a body


@dataclass
class Ctx:
    """What a program needs besides its operations: its invoke and the model's shapes."""

    index: int
    rows: int  # rows this invoke sees (the whole batch for an empty invoke)
    width: int
    feats: dict[tuple[str, str], tuple[int, ...]]
    container: str | None

    def const(self, path: str, io: str, c: float, wrong: bool = False) -> torch.Tensor:
        shape = (self.rows, *self.feats.get((path, io), (self.width,)))
        if wrong:  # one row too many, or one feature too many
            shape = (shape[0] + 1, *shape[1:]) if c >= 0 else (shape[0], shape[1] + 1)
        return torch.full(shape, float(c))


def selection(sel: tuple[Any, ...]) -> Any:
    kind = sel[0]
    if kind == "range":
        return slice(sel[1], sel[2])
    if kind == "open":
        return slice(sel[1], None)
    if kind == "at":
        return sel[1]
    return list(sel[1])


def envoy(model: mediator.Model, path: str) -> Any:
    env: Any = model
    for part in path.split(".") if path else ():
        env = env[part]
    return env


def run_program(
    prog: tuple[Any, ...], model: mediator.Model, tr: mediator.Tracer, bars: list[Any], ctx: Ctx
) -> list[torch.Tensor]:
    """The program, for real: runs in an invoke body (a function, or a helper of a with-body)."""
    reads: list[torch.Tensor] = []

    def get(env: Any, io: str) -> torch.Tensor:
        return env.output if io == "out" else env.input

    def put(env: Any, io: str, value: torch.Tensor) -> None:
        if io == "out":
            env.output = value
        else:
            env.input = value

    def do(op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "read":
            reads.append(get(envoy(model, op[1]), op[2]))
        elif kind == "swap":
            _, path, io, how, c = op
            env = envoy(model, path)
            if how == "scale":
                old = get(env, io)
                reads.append(old)
                new = old * 2 + c
            else:
                new = ctx.const(path, io, c, wrong=how == "wrong")
            put(env, io, new)
        elif kind == "skip":
            envoy(model, op[1]).skip(ctx.const(op[1], "out", op[2]))
        elif kind == "barrier":
            bars[op[1]]()
        elif kind == "raise":
            raise FuzzError(ctx.index)
        elif kind == "misuse":
            if op[1] == "container" and ctx.container is not None:
                envoy(model, ctx.container).output
            else:
                tr.invoke(torch.zeros(1, ctx.width)).run(len)
        elif kind == "loop":
            for _step in tr.iter[selection(op[1])]:
                for inner in op[2]:
                    do(inner)
        else:  # pragma: no cover
            raise AssertionError(op)

    for op in prog:
        do(op)
    return reads


# == the oracle ===================================================================================

LOOP_END = object()  # the reply that ends an open loop (the forward returned)


class Barrier:  # the unfinished-barrier error: any MediatorError that is none of the others
    pass


class Container:  # .output of a module never called: UsageError (or MissedProviderError)
    pass


class SimAbort(BaseException):
    """Unwinds the oracle's forward once the trace has failed."""


def sim_program(prog: tuple[Any, ...], med: SimMed) -> Generator[Any, Any, None]:
    """The program as the oracle runs it: yields each request, receives the reply."""

    def do(op: tuple[Any, ...]) -> Generator[Any, Any, None]:
        kind = op[0]
        if kind == "read":
            value = yield ("VALUE", med.key(op[1], op[2]))
            med.reads.append(first(value, op[2]))
        elif kind == "swap":
            _, path, io, how, c = op
            if how == "scale":
                value = yield ("VALUE", med.key(path, io))
                old = first(value, io)
                med.reads.append(old)
                new = old * 2 + c
            else:
                new = med.ctx.const(path, io, c, wrong=how == "wrong")
            yield ("SWAP", med.key(path, io), new)
        elif kind == "skip":
            yield ("SKIP", med.key(op[1], "in"), med.ctx.const(op[1], "out", op[2]))
        elif kind == "barrier":
            yield ("BARRIER", op[1])
        elif kind == "raise":
            yield ("FAIL", FuzzError)
        elif kind == "misuse":
            container = op[1] == "container" and med.ctx.container is not None
            yield ("FAIL", Container if container else UsageError)
        elif kind == "loop":
            sel, body = op[1], op[2]
            try:
                if sel[0] == "open":
                    step = sel[1]
                    while True:
                        if step > 0 and (yield ("STEP", step)) is LOOP_END:
                            break
                        med.step = step
                        for inner in body:
                            yield from do(inner)
                        step += 1
                else:
                    steps = {"range": lambda: range(sel[1], sel[2]), "at": lambda: [sel[1]]}.get(
                        sel[0], lambda: sel[1]
                    )()
                    for step in steps:
                        med.step = step
                        for inner in body:
                            yield from do(inner)
            finally:
                med.step = 0

    for op in prog:
        yield from do(op)


def first(value: Any, io: str) -> Any:
    """`.output` is the value; `.input` the first positional argument of `(args, kwargs)`."""
    return value if io == "out" else value[0][0]


@dataclass(eq=False)
class SimMed:
    index: int
    rows: slice | None
    ctx: Ctx
    prog: tuple[Any, ...]
    reads: list[Any] = field(default_factory=list)
    step: int = 0
    waiting: tuple[Any, ...] | None = None
    ops: list[tuple[Any, ...]] = field(default_factory=list)
    started: bool = False
    done: bool = False
    error: type | None = None

    def __post_init__(self) -> None:
        self.gen = sim_program(self.prog, self)

    def key(self, path: str, io: str) -> tuple[str, str, int]:
        return (path, io, self.step)


@dataclass(eq=False)
class SimBarrier:
    parties: int
    arrived: list[SimMed] = field(default_factory=list)


def narrow(value: Any, rows: slice, total: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() and value.shape[0] == total else value
    args, kwargs = value
    return (
        tuple(narrow(a, rows, total) for a in args),
        {k: narrow(v, rows, total) for k, v in kwargs.items()},
    )


def merge(full: Any, views: list[tuple[slice, Any]], total: int) -> Any:
    """`full` with each invoke's rows replaced by its view (views in row order)."""
    if isinstance(full, torch.Tensor):
        assert full.shape[0] == total
        parts, covered = [], 0
        for rows, view in views:
            if rows.start > covered:
                parts.append(full[covered : rows.start])
            parts.append(view)
            covered = rows.stop
        if covered < total:
            parts.append(full[covered:])
        return torch.cat(parts)
    args, kwargs = full
    return (
        tuple(merge(a, [(r, v[0][i]) for r, v in views], total) for i, a in enumerate(args)),
        {k: merge(a, [(r, v[1][k]) for r, v in views], total) for k, a in kwargs.items()},
    )


class SimBoundary:
    """The value at one boundary, as each invoke sees it (its rows, or all for an empty invoke)."""

    def __init__(self, sim: Sim, key: tuple[str, str, int], value: Any) -> None:
        self.sim = sim
        self.key = key
        self.value = value
        self.views: dict[SimMed, Any] = {}
        self.dirty = False
        self.skips: dict[SimMed, Any] = {}

    def view(self, med: SimMed) -> Any:
        if med not in self.views:
            if med.rows is None:
                self.views[med] = self.value = self.merged()
            else:
                self.views[med] = narrow(self.value, med.rows, self.sim.total)
        return self.views[med]

    def swap(self, med: SimMed, leaf: torch.Tensor) -> bool:
        """Set `med`'s value here to `leaf` (its first argument at an input); False: bad shape."""
        old = self.view(med)
        if self.key[1] == "in":
            args, kwargs = old
            ok = leaf.shape == args[0].shape
            new = ((leaf, *args[1:]), kwargs)
        else:
            ok = leaf.shape == old.shape
            new = leaf
        if not ok:
            return False
        if med.rows is None:
            self.value = new
            self.views = {med: new}
            self.dirty = False
        else:
            self.views[med] = new
            self.dirty = True
        return True

    def merged(self) -> Any:
        if self.dirty:
            views = sorted(
                ((m.rows, v) for m, v in self.views.items() if m.rows is not None),
                key=lambda item: item[0].start,
            )
            self.value = merge(self.value, views, self.sim.total)
            self.dirty = False
        return self.value


class Sim:
    """The oracle: the trace's contract, simulated on a plain forward with wrapped modules."""

    def __init__(self, meds: list[SimMed], parties: tuple[int, ...], total: int) -> None:
        self.meds = meds
        self.bars = [SimBarrier(p) for p in parties]
        self.total = total
        self.started: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.current: SimBoundary | None = None
        self.forward_done = False
        self.due: dict[tuple[str, str, int], list[SimMed]] = {}
        self.barriers: list[SimBarrier] = []  # in order of first arrival
        self.failure: tuple[type, int, bool] | None = None  # (error, invoke, raised in its body)
        self.candidates: list[tuple[type, int, bool]] = []  # any one of these (see `finish`)
        self.ambiguous = False  # values are not predicted (see `run_skipped`)
        self.own_edit_first = False  # a body met its own pending edit at the current boundary
        self.output: Any = None

    # -- running one body until it blocks or ends -------------------------------------------

    def advance(self, m: SimMed, reply: Any) -> None:
        while True:
            try:
                request = m.gen.send(reply)
            except StopIteration:
                m.done = True
                return
            reply = None
            kind = request[0]
            if kind == "FAIL":
                m.done, m.error = True, request[1]
                return
            if kind == "BARRIER":
                barrier = self.bars[request[1]]
                if barrier not in self.barriers:
                    self.barriers.append(barrier)
                barrier.arrived.append(m)
                m.waiting = ("BARRIER", barrier)
                return
            if kind == "STEP":
                if self.forward_done:
                    reply = LOOP_END
                    continue
                m.waiting = request
                return
            key = request[1]
            here = self.current
            if here is not None and here.key == key:
                if kind == "VALUE":
                    reply = here.view(m)
                elif kind == "SWAP":
                    if not here.swap(m, request[2]):
                        m.done, m.error = True, ShapeError
                        return
                else:
                    here.skips[m] = request[2]
                continue
            path, io, call = key
            if (self.started if io == "in" else self.finished)[path] > call:
                m.done, m.error = True, OutOfOrderError
                return
            if self.forward_done:
                m.done, m.error = True, MissedProviderError
                return
            self.due.setdefault(key, []).append(m)
            if kind == "VALUE":
                m.waiting = request
                return
            m.ops.append(request)

    def resume(self, m: SimMed, reply: Any) -> None:
        m.waiting = None
        here = self.current
        if here is not None and any(op[1] == here.key for op in m.ops):  # released here early
            # "Reading a value again after setting it, at the same point, gives the
            # value that was set": a body resumed at a boundary it set gets its own pending
            # edits there first; one of the wrong shape raises at the request it was blocked on
            # (BUG_OWN_EDIT: the library once applied them only at the body's turn).
            self.own_edit_first = True
            if self.apply_ops(m, here, in_body=True):
                self.advance(m, reply)
        else:
            self.advance(m, reply)
        if m.error is not None and self.failure is None:
            self.failure = (m.error, m.index, True)
            raise SimAbort

    def apply_ops(self, m: SimMed, here: SimBoundary, in_body: bool = False) -> bool:
        kept: list[tuple[Any, ...]] = []
        for position, op in enumerate(m.ops):
            if op[1] != here.key:
                kept.append(op)
                continue
            if op[0] == "SKIP":
                here.skips[m] = op[2]
            elif not here.swap(m, op[2]):  # a swap of the wrong shape: ShapeError in the body
                m.ops = kept + m.ops[position + 1 :]
                if in_body:
                    m.done, m.error = True, ShapeError
                    return False
                if m.done:  # the body already ended: the trace fails with it
                    self.failure = (ShapeError, m.index, False)
                    raise SimAbort
                self.withdraw(m)
                m.done, m.error = True, ShapeError
                self.failure = (ShapeError, m.index, True)
                raise SimAbort
        m.ops = kept
        return True

    def withdraw(self, m: SimMed) -> None:
        if m.waiting is not None and m.waiting[0] == "BARRIER":
            m.waiting[1].arrived.remove(m)
        m.waiting = None

    def settle(self) -> None:
        again = True
        while again:
            again = False
            for barrier in self.barriers:
                if len(barrier.arrived) >= barrier.parties:
                    released, barrier.arrived = barrier.arrived, []
                    for m in sorted(released, key=lambda m: m.index):
                        self.resume(m, None)
                    again = True

    # -- the model side ------------------------------------------------------------------------

    def start(self) -> None:
        for m in self.meds:
            m.started = True
            self.resume(m, None)
            self.settle()

    def wake_steps(self, call: int) -> None:
        ready = True
        while ready:
            ready = False
            for m in self.meds:
                if m.waiting is not None and m.waiting[0] == "STEP" and m.waiting[1] <= call:
                    self.resume(m, None)
                    self.settle()
                    ready = True

    def serve(self, key: tuple[str, str, int], value: Any) -> SimBoundary:
        here = self.current = SimBoundary(self, key, value)
        for m in sorted(set(self.due.pop(key, ())), key=lambda m: m.index):
            self.apply_ops(m, here)
            if m.waiting is not None and m.waiting[0] == "VALUE" and m.waiting[1] == key:
                self.resume(m, here.view(m))
                self.settle()
        self.current = None
        return here

    def call(self, path: str, original: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        call = self.started[path]
        self.wake_steps(call)
        self.started[path] = call + 1
        boundary = self.serve((path, "in", call), (args, kwargs))
        args, kwargs = boundary.merged()
        if boundary.skips:
            output = self.run_skipped(boundary, original, args, kwargs)
        else:
            output = original(*args, **kwargs)
        output = self.serve((path, "out", call), output).merged()
        self.finished[path] += 1
        return output

    def run_skipped(
        self, boundary: SimBoundary, original: Callable[..., Any], args: Any, kwargs: Any
    ) -> Any:
        skips = boundary.skips
        whole = [m for m in skips if m.rows is None]
        if whole:
            # Two invokes that both see the whole batch skip one call: whose value wins is not
            # in the contract, so values are not predicted (the outcome still is).
            self.ambiguous |= len(skips) > 1
            return skips[whole[0]]
        if sum(m.rows.stop - m.rows.start for m in skips) == self.total:  # type: ignore[union-attr]
            views = sorted(((m.rows, v) for m, v in skips.items()), key=lambda i: i[0].start)
            return torch.cat([v for _, v in views])
        output = original(*args, **kwargs)  # the rows nobody skips still need the call
        partial = SimBoundary(self, (boundary.key[0], "out", boundary.key[2]), output)
        for m, value in skips.items():
            assert partial.swap(m, value)
        return partial.merged()

    def finish(self, output: Any) -> None:
        self.forward_done = True
        self.current = None
        self.output = output
        while True:
            blocked = [m for m in self.meds if not m.done]
            waiting = next((m for m in blocked if m.waiting[0] == "STEP"), None)  # type: ignore[index]
            if waiting is not None:  # open loops end first, in definition order
                self.resume(waiting, LOOP_END)
                self.settle()
                continue
            # Every request still open can no longer be served, and the first body told so fails
            # the trace. Which body is told first is the library's choice (the contract is silent),
            # so any of their errors is accepted: the oracle does not guess the order here.
            for m in blocked:
                kind = m.waiting[0]  # type: ignore[index]
                error = MissedProviderError if m.ops or kind == "VALUE" else Barrier
                self.candidates.append((error, m.index, True))
            for m in self.meds:
                if m.done and m.error is None and m.ops:  # a swap or skip never used
                    self.candidates.append((MissedProviderError, m.index, False))
            if self.candidates:
                raise SimAbort
            return


def invoke_rows(batches: tuple[int, ...]) -> tuple[list[slice | None], int]:
    """Each invoke's rows of the batch (None: all of them), and the batch size."""
    given = [b for b in batches if b]
    if len(given) == 1:
        return [None] * len(batches), given[0]
    rows: list[slice | None] = []
    start = 0
    for b in batches:
        rows.append(slice(start, start + b) if b else None)
        start += b
    return rows, start


def oracle(
    case: Case,
    net: nn.Module,
    xs: list[torch.Tensor | None],
    ctxs: list[Ctx],
) -> Sim:
    rows, total = invoke_rows(case.batches)
    meds = [SimMed(i, rows[i], ctxs[i], prog) for i, prog in enumerate(case.programs)]
    sim = Sim(meds, case.parties, total)
    modules = tapped(net)

    def wrap(path: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return sim.call(path, original, args, kwargs)

        return forward

    for path, module in modules:
        module.forward = wrap(path, module.forward)
    try:
        with torch.set_grad_enabled(case.grad):
            try:
                sim.start()
                output = net(torch.cat([x for x in xs if x is not None]))
                sim.finish(output)
            except SimAbort:
                pass
    finally:
        for _, module in modules:
            del module.__dict__["forward"]
    return sim


# == cases ========================================================================================


@dataclass(frozen=True)
class Case:
    net: NetSpec
    batches: tuple[int, ...]  # rows per invoke; 0: an empty invoke (the whole batch)
    parties: tuple[int, ...]  # one barrier per entry: tr.barrier(parties)
    programs: tuple[tuple[Any, ...], ...]  # one per invoke
    grad: bool = False
    seed: int = 0


IOS = ("out", "in")
CONSTS = (0.0, 1.0, -2.0, 0.5)
SWAPS = ("scale",) * 4 + ("const",) * 4 + ("wrong",)  # a wrong shape in one swap of 9


def _simple(draw: Any, kind: str, path: str, io: str) -> tuple[Any, ...]:
    if kind == "read":
        return ("read", path, io)
    c = draw(st.sampled_from(CONSTS))
    if kind == "swap":
        return ("swap", path, io, draw(st.sampled_from(SWAPS)), c)
    return ("skip", path, c)


@st.composite
def programs(
    draw: Any, info: Probe, barriers: list[int], focus: list[str], meet: bool = False
) -> tuple[Any, ...]:
    items: list[tuple[int, tuple[Any, ...]]] = []
    multi = [p for p in info.paths if info.calls.get(p, 0) > 1]
    most = max(info.calls.values())
    kinds = ("read", "read", "read", "swap", "swap", "skip") + (() if meet else ("loop",))
    for _ in range(draw(st.integers(2, 4) if meet else st.integers(0, 4))):
        kind = draw(st.sampled_from(kinds))
        if kind != "loop":
            # Mostly a few modules of the case, so that invokes meet at the same values.
            pool = focus if draw(st.integers(0, 9)) < (9 if meet else 7) else list(info.paths)
            path, io = draw(st.sampled_from(pool)), draw(st.sampled_from(IOS))
            if meet and draw(st.integers(0, 3)) != 3:
                io = "out"  # one value, mostly
            op = _simple(draw, kind, path, io)
            position = info.position(path, "in" if kind == "skip" else io, 0)
            items.append((position, op))
            if kind == "swap" and draw(st.integers(0, 2)) == 2:  # read back what was set
                items.append((position, ("read", path, io)))
            continue
        form = draw(st.sampled_from(("range", "open", "at", "list")))
        a = draw(st.integers(0, most))
        sel: tuple[Any, ...]
        if form == "range":
            sel = ("range", a, draw(st.integers(a, most + 1)))
        elif form == "list":
            sel = ("list", (a, draw(st.integers(0, most))))
        else:
            sel = (form, a)
        body = []
        for _ in range(draw(st.integers(1, 3))):
            pool = multi if multi and draw(st.integers(0, 9)) < 7 else list(info.paths)
            path, io = draw(st.sampled_from(pool)), draw(st.sampled_from(IOS))
            kind = draw(st.sampled_from(("read", "read", "swap", "skip")))
            body.append((info.position(path, "in" if kind == "skip" else io, a), path, kind, io))
        if draw(st.integers(0, 3)) != 3:  # mostly in the order the model computes them
            body.sort(key=lambda item: item[0])
        ops = tuple(_simple(draw, kind, path, io) for _, path, kind, io in body)
        items.append((body[0][0], ("loop", sel, ops)))
    if draw(st.integers(0, 3)) != 3:  # (hypothesis favours 0: the rare choice is another value)
        items.sort(key=lambda item: item[0])
    else:
        items = draw(st.permutations(items))
    prog = [op for _, op in items]
    for b in barriers:
        at = len(prog) // 2 if meet else draw(st.integers(0, len(prog)))
        prog.insert(at, ("barrier", b))
    if draw(st.integers(0, 99)) >= 96:
        prog.insert(draw(st.integers(0, len(prog))), ("raise",))
    if draw(st.integers(0, 99)) >= 98:
        what = draw(st.sampled_from(("container", "nested")))
        prog.insert(draw(st.integers(0, len(prog))), ("misuse", what))
    return tuple(prog)


@st.composite
def nets(draw: Any) -> NetSpec:
    family = draw(st.sampled_from(("seq", "branch", "rec")))
    width = draw(st.integers(4, 8))
    head = draw(st.sampled_from((0, 0, 3, 5)))
    if family == "seq":
        blocks = tuple(draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5)))
        root = draw(st.sampled_from(("chain", "sequential")))
        return NetSpec("seq", width, head, blocks=blocks, root=root)
    if family == "branch":
        blocks = tuple(draw(st.sampled_from(("linear", "pair", "scale"))) for _ in range(2))
        flag, calls = draw(st.booleans()), draw(st.integers(1, 2))
        return NetSpec("branch", width, head, blocks=blocks, flag=flag, calls=calls)
    steps, mixed = draw(st.integers(1, 4)), draw(st.booleans())
    return NetSpec("rec", width, head, calls=steps, mixed=mixed)


@st.composite
def cases(draw: Any, max_invokes: int = 4) -> Case:
    spec = draw(nets())
    info = probe(spec)
    n = draw(st.integers(1, max_invokes))
    batches = [draw(st.sampled_from((0, 1, 1, 2, 2, 3, 3))) for _ in range(n)]
    if not any(batches):
        batches[0] = 1
    parties: list[int] = []
    callers: list[set[int]] = []
    # A "meeting": every invoke works on one module and waits for the others halfway through.
    meet = n > 1 and draw(st.integers(0, 4)) == 4
    for _ in range(1 if meet else draw(st.integers(0, 2))):
        everyone = set(range(n))
        who = draw(st.sampled_from([everyone]) | st.sets(st.integers(0, n - 1), min_size=1))
        who = everyone if meet else who
        callers.append(who)
        extra = 0 if meet else draw(st.sampled_from((0, 0, 0, 1)))  # sometimes one never comes
        parties.append(len(who) + extra)
    focus = draw(st.lists(st.sampled_from(info.paths), min_size=1, max_size=1 if meet else 2))
    progs = tuple(
        draw(programs(info, [b for b, who in enumerate(callers) if i in who], focus, meet))
        for i in range(n)
    )
    return Case(
        replace(spec, seed=draw(st.integers(0, 2**16))),
        tuple(batches),
        tuple(parties),
        progs,
        grad=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


# == running and checking a case ==================================================================


def inputs_of(case: Case) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(case.seed)
    return [torch.randn(b, case.net.width, generator=gen) if b else None for b in case.batches]


def contexts(case: Case, info: Probe) -> list[Ctx]:
    rows, total = invoke_rows(case.batches)
    return [
        Ctx(i, total if r is None else r.stop - r.start, case.net.width, info.feats, info.container)
        for i, r in enumerate(rows)
    ]


def in_thread(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run a whole trace in its own thread, so that a hang fails the example instead of the run."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - checked by the caller
            box["error"] = error

    thread = threading.Thread(target=target, name="fuzz-trace", daemon=True)
    thread.start()
    thread.join(HANG_S)
    assert not thread.is_alive(), f"the trace did not return within {HANG_S} s (a hang)"
    return box


def run_functions(
    case: Case, model: mediator.Model, xs: list[torch.Tensor | None], ctxs: list[Ctx]
) -> dict[str, Any]:
    futures: list[Any] = []

    def trace() -> Any:
        with torch.set_grad_enabled(case.grad):
            with model.trace() as tr:
                bars = [tr.barrier(p) for p in case.parties]
                for i, prog in enumerate(case.programs):
                    invoke = tr.invoke(xs[i]) if xs[i] is not None else tr.invoke()
                    futures.append(invoke.run(run_program, prog, model, tr, bars, ctxs[i]))
        return tr.result

    box = in_thread(trace)
    box["reads"] = futures
    return box


def run_with_blocks(
    case: Case, model: mediator.Model, xs: list[torch.Tensor | None], ctxs: list[Ctx]
) -> dict[str, Any]:
    """The same programs as with-bodies: each body calls `run_program` (up to 4 invokes)."""
    progs, n = case.programs, len(case.programs)
    args = [() if x is None else (x,) for x in xs]
    reads: list[Any] = [None] * n

    def trace() -> Any:
        with torch.set_grad_enabled(case.grad):
            try:
                with model.trace() as tr:
                    bars = [tr.barrier(p) for p in case.parties]
                    with tr.invoke(*args[0]):
                        r0 = run_program(progs[0], model, tr, bars, ctxs[0])
                    if n > 1:
                        with tr.invoke(*args[1]):
                            r1 = run_program(progs[1], model, tr, bars, ctxs[1])
                    if n > 2:
                        with tr.invoke(*args[2]):
                            r2 = run_program(progs[2], model, tr, bars, ctxs[2])
                    if n > 3:
                        with tr.invoke(*args[3]):
                            r3 = run_program(progs[3], model, tr, bars, ctxs[3])
            finally:
                bound = locals()
                for i in range(n):
                    reads[i] = bound.get(f"r{i}")
        return tr.result

    box = in_thread(trace)
    box["reads"] = reads
    return box


def outcome_name(error: type | None) -> str:
    return "ok" if error is None else error.__name__


def matches(error: BaseException, expected: tuple[type, int, bool]) -> bool:
    kind, index, _ = expected
    if kind is FuzzError:
        return type(error) is FuzzError and error.args == (index,)
    if kind is Barrier:
        specific = (OutOfOrderError, MissedProviderError, ShapeError)
        return isinstance(error, MediatorError) and not isinstance(error, specific)
    if kind is Container:
        return isinstance(error, (UsageError, MissedProviderError))
    return isinstance(error, kind)


def same(values: list[Any], expected: list[Any]) -> bool:
    return len(values) == len(expected) and all(
        isinstance(v, torch.Tensor) and v.shape == e.shape and torch.equal(v, e)
        for v, e in zip(values, expected, strict=True)
    )


def compare(sim: Sim, box: dict[str, Any], futures: bool) -> str:
    """Assert that a real run (`box`) is what the oracle predicts; returns the outcome's name."""
    error = box.get("error")
    expected = [sim.failure] if sim.failure is not None else sim.candidates
    got = "ok" if error is None else f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    if not expected:
        assert error is None, f"the oracle predicts success, the trace raised {got}"
        if not sim.ambiguous:
            for m, reads in zip(sim.meds, box["reads"], strict=True):
                values = reads.result() if futures else reads
                assert same(values, m.reads), f"invoke {m.index} read other values than the oracle"
            assert torch.equal(box["value"], sim.output), "tr.result differs from the oracle"
        return "ok"
    names = sorted({outcome_name(kind) + f"@{i}" for kind, i, _ in expected})
    assert error is not None, f"the oracle predicts {names}, the trace succeeded"
    hits = [e for e in expected if matches(error, e)]
    assert hits, f"the oracle predicts {names}, the trace raised {got}"
    if futures:
        fail = box["reads"]
        if all(in_body for _, _, in_body in hits) and not sim.ambiguous:
            assert any(fail[i].exception() is error for _, i, _ in hits), (
                "the failing invoke's future does not hold the trace's error"
            )
        for m, future in zip(sim.meds, fail, strict=True):
            assert future.done()
            if not m.done or m.error is not None:  # failed, cancelled or never started
                assert future.exception() is not None, f"invoke {m.index} did not finish"
            elif future.exception() is None and not sim.ambiguous:  # finished before the failure
                assert same(future.result(), m.reads), f"invoke {m.index} read other values"
    return outcome_name(hits[0][0])


def check_case(case: Case, form: str = "function") -> str:
    """Run `case` for real and through the oracle; assert they agree and nothing is left."""
    info = probe(replace(case.net, seed=0))
    net = build(case.net)
    xs = inputs_of(case)
    ctxs = contexts(case, info)
    plain = torch.cat([x for x in xs if x is not None])
    with torch.no_grad():
        before = net(plain)
    hooks = hook_count(net)
    sim = oracle(case, net, xs, ctxs)
    assert patched_forwards(net) == []
    if currently_in_test_context():
        note(f"oracle: {sim.failure or sim.candidates or 'ok'}")
        if sim.own_edit_first:
            event("a body met its own pending edit at the current boundary")
    model = mediator.Model(net)
    run = run_functions if form == "function" else run_with_blocks
    pool = _workers.POOL.size
    box = run(case, model, xs, ctxs)
    outcome = compare(sim, box, futures=form == "function")
    assert busy_workers() == [], "a mediator worker is still busy after the trace"
    # The pool grows only to the most bodies that ran at once: a thread kept busy would show here.
    assert _workers.POOL.size <= max(pool, len(case.programs)), "the trace left a thread behind"
    assert patched_forwards(net) == [], "a tap was left on the model"
    assert hook_count(net) == hooks, "a hook was left on the model"
    with torch.no_grad():
        assert torch.equal(net(plain), before), "the model computes something else after the trace"
    return outcome


# == the fuzz tests ===============================================================================


@pytest.mark.timeout(TEST_TIMEOUT)
@settings(FUZZ, max_examples=FUNCTION_EXAMPLES)
@given(case=cases())
def test_fuzz_function_form(case: Case) -> None:
    outcome = check_case(case, "function")
    OUTCOMES["function " + outcome] += 1
    event(f"outcome: {outcome}")
    event(f"model: {case.net.family}, invokes: {len(case.programs)}")


@pytest.mark.timeout(TEST_TIMEOUT)
@settings(FUZZ, max_examples=WITH_FORM_EXAMPLES)
@given(case=cases())
def test_fuzz_with_block_form(case: Case) -> None:
    outcome = check_case(case, "with")
    OUTCOMES["with " + outcome] += 1
    event(f"outcome: {outcome}")


def test_fuzz_outcomes_are_diverse() -> None:
    """The fuzz cases of this session (run just above) did not all end alike: many succeeded
    (their values were checked) and most kinds of error occurred. Prints the counts (-s or -rP)."""
    total = sum(OUTCOMES.values())
    print(f"\nfuzz cases run: {total}")
    for name, count in sorted(OUTCOMES.items()):
        print(f"  {name}: {count}")
    function = {k.split()[1]: v for k, v in OUTCOMES.items() if k.startswith("function ")}
    if sum(function.values()) < 100:
        pytest.skip("run together with test_fuzz_function_form")
    assert function.get("ok", 0) >= 0.15 * sum(function.values())
    kinds = ("OutOfOrderError", "MissedProviderError", "ShapeError", "Barrier", "FuzzError")
    assert sum(function.get(kind, 0) > 0 for kind in kinds) >= 4, function


# == the oracle itself: fixed cases with known outcomes ===========================================

SEQ = NetSpec("seq", 6, blocks=("linear", "relu", "linear"), seed=3)  # blocks.0 .1 .2
REC = NetSpec("rec", 5, calls=3, seed=4)  # encode, cell (x3), cell.lin (x3)
BRANCH = NetSpec("branch", 4, blocks=("linear", "pair"), flag=True, seed=5)  # router.b never runs

KNOWN = [
    ("ok", Case(SEQ, (2,), (), ((("read", "blocks.0", "out"), ("read", "", "out")),))),
    (
        "ok",
        Case(
            SEQ,
            (1, 2),
            (),
            (
                (("swap", "blocks.1", "out", "scale", 1.0), ("read", "blocks.2", "in")),
                (("skip", "blocks.0", 0.5), ("read", "", "out")),
            ),
        ),
    ),
    (
        "ok",
        Case(REC, (2, 0), (), ((("loop", ("open", 0), (("read", "cell", "out"),)),), ())),
    ),
    (
        "OutOfOrderError",
        Case(SEQ, (1,), (), ((("read", "blocks.2", "out"), ("read", "blocks.0", "out")),)),
    ),
    ("MissedProviderError", Case(BRANCH, (3,), (), ((("read", "router.b", "out"),),))),
    (
        "MissedProviderError",
        Case(REC, (1,), (), ((("loop", ("at", 3), (("read", "cell", "out"),)),),)),
    ),
    (
        "ShapeError",
        Case(SEQ, (2, 1), (), ((), (("swap", "blocks.1", "out", "wrong", -2.0),))),
    ),
    (
        "Barrier",
        Case(SEQ, (1, 1), (2,), ((("barrier", 0),), (("read", "blocks.0", "out"),))),
    ),
    (
        "FuzzError",
        Case(SEQ, (1, 2), (), ((("read", "blocks.0", "out"),), (("raise",),))),
    ),
    ("UsageError", Case(SEQ, (1,), (), ((("misuse", "nested"),),))),
    (
        "OutOfOrderError",  # the barrier releases invoke 0 at blocks.2, after blocks.0 was computed
        Case(
            SEQ,
            (1, 1),
            (2,),
            (
                (("barrier", 0), ("read", "blocks.0", "out")),
                (("read", "blocks.2", "out"), ("barrier", 0)),
            ),
        ),
    ),
]


@pytest.mark.parametrize(
    ("expected", "case"), KNOWN, ids=[f"{i}-{e}" for i, (e, _) in enumerate(KNOWN)]
)
@pytest.mark.parametrize("form", ["function", "with"])
def test_known_cases(expected: str, case: Case, form: str) -> None:
    """The oracle predicts what a reader of the contract predicts, and the library agrees."""
    info = probe(replace(case.net, seed=0))
    net = build(case.net)
    sim = oracle(case, net, inputs_of(case), contexts(case, info))
    predicted = [sim.failure] if sim.failure else sim.candidates
    assert sorted({outcome_name(k) for k, _, _ in predicted} or {"ok"}) == [expected]
    assert check_case(case, form) == expected


def test_the_check_fails_on_a_wrong_value() -> None:
    """The comparison is not vacuous: a value off by a little is caught, and so is an error
    the oracle did not predict."""
    case = KNOWN[1][1]
    info = probe(replace(case.net, seed=0))
    net, xs = build(case.net), inputs_of(case)
    ctxs = contexts(case, info)
    sim = oracle(case, net, xs, ctxs)
    box = run_functions(case, mediator.Model(net), xs, ctxs)
    assert compare(sim, box, futures=True) == "ok"
    sim.meds[0].reads[0] = sim.meds[0].reads[0] + 1e-6
    with pytest.raises(AssertionError, match="read other values"):
        compare(sim, box, futures=True)
    with pytest.raises(AssertionError, match="predicts success"):
        compare(sim, {"error": OutOfOrderError("x"), "reads": box["reads"]}, futures=True)


# == bugs the fuzzer found ========================================================================


def test_bug_read_after_own_set_across_a_barrier(model: mediator.Model) -> None:
    """Reading a value again after setting it, at the same point, gives the value set."""
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    with model.trace() as tr:
        bar = tr.barrier(2)
        with tr.invoke(a):
            model.layers[1].output  # invoke 0 is served at layers.1 and arrives there
            bar()
        with tr.invoke(b):
            model.layers[1].output = torch.zeros(1, 8)  # queued: the model is not there yet
            bar()  # released at layers.1 by invoke 0, before invoke 1's own turn there
            seen = model.layers[1].output
    assert torch.equal(seen, torch.zeros(1, 8))


def test_bug_later_set_across_a_barrier_is_overwritten(model: mediator.Model) -> None:
    """`.output = v` is a SWAP: the rest of the forward sees v (here: the latest v)."""
    a, b = torch.randn(1, 8), torch.randn(1, 8)
    with model.trace() as tr:
        bar = tr.barrier(2)
        with tr.invoke(a):
            model.layers[1].output
            bar()
        with tr.invoke(b):
            model.layers[1].output = torch.zeros(1, 8)
            bar()
            model.layers[1].output = torch.ones(1, 8)
            after = model.layers[2].input
    assert torch.equal(after, torch.ones(1, 8))


OWN_EDIT_CASES = [  # found by the fuzzer (shrunk), run with the contract's oracle
    Case(
        NetSpec("seq", 4, blocks=("linear",)),
        (1, 0),
        (2,),
        (
            (("read", "", "out"), ("barrier", 0), ("read", "", "out")),
            (("swap", "", "out", "const", 0.0), ("barrier", 0), ("read", "", "out")),
        ),
    ),
    Case(  # the wrong shape of the first set is never reported in the body
        NetSpec("seq", 4, blocks=("linear",)),
        (1, 0, 0, 0),
        (4,),
        (
            (("read", "", "out"), ("barrier", 0), ("read", "", "out")),
            (("read", "", "out"), ("barrier", 0), ("read", "", "out")),
            (("read", "", "out"), ("barrier", 0), ("read", "", "out")),
            (("swap", "", "out", "wrong", 0.0), ("barrier", 0), ("read", "", "out")),
        ),
    ),
    Case(  # the later set is undone by the earlier one
        NetSpec("seq", 4, blocks=("linear",)),
        (1, 0, 0),
        (3,),
        (
            (("read", "", "out"), ("barrier", 0), ("read", "", "out")),
            (("read", "", "out"), ("barrier", 0), ("read", "", "out")),
            (
                ("read", "blocks.0", "out"),
                ("swap", "", "out", "const", 0.0),
                ("barrier", 0),
                ("swap", "", "out", "const", 1.0),
                ("read", "", "out"),
            ),
        ),
    ),
]


@pytest.mark.parametrize("case", OWN_EDIT_CASES, ids=["read", "wrong-shape", "set-again"])
def test_bug_own_edit_fuzz_cases(case: Case) -> None:
    check_case(case)
