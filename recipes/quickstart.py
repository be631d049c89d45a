"""Celo in a plain PyTorch loop: fit a small MLP to a random teacher network, Celo vs AdamW.

    python recipes/quickstart.py [--weights PATH_OR_HUB_ID] [--steps 300]

Prints the training loss of both optimizers every 50 steps. No learning rate to tune for Celo.
"""

from __future__ import annotations

import argparse
import torch
from tqdm import tqdm

import celo_hf

def make_problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """4096 inputs in 32-D and the outputs of a random 2-layer teacher network."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4096, 32, generator=generator)
    teacher = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    with torch.no_grad():
        return x, teacher(x)


def train(make_optimizer, steps: int, label: str) -> list[float]:
    torch.manual_seed(1)
    x, y = make_problem()
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
    optimizer = make_optimizer(model)
    losses = []
    for step in tqdm(range(steps), desc=label):
        batch = torch.randint(0, len(x), (128,))
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step(loss=loss) if isinstance(optimizer, celo_hf.Celo) else optimizer.step()
        losses.append(loss.item())
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="Celo weights: file, folder or Hub id (default: embedded)")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    celo = train(lambda m: celo_hf.Celo(m.parameters(), total_steps=args.steps, weights=args.weights), args.steps, "Celo")
    adamw = train(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3), args.steps, "AdamW lr=1e-3")
    for step in range(0, args.steps, 50):
        window = slice(step, step + 50)
        print(f"steps {step:4d}-{step + 49:4d}  Celo {sum(celo[window]) / 50:.4f}  AdamW {sum(adamw[window]) / 50:.4f}")


if __name__ == "__main__":
    main()
