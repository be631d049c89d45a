"""Accuracy cost of storing Celo's momenta and second moment in bfloat16 (``moment_dtype``).

    python benchmarks/moment_precision.py [--weights PATH_OR_ID] [--steps 300] [--seeds 3]

Trains two small problems with float32 and with bfloat16 moments from the same seeds and prints a
markdown table: mean final training loss (average of the last 20 steps) for each, and the median
relative change of the final parameters.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from pathlib import Path

import torch

from celo_hf import Celo
from celo_hf.hub import load_celo_net

PAPER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "celo_theta.state"


def regression(seed: int) -> tuple[torch.nn.Module, callable]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 32, generator=generator)
    y = torch.sin(x @ torch.randn(32, 1, generator=generator))
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))

    def loss() -> torch.Tensor:
        batch = torch.randint(0, len(x), (128,), generator=generator)
        return torch.nn.functional.mse_loss(model(x[batch]), y[batch])

    return model, loss


def digits(seed: int) -> tuple[torch.nn.Module, callable]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))

    def loss() -> torch.Tensor:
        batch = torch.randint(0, len(x), (64,), generator=generator)
        return torch.nn.functional.cross_entropy(model(x[batch]), y[batch])

    return model, loss


def train(problem, seed: int, net, moment_dtype: torch.dtype, steps: int) -> tuple[float, torch.Tensor]:
    model, loss_fn = problem(seed)
    optimizer = Celo(model.parameters(), total_steps=steps, weights=copy.deepcopy(net), moment_dtype=moment_dtype)
    tail = []
    for step in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(loss=loss.detach())
        if step >= steps - 20:
            tail.append(loss.item())
    return sum(tail) / len(tail), torch.cat([p.detach().flatten() for p in model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(PAPER))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    net = load_celo_net(args.weights)
    print("| problem | final loss, float32 moments | final loss, bfloat16 moments | ratio | median relative parameter change |")
    print("|---|---|---|---|---|")
    for name, problem in (("MLP regression", regression), ("digits MLP", digits)):
        full, half, drift = [], [], []
        for seed in range(args.seeds):
            loss32, params32 = train(problem, seed, net, torch.float32, args.steps)
            loss16, params16 = train(problem, seed, net, torch.bfloat16, args.steps)
            full.append(loss32)
            half.append(loss16)
            drift.append(((params16 - params32).abs() / params32.abs().clamp(min=1e-8)).median().item())
        f, h = statistics.mean(full), statistics.mean(half)
        print(f"| {name} | {f:.4f} | {h:.4f} | {h / f:.3f} | {statistics.median(drift):.2e} |")


if __name__ == "__main__":
    main()
