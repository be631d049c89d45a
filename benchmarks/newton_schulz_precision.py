"""How the arithmetic precision of Celo2's Newton-Schulz changes its result, and what it costs.

    python benchmarks/newton_schulz_precision.py                     # CPU: float32 and bfloat16
    python benchmarks/newton_schulz_precision.py --device cuda --out benchmarks/results/gpu/newton_schulz_precision.md

Celo2 orthogonalises each matrix step in float32 (:func:`celo_hf.celo2.newton_schulz.orthogonalize`,
as the original on CPU). Faster arithmetic is tempting on a GPU: TF32 matmuls
(``torch.backends.cuda.matmul.allow_tf32``) or bfloat16 inputs, as Muon implementations use. For
matrices of transformer-like shapes with a well-spread spectrum (Gaussian entries) and an
ill-conditioned one (singular values decaying over four decades, as the directions of a learned
rule can be), this prints the relative RMS difference of the final step ``u`` (Newton-Schulz, then
RMS 1, what Celo2 subtracts times ``lr``) from a float64 run, and the median time of one call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from celo_hf.celo2.newton_schulz import orthogonalize

SHAPES = ((256, 256), (768, 768), (768, 3072), (2048, 2048))


def matrices(shape: tuple[int, int], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A Gaussian matrix and one with singular values from 1 down to 1e-4, float64."""
    gaussian = torch.randn(shape, generator=generator, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(torch.randn(shape, generator=generator, dtype=torch.float64), full_matrices=False)
    spectrum = torch.logspace(0, -4, min(shape), dtype=torch.float64)
    return {"gaussian": gaussian, "ill-conditioned": (u * spectrum) @ vh}


def step(x: torch.Tensor) -> torch.Tensor:
    """Newton-Schulz, then RMS 1 (the last two stages of Celo2's learned branch), in float64."""
    u = orthogonalize(x).double()
    return u * torch.rsqrt(1e-9 + u.square().mean())


def timed(fn, x: torch.Tensor, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    precisions = ["float32", "bfloat16"] + (["tf32"] if device.type == "cuda" else [])
    lines = [
        f"Newton-Schulz precision on {device} (`python benchmarks/newton_schulz_precision.py --device {args.device}`): "
        "relative RMS difference of the step from float64, and ms per call",
        "",
        "| shape | matrix | " + " | ".join(f"{p} difference | {p} ms" for p in precisions) + " |",
        "|---|---|" + "---:|---:|" * len(precisions),
    ]
    generator = torch.Generator().manual_seed(0)
    for shape in SHAPES:
        for kind, x64 in matrices(shape, generator).items():
            exact = step(x64.to(device))
            cells = []
            for precision in precisions:
                x = x64.to(device, torch.bfloat16 if precision == "bfloat16" else torch.float32)
                if device.type == "cuda":
                    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
                difference = (step(x) - exact).square().mean().sqrt() / exact.square().mean().sqrt()
                cells += [f"{difference.item():.1e}", f"{timed(orthogonalize, x, device, args.repeats) * 1e3:.1f}"]
            lines.append(f"| {shape[0]}x{shape[1]} | {kind} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    table = "\n".join(lines)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main()
