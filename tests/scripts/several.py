"""Several tests/scripts/ runs in one process, or in one torchrun launch: each process imports torch
and transformers and joins the process group once for all of them (a launch of 2 processes costs
about 15 s of CPU before any training).

    torchrun --standalone --nproc_per_node 2 tests/scripts/several.py OUT_DIR ddp_trainer plain_loops
    python tests/scripts/several.py OUT_DIR ddp_trainer

Each named module's ``run(out_dir, world_size)`` writes into ``OUT_DIR/<name>/``, in the order given.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_setup import process_group, process_setup  # noqa: E402

#: The scripts that offer ``run(out_dir, world_size)``.
RUNS = ("fsdp_equivalence", "ddp_trainer", "plain_loops", "fsdp_trainer", "celo2_distributed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("names", nargs="+", choices=RUNS)
    args = parser.parse_args()
    world_size = process_setup()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    with process_group(world_size):
        for name in args.names:
            out_dir = args.out_dir / name
            out_dir.mkdir(parents=True, exist_ok=True)
            importlib.import_module(name).run(out_dir, world_size)


if __name__ == "__main__":
    main()
