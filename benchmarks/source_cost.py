"""What `.source` costs: plain calls of a model whose forward has been rewritten, against the
unwrapped forward, and a read of an operation's value against a read of a module's output.

Run: `python benchmarks/source_cost.py`. Prints the two ratios (plain calls should be 1.00x;
an operation read should cost about what a module read costs).
"""

import time

import torch
from torch import nn

import mediator


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.fc(x), -1) * x


def best(run, repeats: int = 7, number: int = 300) -> float:
    """The best mean seconds per call over `repeats` rounds of `number` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(number):
            run()
        times.append((time.perf_counter() - start) / number)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(*(Block(64) for _ in range(8)))
    x = torch.randn(8, 16, 64)
    model = mediator.Model(net)
    with torch.no_grad():
        before = best(lambda: net(x))
        model[3].source  # noqa: B018 - the forward of block 3 is rewritten now
        after = best(lambda: model(x))

        def module_read() -> None:
            with model.trace(x):
                model[3].fc.output  # noqa: B018

        def source_read() -> None:
            with model.trace(x):
                model[3].source.fc_0.output  # noqa: B018

        module = best(module_read, number=100)
        source = best(source_read, number=100)
    print(
        f"plain call after .source: {after * 1e6:.1f} us vs {before * 1e6:.1f} us unwrapped "
        f"= {after / before:.3f}x"
    )
    print(
        f"trace reading an operation: {source * 1e6:.1f} us vs a module read "
        f"{module * 1e6:.1f} us = {source / module:.3f}x"
    )


if __name__ == "__main__":
    main()
