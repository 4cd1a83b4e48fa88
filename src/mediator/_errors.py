"""The exceptions `mediator` raises, one class per kind of mistake.

Every error says what happened, where (module path, call) and what to do instead. User exceptions
raised inside a body are never wrapped: they reach the caller with their own type and traceback.
"""

from __future__ import annotations


class MediatorError(Exception):
    """Base class of every error raised by `mediator` itself.

    Catch it to handle any mistake the library reports, whatever its kind. It is also raised
    as is for the rare cases that fit no subclass: a `tr.barrier(n)` that fewer than `n` bodies
    reached before the forward pass ended, or the future of a function whose trace was cancelled.
    Exceptions raised by your own code in a body, or by the model, are never wrapped in it.

    Example:

        try:
            with model.trace(x):
                h = model.layers[1].output
        except mediator.MediatorError as error:
            print("mediator says:", error)
    """


class UsageError(MediatorError, RuntimeError):
    """The API was used in a way it cannot work; the message says what to write instead.

    Raised, among others, for `.output`, `.inputs`, `.skip(...)`, `tr.stop()` or `tr.iter` used
    outside an invoke body; `tr.invoke(...)` inside `with model.trace(x):` (a trace given inputs
    is itself the single invoke) or inside another invoke's body; a trace where no invoke has
    inputs; `tr.result` read before the trace ran; generation options such as `max_new_tokens`
    given to `model.trace` instead of `model.generate`; `.output` of a container the model never
    calls itself (a `ModuleList`); `break`, `continue`, `return`, `yield` or `await` that would
    leave a with-body; context managers after the trace in the same `with` statement;
    `.run()` given a generator or coroutine function; and a write (swap, skip, in-place edit)
    inside a region run under reentrant activation checkpointing while gradients are on
    (backward would recompute it without the edit). It is a `RuntimeError` too.

    Example:

        h = model.layers[0].output          # UsageError: not inside an invoke body
        with model.trace(x):                # instead: read it inside a trace
            h = model.layers[0].output

        with model.trace(x) as tr:
            with tr.invoke(y):              # UsageError: model.trace(x) is the single invoke
                ...
        with model.trace() as tr:           # instead: no inputs on the trace, one invoke each
            with tr.invoke(x):
                ...
            with tr.invoke(y):
                ...
    """


class OutOfOrderError(MediatorError):
    """A body asked for a value the model had already computed (or skipped past).

    A body runs alongside the forward pass, so it must request values in the order the model
    computes them: a module's input before its output, and earlier modules before later ones.
    Reading, setting or skipping a boundary the model has passed raises this error in the body
    at once, at the line that made the request, naming the module and its call. To use an earlier
    value later, read it first and keep it in a name; to pass a value to another invoke, read it
    in an earlier invoke. After an open `tr.iter[...]` loop, requests target step 0 again, so a
    module read there is out of order too.

    Example:

        with model.trace(x):
            late = model.layers[3].output
            early = model.layers[0].output  # OutOfOrderError: layers.0 ran before layers.3

        with model.trace(x):                # instead: in the order the model runs
            early = model.layers[0].output
            late = model.layers[3].output
    """


class MissedProviderError(MediatorError):
    """A body asked for a value the model never produced in this forward pass.

    Raised in the body when the forward pass ends while the body still waits for a value: the
    module was not called for these inputs, or not as many times as the step asked for (a
    `tr.iter[k]` step beyond the last one `generate` ran). A value set with `.output = v` or a
    `.skip(v)` that the model never reached raises it too, naming the line of the set. Check
    which modules the model calls for these inputs (`print(model)` shows the tree) and how many
    steps it runs.

    Example:

        with model.generate(input_ids, max_new_tokens=3) as tr:
            for step in tr.iter[5]:         # MissedProviderError: only steps 0, 1 and 2 ran
                h = model.layers[0].output
    """


class ShapeError(MediatorError, ValueError):
    """A swapped value or a batched input does not have the shape the model needs.

    Raised when a value set with `.output = v`, `.inputs = ...`, `.input = v` or `.skip(v)` does
    not match what it replaces (the same structure, and tensors of the same shape; a tensor is
    moved to the device and dtype of the one it replaces, except across kinds, such as a float
    written over an integer tensor or a complex over a float), and when the inputs of several
    invokes cannot be batched together (different trailing dimensions, a different set of
    arguments, non-tensor arguments that differ). The message names the module or the input and
    the shape that was expected. Replace values with ones of the same shape (`h * 2`,
    `torch.zeros_like(h)`, in-place edits of `h`); pad inputs to one length, or trace them
    separately. It is a `ValueError` too.

    Example:

        with model.trace(x):
            h = model.layers[1].output
            model.layers[1].output = h[:, :4]           # ShapeError: expected h's shape
            model.layers[1].output = torch.zeros_like(h)  # fine: same shape
            model.layers[1].output = h.double()           # fine: cast back to h's dtype
    """

    def __init__(self, message: str = "", *, invokes: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.invokes = invokes  # the invokes whose inputs could not be batched (their lines
        # are added to the message when the trace reports it)


class SourceUnavailableError(UsageError):
    """The source of a with-block body cannot be found (`exec` of a string, an edited file).

    A with-body runs from its source code, which `mediator` reads from your file, notebook cell,
    `python -c` command or 3.13 REPL input, and checks against the code Python runs. `exec` of a
    string and the REPL before 3.13 keep no source, and a file edited after it was imported no
    longer matches. Use the function form there: it needs no source.

    Example:

        def read(layer):
            return model.layers[layer].output

        with model.trace() as tr:           # works in a REPL and in exec()
            future = tr.invoke(x).run(read, 1)
        h = future.result()
    """


class LateEditWarning(UserWarning):
    """A body changed a value in place after the model had already used it.

    `.output` gives the real tensor, so `h[:, 0] = 0` edits what the model computes with, but
    only while the model stands at that point. Once the body has asked for something the model
    computes later (or waited for another invoke's name), the model has moved on: an in-place
    edit of an earlier value then changes nothing in this forward pass. The warning names the
    value and is shown at the line of the body's next request; it says the edit lies between
    the line where the model moved on and that one. It covers edits made in the stretch of code
    right after the model moved past the value (where this mistake happens); an old value
    edited further on is not watched. Make the edit right after reading the value, or
    `.clone()` a value you want to change for your own use; filter the warning with
    `warnings.filterwarnings("ignore", category=mediator.LateEditWarning)`.

    Example:

        with model.trace(x):
            h = model.layers[0].output
            logits = model.output            # the model runs past layer 0 ...
            h[:] = 0                         # ... so this edit is too late: LateEditWarning

        with model.trace(x):                 # instead: edit where the value is read
            model.layers[0].output[:] = 0
            logits = model.output
    """


class StoppedWarning(UserWarning):
    """`tr.stop()` in one invoke cut another invoke's body short.

    `tr.stop()` ends the forward pass right after the point the model stands at. Another body
    still waiting then for something the model would compute later (a later `.output`, the next
    step of an open `tr.iter[...]` loop, `tr.result`) ends at that request, as if it returned
    there: the code after it does not run, the names it bound before keep their values and the
    ones it would have bound later keep their earlier values (a function invoke's future raises
    `MissedProviderError`). The trace still exits normally. The warning names the invoke and the
    request it was cut at, at the line of that request; the body that called `tr.stop()` gets
    none, and neither do bodies ended by a failing trace (its exception says what happened).
    Call `tr.stop()` after the last value every invoke needs; filter the warning with
    `warnings.filterwarnings("ignore", category=mediator.StoppedWarning)`.

    Example:

        with model.trace() as tr:
            with tr.invoke(x1):
                late = model.layers[3].output    # StoppedWarning: cut at layers.3.output
            with tr.invoke(x2):
                early = model.layers[1].output
                tr.stop()                        # the model ends after layers.1

        # `late` keeps the value it had before the trace; `early` is bound
    """


class RowlessValueWarning(UserWarning):
    """An invoke among several read a value that has no batch rows: the whole batch's value.

    A 0-dim tensor (a loss averaged over the batch, a norm, a count) cannot be cut to one
    invoke's rows, so an invoke reading it gets the value computed from every invoke's rows,
    not its own. The causal-LM batcher computes an HF `loss` per invoke instead (each invoke
    gets the loss of its own rows); for other models reading such a value from one invoke of
    several warns. An invoke without inputs (`tr.invoke()`) sees the whole batch and gets no
    warning. Compute the value from the invoke's own rows (its logits), or trace it alone.

    Example:

        with model.trace() as tr:
            with tr.invoke(x1, labels=y1):
                loss = model.output.loss      # RowlessValueWarning: the batch's mean loss
            with tr.invoke(x2, labels=y2):
                logits = model.output.logits
    """
