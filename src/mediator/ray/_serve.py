"""Serving one model to many clients on Ray Serve: concurrent requests co-batched into one trace.

`serve_model` makes the deployment: each replica builds its model once, and Serve's batching
(`@serve.batch`) hands it the requests that arrive together; they run as the invokes of one
trace (`_chunk.run_chunk`), in a thread so the replica keeps taking requests meanwhile. A request
is `(fn, item)`, a function and its input, sent by a `DeploymentHandle` (cloudpickle); its answer
is `fn(model, item)`, or the exception `fn` raised, raised again for that request only. `Client`
makes a request look like a local call. A replica owns its model; this file owns no other state.

Security: the deployment runs whatever functions its clients send. Serve it to trusted clients
only; it takes no HTTP requests (Serve's HTTP proxy listens on localhost by default, and
`serve.run(app, route_prefix=None)` gives the deployment no HTTP route at all).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from ray import serve

from ._chunk import Call, Experiment, SweepError, as_model, run_chunk


class ModelServer:
    """A Serve replica: one model, and the batched requests of its clients."""

    def __init__(
        self,
        load_model: Callable[[], Any],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        grad: bool,
    ) -> None:
        self.model = as_model(load_model())
        self.grad = grad
        self.run_together.set_max_batch_size(max_batch_size)
        self.run_together.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, fn: Experiment, item: Any = None) -> Any:
        if not callable(fn):  # an HTTP request (a starlette Request) or a wrong call
            raise TypeError(
                f"this deployment runs functions sent by trusted clients through a Ray Serve "
                f"handle, `handle.remote(fn, item)`; it got {type(fn).__name__}, and takes no "
                "HTTP requests"
            )
        result = await self.run_together((fn, item))
        if isinstance(result, SweepError):
            raise result.error
        return result

    @serve.batch  # type: ignore[untyped-decorator]  # Ray is untyped here
    async def run_together(self, calls: list[Call]) -> list[Any]:
        """The requests that arrived together, as the invokes of one trace."""
        return await asyncio.to_thread(run_chunk, self.model, calls, 0, self.grad)


def serve_model(
    load_model: Callable[[], Any],
    max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.01,
    grad: bool = False,
    **deployment_options: Any,
) -> Any:
    """A Ray Serve deployment holding the model `load_model()` builds, bound and ready for
    `serve.run`: concurrent requests run together as the invokes of one trace.

    A request is `handle.remote(fn, item)`: its answer is `fn(model, item)` run as
    `tr.invoke(item).run(fn, model, item)` (a dict item is the keyword inputs), exactly what a
    trace of its own gives; an exception `fn` raises is raised for that request only. Requests
    that arrive within `batch_wait_timeout_s` of each other share one forward pass, up to
    `max_batch_size` of them. Traces run under `torch.no_grad()` unless `grad=True`.
    `deployment_options` go to Serve's `.options(...)` (`num_replicas`, `ray_actor_options`, ...).

    **Trusted clients only**: the deployment runs the code its clients send (functions pickled
    with cloudpickle). It takes requests through handles only, never over HTTP; Serve's HTTP
    proxy listens on localhost unless you configure it otherwise, and
    `serve.run(app, route_prefix=None)` gives the deployment no HTTP route at all.

    Example:

        from ray import serve
        import mediator.ray
        from mediator.models import load_induction

        handle = serve.run(mediator.ray.serve_model(load_induction), route_prefix=None)
        model = mediator.ray.Client(handle)
        top = model(lambda model, ids: model.output[:, -1].argmax(-1), ids)
    """
    options = {"name": "mediator_model", "max_ongoing_requests": 2 * max_batch_size}
    deployment = serve.deployment(ModelServer).options(**(options | deployment_options))
    return deployment.bind(load_model, max_batch_size, batch_wait_timeout_s, grad)


class Client:
    """A served model that looks like a local call: `client(fn, item)` is `fn(model, item)`.

    Wraps the `DeploymentHandle` that `serve.run(serve_model(...))` returns. A call waits for
    its answer; an exception the function raised on the server is raised here, with its own
    type. `client.submit(fn, item)` returns Serve's response object at once (`.result()` waits).

    Example:

        client = mediator.ray.Client(serve.run(mediator.ray.serve_model(load_induction)))
        futures = [client.submit(patch, ids) for ids in prompts]   # all co-batched
        answers = [future.result() for future in futures]
    """

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    def submit(self, fn: Experiment, item: Any) -> Any:
        """Send the request now; the response's `.result()` waits for the answer."""
        return self.handle.remote(fn, item)

    def __call__(self, fn: Experiment, item: Any) -> Any:
        return self.submit(fn, item).result()
