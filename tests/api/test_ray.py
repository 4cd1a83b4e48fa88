"""mediator.ray on a local Ray: sweeps and serving give each experiment its solo result.

Every result is compared with the same experiment run locally in a trace of its own (the solo
oracle). Forwards are counted by a forward hook that the worker's `load_model` puts on the model,
appending a line to a file (workers are other processes). One local Ray (2 CPUs) serves the whole
module; skipped where Ray is not installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import mediator
from mediator.models import load_induction

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
import mediator.ray  # noqa: E402
from mediator.ray import Client, SweepError, serve_model, sweep  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    serve.shutdown()
    ray.shutdown()


class CountingLoader:
    """`load_model` for the workers: the induction model, and a line in `log` per forward. Its
    batcher concatenates inputs as they are (no padding): prompts of different lengths cannot
    share a trace."""

    def __init__(self, log: Path) -> None:
        self.log = str(log)

    def __call__(self) -> mediator.Model:
        net = load_induction()
        net.register_forward_hook(lambda *_: _append(self.log, "forward"))
        return mediator.Model(net, batcher=mediator.Batcher())


def _append(path: str, line: str) -> None:
    with open(path, "a") as file:
        file.write(line + "\n")


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def zero_position(model: mediator.Model, ids: torch.Tensor) -> torch.Tensor:
    """An experiment whose result depends on its item: zero layer 0's output at a position."""
    position = int(ids[0, 1]) % ids.shape[1]
    model.layers[0].output[:, position] = 0
    return model.output[:, -1]


def solo(experiment: Any, items: list[Any]) -> list[Any]:
    """The oracle: each experiment in a trace of its own, in this process (its result, or the
    exception the trace raised)."""
    model = mediator.Model(load_induction())
    results = []
    for item in items:
        try:
            with torch.no_grad(), model.trace() as tr:
                invoke = tr.invoke(**item) if isinstance(item, dict) else tr.invoke(item)
                future = invoke.run(experiment, model, item)
            results.append(future.result())
        except Exception as error:
            results.append(error)
    return results


def prompts(count: int, seed: int = 0) -> list[torch.Tensor]:
    """Random prompts whose first token is their index (the experiments below read it)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (count, 12), generator=generator)
    ids[:, 0] = torch.arange(count)
    return list(ids.split(1))


ITEMS, CHUNK = 40, 8
# item KILLS kills its worker, RAISES raises, BREAKS is shorter than the others, so that its
# chunk's inputs cannot be batched together; they are in chunks 1, 2 and 3 of 5. Chunk 4's items
# are dicts (keyword inputs).
KILLS, RAISES, BREAKS, DICTS = 13, 20, 27, 32


def index_of(item: Any) -> int:
    return int((item["input_ids"] if isinstance(item, dict) else item)[0, 0])


def make_experiment(flag: str) -> Any:
    """The sweep's experiment: `zero_position`, except on two items: one kills its worker (the
    first time only: `flag` marks it), one raises."""

    def experiment(model: mediator.Model, item: Any) -> tuple[int, torch.Tensor]:
        index = index_of(item)
        if index == KILLS and not os.path.exists(flag):
            _append(flag, "died")
            os._exit(1)  # the worker process dies in the middle of a chunk
        if index == RAISES:
            raise IndexError(f"no position 99 in item {index}")
        ids = item["input_ids"] if isinstance(item, dict) else item
        return index, zero_position(model, ids)

    return experiment


class Swept:
    """One sweep on 2 workers, shared by the tests that check its results."""

    def __init__(self, root: Path) -> None:
        self.flag, self.log = str(root / "died"), root / "forwards"
        self.experiment = make_experiment(self.flag)
        ids = prompts(ITEMS)
        ids[BREAKS] = ids[BREAKS][:, :7]
        self.items = [{"input_ids": x} if index >= DICTS else x for index, x in enumerate(ids)]
        loader = CountingLoader(self.log)
        self.results = list(
            sweep(loader, self.experiment, self.items, invokes_per_trace=CHUNK, progress=False)
        )
        self.expected = solo(self.experiment, self.items)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> Swept:
    return Swept(tmp_path_factory.mktemp("sweep"))


def test_sweep_gives_each_item_its_solo_result(swept: Swept) -> None:
    assert len(swept.results) == ITEMS
    for index, (got, want) in enumerate(zip(swept.results, swept.expected, strict=True)):
        if index == RAISES:
            continue
        assert got[0] == want[0] == index
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_sweep_runs_fewer_forwards_than_items(swept: Swept) -> None:
    # one forward per chunk; the chunk whose trace failed as a whole: one per item
    assert _lines(swept.log) == (ITEMS // CHUNK - 1) + CHUNK


def test_a_killed_worker_loses_nothing_and_repeats_nothing(swept: Swept) -> None:
    assert os.path.exists(swept.flag)  # a worker did die
    indices = [
        result.index if isinstance(result, SweepError) else result[0] for result in swept.results
    ]
    assert indices == list(range(ITEMS))  # each item once, in order


def test_an_exception_stays_with_its_item(swept: Swept) -> None:
    failed = swept.results[RAISES]
    assert isinstance(failed, SweepError) and failed.index == RAISES
    assert isinstance(failed.error, IndexError)
    assert str(failed.error) == str(swept.expected[RAISES]) == f"no position 99 in item {RAISES}"
    assert "in experiment" in failed.traceback and "IndexError" in failed.traceback
    assert str(failed) == f"item {RAISES}: IndexError: no position 99 in item {RAISES}"


def test_a_trace_that_fails_as_a_whole_runs_its_items_alone(swept: Swept) -> None:
    with pytest.raises(mediator.ShapeError, match="invoke"):  # its chunk cannot be batched
        plain = mediator.Model(load_induction(), batcher=mediator.Batcher())
        with torch.no_grad(), plain.trace() as tr:
            for item in swept.items[BREAKS - 1 : BREAKS + 1]:
                tr.invoke(item).run(lambda: None)
    chunk = slice(BREAKS // CHUNK * CHUNK, (BREAKS // CHUNK + 1) * CHUNK)
    for got, want in zip(swept.results[chunk], swept.expected[chunk], strict=True):
        assert got[0] == want[0]
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_an_item_that_always_kills_its_worker_takes_no_other_item_with_it() -> None:
    def kills_on_one(model: mediator.Model, ids: torch.Tensor) -> torch.Tensor:
        if index_of(ids) == 1:
            time.sleep(0.5)  # the next chunk waits on the worker meanwhile
            os._exit(1)
        return model.output[:, -1]

    items = prompts(4)
    swept = sweep(
        load_induction, kills_on_one, iter(items), 2, workers=1, retries=1, progress=False
    )
    # chunk [0, 1] dies (its last try runs 0 and 1 alone), chunk [2, 3] waiting behind it on
    # the same worker each time: that costs [2, 3] no try, so it still runs
    first, lost, *rest = swept
    assert isinstance(lost, SweepError) and lost.index == 1
    assert isinstance(lost.error, ray.exceptions.RayActorError)
    for got, want in zip([first, *rest], solo(kills_on_one, items[:1] + items[2:]), strict=True):
        torch.testing.assert_close(got, want)


def test_raise_errors_raises_in_item_order(capsys: pytest.CaptureFixture[str]) -> None:
    def fails_on_two(model: mediator.Model, ids: torch.Tensor) -> torch.Tensor:
        if index_of(ids) == 2:
            raise IndexError("no position 99 in item 2")
        return model.output[:, -1]

    items = prompts(6)
    results = sweep(load_induction, fails_on_two, items, workers=1, raise_errors=True)
    for want in solo(fails_on_two, items[:2]):
        torch.testing.assert_close(next(results), want)
    with pytest.raises(SweepError, match=r"item 2: IndexError: no position 99") as raised:
        next(results)
    assert isinstance(raised.value.__cause__, IndexError)
    assert next(results, None) is None  # the sweep ended there
    pytest.importorskip("tqdm")
    assert "sweep: 100%" in capsys.readouterr().err  # the progress bar counted all 6 items


def test_load_model_that_raises_says_so() -> None:
    def broken() -> torch.nn.Module:
        raise FileNotFoundError("no weights at /nowhere")

    with pytest.raises(mediator.MediatorError, match="(?s)load_model.*no weights at /nowhere"):
        list(sweep(broken, zero_position, prompts(2), workers=1, progress=False))


def test_workers_the_cluster_cannot_hold_yet_take_no_chunks() -> None:
    # 3 workers of 1 CPU on 2 CPUs: the third never starts while the others run
    items = prompts(12)
    swept = sweep(load_induction, zero_position, items, 2, workers=3, progress=False)
    for got, want in zip(swept, solo(zero_position, items), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_result_that_cannot_be_pickled_stays_with_its_item() -> None:
    def lock_on_one(model: mediator.Model, ids: torch.Tensor) -> Any:
        last = model.output[:, -1]
        return threading.Lock() if index_of(ids) == 1 else {"last": last, "index": 0.5}

    items = prompts(3)
    first, failed, last = sweep(load_induction, lock_on_one, items, 3, workers=1, progress=False)
    assert isinstance(failed, SweepError) and failed.index == 1
    assert isinstance(failed.error, TypeError)
    assert "returned lock, which cannot be sent back from the Ray worker" in str(failed.error)
    for got, want in zip((first, last), solo(lock_on_one, items[::2]), strict=True):
        assert got["index"] == want["index"]
        torch.testing.assert_close(got["last"], want["last"], rtol=1e-5, atol=1e-5)


def test_serving_co_batches_concurrent_clients(tmp_path: Path) -> None:
    log = tmp_path / "forwards"
    app = serve_model(CountingLoader(log), max_batch_size=16, batch_wait_timeout_s=0.5)
    serve.start(http_options={"host": None})  # handles only: no HTTP proxy
    client = Client(serve.run(app, route_prefix=None))
    items = prompts(16, seed=2)
    answers: list[Any] = [None] * 16

    def ask(index: int) -> None:
        answers[index] = client(zero_position, items[index])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(answers, solo(zero_position, items), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert _lines(log) < 16, _lines(log)

    def fails(model: mediator.Model, ids: torch.Tensor) -> None:
        raise KeyError("only mine")

    with pytest.raises(KeyError, match="only mine"):
        client(fails, items[0])
    torch.testing.assert_close(client(zero_position, items[1]), answers[1])


def test_import_mediator_does_not_import_ray() -> None:
    code = "import sys, mediator; assert 'ray' not in sys.modules, 'mediator imported ray'"
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ | {"PYTHONPATH": "src"})


def test_sweep_refuses_bad_arguments_at_once() -> None:
    with pytest.raises(ValueError, match="invokes_per_trace"):
        sweep(load_induction, zero_position, [], invokes_per_trace=0)
    with pytest.raises(ValueError, match="workers"):  # not a sweep that yields nothing
        sweep(load_induction, zero_position, iter([]), workers=0)
    with pytest.raises(TypeError, match="load_model.*returned int"):
        mediator.ray._chunk.as_model(3)
