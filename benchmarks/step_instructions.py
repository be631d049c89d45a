"""Instructions per optimizer step, before and after a change: a deterministic companion of step_speed.py.

    python benchmarks/step_instructions.py --base 752f288                  # eager and cpp, three models
    python benchmarks/step_instructions.py --base 752f288 --backends eager cpp compile --steps 3

Wall-clock ratios on a shared machine scatter by +-15% from run to run, too much to show a 5%
difference. This counts the machine instructions one ``Celo.step()`` executes instead, with
valgrind's callgrind: the Python process runs uninstrumented through its imports, the model set-up
and ``--warmup`` steps (kernels built, caches filled), then a tiny C helper compiled here switches
callgrind's instrumentation on (``CALLGRIND_START_INSTRUMENTATION``) for ``--steps`` steps and off
again. The count is the same on every run of the same code (to about 0.1%: Python's allocator and
hash seeds are fixed by ``PYTHONHASHSEED=0``), whatever else the machine does. It counts work, not
time: memory stalls and vector width are not in it, so it complements ``step_speed.py``'s timed
ratios for changes that move work around (the restructuring of the update core, which changed
Python dispatch, not the kernels' arithmetic).

Each (backend, model) runs once on the base revision and once on the ``--after`` revision (each
checked out into a temporary git worktree, its own ``celo_hf`` on the path; default ``HEAD``), with the same script and the same seeded
parameters and gradients (models from ``step_speed.py``). The ``cpp`` kernels are built without
AVX-512 for both (valgrind cannot run it). Needs valgrind with its headers
(``valgrind/callgrind.h``) and a C compiler. Prints (and with ``--out`` writes) a markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODELS = ("plain-1M", "transformer", "tiny40")
_MARKER_SOURCE = """
#include <valgrind/callgrind.h>
void instrumentation_on(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void instrumentation_off(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""


def compiler_without_avx512(folder: Path) -> Path:
    """A C++ compiler command for the ``cpp`` backend's build: the system's, with AVX-512 off
    (valgrind does not emulate AVX-512; ``-march=native`` would emit it on a CPU that has it)."""
    wrapper = folder / "cxx-no-avx512"
    compiler = os.environ.get("CXX") or shutil.which("c++") or "g++"
    wrapper.write_text(f'#!/bin/sh\nexec {compiler} "$@" -mno-avx512f\n')
    wrapper.chmod(0o755)
    return wrapper


def build_marker(folder: Path) -> Path:
    """The shared library whose two functions switch callgrind's instrumentation on and off."""
    source, library = folder / "marker.c", folder / "libmarker.so"
    source.write_text(_MARKER_SOURCE)
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    return library


def child(marker: Path, backend: str, model: str, warmup: int, steps: int) -> None:
    """Runs inside valgrind: one Celo over ``model``'s shapes, ``warmup`` steps, then ``steps``
    instrumented ones."""
    import ctypes

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    import step_speed

    import celo_hf

    tree = Path(os.environ["PYTHONPATH"]).resolve()
    if not Path(celo_hf.__file__).resolve().is_relative_to(tree):
        raise RuntimeError(f"imported {celo_hf.__file__}, not the celo_hf of {tree}")
    torch.set_num_threads(1)
    spec = {s.name: s for s in step_speed.model_specs(step_speed.MODEL_KINDS, [10**6], quick=False)}[model]
    generator = torch.Generator().manual_seed(0)
    params = []
    for _, shape in spec.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02)
        p.grad = torch.randn(shape, generator=generator)
        params.append(p)
    optimizer = celo_hf.Celo(params, total_steps=10**6, weights=celo_hf.CeloNet(), backend=backend)
    loss = torch.tensor(2.5)
    for _ in range(warmup):
        optimizer.step(loss=loss)
    lib = ctypes.CDLL(str(marker))
    lib.instrumentation_on()
    for _ in range(steps):
        optimizer.step(loss=loss)
    lib.instrumentation_off()


def count(tree: Path, marker: Path, backend: str, model: str, warmup: int, steps: int, scratch: Path) -> float:
    """Instructions per step of ``tree``'s ``celo_hf`` (its C++ kernels built in ``scratch``)."""
    out = scratch / f"callgrind.{tree.name}.{backend}.{model}"
    command = [
        "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}.%p",
        sys.executable, str(Path(__file__).resolve()), "--child", str(marker), backend, model, str(warmup), str(steps),
    ]
    env = {
        **os.environ, "PYTHONPATH": str(tree), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1",
        "CXX": str(compiler_without_avx512(scratch)), "CELO_HF_KERNEL_CACHE": str(scratch / f"kernels-{tree.name}"),
    }
    subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True, text=True)
    totals = []
    for dump in scratch.glob(f"{out.name}.*"):
        match = re.search(r"^totals:\s+(\d+)", dump.read_text(errors="replace"), flags=re.MULTILINE)
        if match:
            totals.append(int(match.group(1)))
        dump.unlink()
    if not totals:
        raise RuntimeError(f"callgrind wrote no summary for {backend} / {model} in {tree}")
    return max(totals) / steps


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        marker, backend, model, warmup, steps = argv[1:6]
        child(Path(marker), backend, model, int(warmup), int(steps))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the revision to compare against")
    parser.add_argument("--after", default="HEAD", help="the revision measured against it (default HEAD)")
    parser.add_argument("--backends", nargs="+", default=["eager", "cpp"])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed (apt install valgrind): this benchmark runs under callgrind")
    lines = [
        f"Instructions per `Celo.step()` (callgrind, {args.steps} steps after {args.warmup} warm-up steps, one thread), "
        f"base {args.base} vs {args.after}: `python benchmarks/step_instructions.py --base {args.base} "
        f"--after {args.after} --backends {' '.join(args.backends)}`",
        "",
        "| model | backend | instructions / step before | after | after / before |",
        "|---|---|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as folder:
        scratch = Path(folder)
        marker = build_marker(scratch)
        trees = {"base": scratch / "base", "after": scratch / "after"}
        for name, tree in trees.items():
            revision = args.base if name == "base" else args.after
            subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), revision], cwd=REPO, check=True)
        try:
            for model in args.models:
                for backend in args.backends:
                    before, after = (
                        count(tree, marker, backend, model, args.warmup, args.steps, scratch) for tree in trees.values()
                    )
                    lines.append(f"| {model} | {backend} | {before:,.0f} | {after:,.0f} | {after / before:.3f} |")
                    print(lines[-1], flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)
    table = "\n".join(lines)
    if args.out:
        args.out.write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
