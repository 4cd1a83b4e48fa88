"""mediator: read and overwrite any intermediate value of a PyTorch model while it runs.

Each intervention (an invoke body, or a plain function) runs in its own thread as a Mediator;
the Interleaver meets those threads at module boundaries; the Batcher runs all invokes of a
trace as one batched forward pass. See the project's README for a tour.

Example:

    import mediator
    model = mediator.Model(net)
    with model.trace(x):
        h = model.layers[1].output
        model.layers[1].output = h * 2
        logits = model.output
"""

from . import models
from ._aliases import standard_renames
from ._barrier import Barrier
from ._batcher import Batcher
from ._causal_lm import CausalLMBatcher
from ._envoy import Envoy, Model
from ._errors import (
    LateEditWarning,
    MediatorError,
    MissedProviderError,
    OutOfOrderError,
    RowlessValueWarning,
    ShapeError,
    SourceUnavailableError,
    StoppedWarning,
    UsageError,
)
from ._language_model import LanguageModel
from ._layouts import BatchDims
from ._tracer import Invoke, Tracer

__all__ = [
    "Barrier",
    "BatchDims",
    "Batcher",
    "CausalLMBatcher",
    "Envoy",
    "Invoke",
    "LanguageModel",
    "LateEditWarning",
    "MediatorError",
    "MissedProviderError",
    "Model",
    "OutOfOrderError",
    "RowlessValueWarning",
    "ShapeError",
    "SourceUnavailableError",
    "StoppedWarning",
    "Tracer",
    "UsageError",
    "models",
    "standard_renames",
]

__version__ = "0.1.0"
