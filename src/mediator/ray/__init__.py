"""mediator on Ray: patching sweeps over many workers, and one model served to many clients.

Imported explicitly (`import mediator.ray`); it needs Ray (`pip install "mediator[ray]"`), which
`import mediator` never loads. Both halves co-batch: a sweep's worker runs a chunk of items as the
invokes of one trace, and a served model runs the requests that arrive together as one trace;
each result is what the same function gives in a trace of its own.

Example:

    import ray, mediator.ray
    ray.init()                                   # a local Ray, or ray.init(address=...)
    for result in mediator.ray.sweep(load_model, experiment, prompts):
        ...
"""

from ._chunk import SweepError
from ._serve import Client, serve_model
from ._sweep import sweep

__all__ = ["Client", "SweepError", "serve_model", "sweep"]
