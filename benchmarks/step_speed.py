"""Optimizer step cost: ``celo_hf.Celo`` and ``celo_hf.Celo2`` against ``torch.optim.AdamW`` (foreach and fused).

For each model it prints the median wall time of one ``optimizer.step()`` and the extra memory the
step needs, in bytes per parameter, for Celo and for AdamW with ``foreach=True`` and ``fused=True``,
and the ratios of the medians::

    python benchmarks/step_speed.py                      # 1M/10M/50M plain, transformer-like, 40 tiny tensors
    python benchmarks/step_speed.py --quick              # tiny models, a few seconds (smoke test)
    python benchmarks/step_speed.py --markdown --json step_speed.json
    python benchmarks/step_speed.py --models plain --sizes 10M --celo-backends eager compile cpp

Models (only their parameter shapes matter to an optimizer):

* ``plain-<size>``: four ``Linear(w, w)`` layers with biases (8 tensors), ``w`` chosen for the size;
* ``transformer``: 40 tensors shaped like a small transformer (token and position embeddings, three
  layers of LayerNorm, qkv, attention-out and two MLP weights with biases, a final LayerNorm);
* ``tiny40``: 40 tensors of at most 1,024 elements (biases, LayerNorms, small matrices), to expose the
  fixed cost per tensor and per step.

Timing. One thread (``torch.set_num_threads``), float32 parameters. Gradients are fixed random tensors
set once (shared by the contenders, which do not modify them); each contender owns its own copy of
the parameters. Only ``optimizer.step()`` is timed (Celo gets the loss as ``step(loss=...)``, a 0-d
tensor as a training loop would hand it). After ``--warmup`` untimed steps per contender, ``--rounds``
interleaved rounds follow: in each round every contender runs ``--steps`` steps in turn, each timed
alone (on CUDA between two ``torch.cuda.synchronize()``). Interleaving spreads the machine's drifts
(other processes, frequency changes) over all contenders alike. Reported: the median over all timed
steps, its spread as the inter-quartile range (IQR) in % of that median, and ratios of medians with, in
brackets, the lowest and highest ratio of per-round medians (how much the noise moved the ratio).

Memory. After the warm-up, each contender gets a *fresh* optimizer over the same parameters, and
its first two steps are measured: ``state`` is what the first step allocated and kept (the optimizer
state), ``peak`` the largest amount of memory allocated beyond what existed before a step, over the
first step (state + temporaries) and the second (state + that step's temporaries). Both are per
parameter of the model.

* CPU: torch keeps no statistics for its CPU allocator, but its profiler records every allocation
  and free made through it when asked to (``torch.profiler.profile(profile_memory=True)``). The
  running sum of those events, in order, is the memory allocated since the step began; its maximum
  is the peak. Frees of blocks allocated while no profiler ran are not reported (torch warns about
  that once: expected), so memory that existed before never counts; a step may still bring the sum
  below zero by freeing what an earlier profiled step allocated. This sees everything that reaches the allocator: temporaries inside
  kernels (``foreach`` ops) and the buffers of ``torch.compile``-generated code too. (A
  ``TorchDispatchMode`` tracking new output storages sees neither, and under it ``torch.compile``
  falls back to eager execution; on eager Celo and AdamW both methods agree to 0.01 bytes per
  parameter.) ``tests/test_benchmarks.py`` checks the method on known allocations and on AdamW,
  which keeps two float32 moments (8 bytes per parameter) and, with ``foreach``, one float32
  temporary more at its peak.
* CUDA: ``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``, minus
  ``torch.cuda.memory_allocated()`` before the step.

Extending: a new optimizer is one more :class:`Contender` in :func:`contenders`; a new model one
more :class:`ModelSpec` in :func:`model_specs`. Throughput measures with another unit (issue 5's
population step, in task-steps per second) belong in their own section of :func:`main`, next to
:func:`benchmark_model`, with their own rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

import celo_hf
import celo_hf.population
from celo_hf.optimizer import BACKENDS

if TYPE_CHECKING:
    from celo_hf.celo2.network import Celo2Net

Shape = tuple[int, ...]
StepFn = Callable[[], object]

FOREACH = "AdamW-foreach"
FUSED = "AdamW-fused"
#: A planned run length far beyond the benchmark, so Celo never runs past it.
CELO_TOTAL_STEPS = 1_000_000


# ---- models ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSpec:
    """A model as the optimizer sees it: named parameter shapes."""

    name: str
    shapes: tuple[tuple[str, Shape], ...]

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for _, shape in self.shapes)


def plain_model(target_params: int, layers: int = 4) -> ModelSpec:
    """``layers`` ``Linear(w, w)`` layers with biases, ``w`` chosen to get about ``target_params``."""
    width = max(1, round(math.sqrt(target_params / layers)))
    layer = (("weight", (width, width)), ("bias", (width,)))
    shapes = tuple((f"layer{i}.{kind}", shape) for i in range(layers) for kind, shape in layer)
    return ModelSpec(f"plain-{format_count(target_params)}", shapes)


def transformer_model(vocab: int = 16384, width: int = 256, layers: int = 3, context: int = 512) -> ModelSpec:
    """Parameter shapes of a small pre-LayerNorm transformer: ``4 + 12 * layers`` tensors (40 for 3
    layers), about 6.7M parameters with the defaults."""
    shapes: list[tuple[str, Shape]] = [("tok_embed", (vocab, width)), ("pos_embed", (context, width))]
    for i in range(layers):
        shapes += [
            (f"h{i}.ln1.weight", (width,)), (f"h{i}.ln1.bias", (width,)),
            (f"h{i}.qkv.weight", (3 * width, width)), (f"h{i}.qkv.bias", (3 * width,)),
            (f"h{i}.attn_out.weight", (width, width)), (f"h{i}.attn_out.bias", (width,)),
            (f"h{i}.ln2.weight", (width,)), (f"h{i}.ln2.bias", (width,)),
            (f"h{i}.mlp_in.weight", (4 * width, width)), (f"h{i}.mlp_in.bias", (4 * width,)),
            (f"h{i}.mlp_out.weight", (width, 4 * width)), (f"h{i}.mlp_out.bias", (width,)),
        ]
    shapes += [("ln_f.weight", (width,)), ("ln_f.bias", (width,))]
    return ModelSpec("transformer", tuple(shapes))


def tiny_model(count: int = 40) -> ModelSpec:
    """``count`` tiny tensors cycling through four shapes (as biases, LayerNorms and small matrices
    repeat across the layers of a network)."""
    cycle: tuple[Shape, ...] = ((32,), (32, 32), (128,), (8, 32))
    return ModelSpec(f"tiny{count}", tuple((f"t{i}", cycle[i % len(cycle)]) for i in range(count)))


MODEL_KINDS = ("plain", "transformer", "tiny")


def model_specs(kinds: Sequence[str], plain_sizes: Sequence[int], quick: bool) -> list[ModelSpec]:
    """The models to run, in table order; ``quick`` shrinks the transformer to about 50K parameters."""
    specs: list[ModelSpec] = []
    if "plain" in kinds:
        specs += [plain_model(n) for n in plain_sizes]
    if "transformer" in kinds:
        specs.append(transformer_model(vocab=512, width=32, layers=3, context=64) if quick else transformer_model())
    if "tiny" in kinds:
        specs.append(tiny_model())
    return specs


def parse_count(text: str) -> int:
    """``"50M"`` -> 50_000_000, ``"20K"`` / ``"20k"`` -> 20_000, ``"1234"`` -> 1234."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"expected a parameter count such as 1M, 250K or 12345, got {text!r}")
    value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"a parameter count must be at least 1, got {text!r}")
    return round(value)


def format_count(n: int) -> str:
    """1_048_576 -> ``"1.05M"``, 50_000_000 -> ``"50M"``, 12_800 -> ``"12.8K"``."""
    for divisor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if n >= divisor:
            return f"{n / divisor:.3g}{suffix}"
    return str(n)


# ---- contenders -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Contender:
    """An optimizer under test. ``make_step(named_params, loss)`` builds a fresh optimizer over
    ``(name, parameter)`` pairs (whose ``.grad`` are set) and returns a function that runs one step of it."""

    name: str
    make_step: Callable[[list[tuple[str, torch.Tensor]], torch.Tensor], StepFn]


def celo_contender(net: celo_hf.CeloNet, backend: str) -> Contender:
    def make_step(named: list[tuple[str, torch.Tensor]], loss: torch.Tensor) -> StepFn:
        optimizer = celo_hf.Celo([p for _, p in named], total_steps=CELO_TOTAL_STEPS, weights=net, backend=backend)
        return lambda: optimizer.step(loss=loss)

    return Contender(f"Celo[{backend}]", make_step)


def celo2_contender(net: Celo2Net, backend: str = "auto") -> Contender:
    """Celo2 with its default routing by name (biases and embeddings to the Adam branch)."""
    def make_step(named: list[tuple[str, torch.Tensor]], loss: torch.Tensor) -> StepFn:
        return celo_hf.Celo2(named, weights=net, backend=backend).step

    return Contender("Celo2" if backend == "auto" else f"Celo2[{backend}]", make_step)


def adamw_contender(name: str, **options: bool) -> Contender:
    def make_step(named: list[tuple[str, torch.Tensor]], loss: torch.Tensor) -> StepFn:
        return torch.optim.AdamW([p for _, p in named], lr=1e-3, **options).step

    return Contender(name, make_step)


def contenders(
    net: celo_hf.CeloNet, celo_backends: Sequence[str], celo2: Celo2Net | None, celo2_backends: Sequence[str] = ("auto",)
) -> list[Contender]:
    """Celo (one contender per backend), Celo2 (per backend; none if ``celo2`` is ``None``), then the
    two AdamW baselines the ratios refer to."""
    return [
        *(celo_contender(net, backend) for backend in celo_backends),
        *(celo2_contender(celo2, backend) for backend in (celo2_backends if celo2 is not None else ())),
        adamw_contender(FOREACH, foreach=True),
        adamw_contender(FUSED, fused=True),
    ]


# ---- measurements ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepMemory:
    """Bytes allocated by one step beyond what existed before it: the most at any moment
    (``peak``) and what was still allocated when it returned (``retained``)."""

    peak: int
    retained: int


def measure_step_memory(step: StepFn, device: torch.device) -> StepMemory:
    """Run ``step`` once and measure its allocations (see the module docstring for the method)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        peak, after = torch.cuda.max_memory_allocated(device), torch.cuda.memory_allocated(device)
        return StepMemory(peak - before, after - before)
    if device.type != "cpu":
        raise ValueError(f"memory can be measured on cpu or cuda devices, got {device}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        step()
    events = [
        e for e in profile.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return StepMemory(peak, live)


def optimizer_memory(
    contender: Contender, params: list[tuple[str, torch.Tensor]], loss: torch.Tensor, device: torch.device
) -> tuple[int, int]:
    """``(state bytes, peak bytes)`` of a fresh optimizer's first two steps (module docstring)."""
    step = contender.make_step(params, loss)
    first = measure_step_memory(step, device)
    second = measure_step_memory(step, device)
    return first.retained, max(first.peak, first.retained + second.peak)


def timed_step(step: StepFn, device: torch.device) -> float:
    """Seconds one call of ``step`` takes (device work included)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@dataclass
class Row:
    """One line of the table: one contender on one model. Times in milliseconds, memory in bytes per
    parameter; ``*_range``: lowest and highest ratio of per-round medians."""

    model: str
    params: int
    tensors: int
    optimizer: str
    ms_per_step: float
    iqr_pct: float
    vs_foreach: float
    vs_foreach_range: tuple[float, float]
    vs_fused: float
    vs_fused_range: tuple[float, float]
    state_bytes_per_param: float
    peak_bytes_per_param: float
    timed_steps: int


def ratios(times: list[list[float]], baseline: list[list[float]]) -> tuple[float, tuple[float, float]]:
    """Ratio of the overall medians, and the range of the ratios of per-round medians."""
    overall = statistics.median(sum(times, [])) / statistics.median(sum(baseline, []))
    per_round = [statistics.median(t) / statistics.median(b) for t, b in zip(times, baseline)]
    return overall, (min(per_round), max(per_round))


def benchmark_model(
    spec: ModelSpec, racers: list[Contender], device: torch.device, rounds: int, steps: int, warmup: int, seed: int,
    log: Callable[[str], None],
) -> list[Row]:
    """Warm up, measure memory, then time ``rounds`` interleaved rounds; one row per contender."""
    generator = torch.Generator().manual_seed(seed)
    initial = [torch.randn(shape, generator=generator) * 0.02 for _, shape in spec.shapes]
    grads = [torch.randn(shape, generator=generator).to(device) for _, shape in spec.shapes]
    loss = torch.tensor(2.5, device=device)

    def fresh_params() -> list[tuple[str, torch.Tensor]]:
        params = [(name, torch.nn.Parameter(t.to(device))) for (name, _), t in zip(spec.shapes, initial)]
        for (_, p), g in zip(params, grads):
            p.grad = g
        return params

    params = {c.name: fresh_params() for c in racers}
    stepper = {c.name: c.make_step(params[c.name], loss) for c in racers}
    for c in racers:
        for _ in range(warmup):
            stepper[c.name]()
    memory = {c.name: optimizer_memory(c, params[c.name], loss, device) for c in racers}
    gc.collect()

    times: dict[str, list[list[float]]] = {c.name: [] for c in racers}
    for r in range(rounds):
        for c in racers:
            times[c.name].append([timed_step(stepper[c.name], device) * 1e3 for _ in range(steps)])
        medians = ", ".join(f"{c.name} {statistics.median(times[c.name][-1]):.3g} ms" for c in racers)
        log(f"  {spec.name} round {r + 1}/{rounds}: {medians}")

    rows = []
    for c in racers:
        flat = sum(times[c.name], [])
        median = statistics.median(flat)
        q1, _, q3 = statistics.quantiles(flat, n=4, method="inclusive") if len(flat) > 1 else (median, median, median)
        vs_foreach, foreach_range = ratios(times[c.name], times[FOREACH])
        vs_fused, fused_range = ratios(times[c.name], times[FUSED])
        state, peak = memory[c.name]
        rows.append(Row(
            spec.name, spec.numel, len(spec.shapes), c.name, median, 100 * (q3 - q1) / median,
            vs_foreach, foreach_range, vs_fused, fused_range, state / spec.numel, peak / spec.numel, len(flat),
        ))
    return rows


# ---- output ---------------------------------------------------------------------------------------

COLUMNS = (
    "model", "params", "tensors", "optimizer", "ms/step", "IQR", "x AdamW-foreach", "x AdamW-fused",
    "state B/param", "peak B/param",
)


def _ms_cell(ms: float) -> str:
    """Three significant digits without exponents: ``"8630"``, ``"67.9"``, ``"0.213"``."""
    return f"{ms:.0f}" if ms >= 100 else f"{ms:.3g}"


def _ratio_cell(ratio: float, bounds: tuple[float, float]) -> str:
    """``"2.13 (1.98-2.40)"``; a contender against itself is just ``"1.00"``."""
    if bounds == (ratio, ratio):
        return f"{ratio:.2f}"
    return f"{ratio:.2f} ({bounds[0]:.2f}-{bounds[1]:.2f})"


def table_cells(rows: list[Row]) -> list[list[str]]:
    return [
        [
            row.model, format_count(row.params), str(row.tensors), row.optimizer, _ms_cell(row.ms_per_step),
            f"{row.iqr_pct:.0f}%", _ratio_cell(row.vs_foreach, row.vs_foreach_range),
            _ratio_cell(row.vs_fused, row.vs_fused_range), f"{row.state_bytes_per_param:.1f}",
            f"{row.peak_bytes_per_param:.1f}",
        ]
        for row in rows
    ]


def render(rows: list[Row], markdown: bool) -> str:
    """The table as GitHub markdown or as aligned plain text."""
    lines = [list(COLUMNS), *table_cells(rows)]
    numeric = [i >= 4 for i in range(len(COLUMNS))]  # right-aligned columns
    if markdown:
        rule = "|" + "|".join("---:" if right else "---" for right in numeric) + "|"
        cells = ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join([cells[0], rule, *cells[1:]])
    widths = [max(len(text) for text in column) for column in zip(*lines)]
    return "\n".join(
        "  ".join(text.rjust(w) if right else text.ljust(w) for text, w, right in zip(line, widths, numeric))
        for line in lines
    )


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """What the figures depend on, for the header and the JSON file."""
    info: dict[str, object] = {
        "command": " ".join(["python", "benchmarks/step_speed.py", *sys.argv[1:]]),
        "torch": torch.__version__, "celo_hf": celo_hf.__version__, "python": platform.python_version(),
        "device": str(device), "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "rounds": args.rounds, "steps_per_round": args.steps, "warmup": args.warmup,
        "weights": args.weights or "CeloNet() (random init)",
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- command line ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_count, help="plain model sizes (default 1M 10M 50M)")
    parser.add_argument("--models", nargs="+", choices=MODEL_KINDS, default=list(MODEL_KINDS), help="models to run")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds (default 7)")
    parser.add_argument("--steps", type=int, help="timed steps per contender per round (default 3)")
    parser.add_argument("--warmup", type=int, help="untimed steps per contender first (default 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--weights", help="Celo weights (file, folder, Hub id); default: a random CeloNet()")
    parser.add_argument("--no-celo2", dest="celo2", action="store_false", help="leave Celo2 out (a random Celo2Net())")
    parser.add_argument(
        "--celo2-backends", nargs="+", default=["auto"], choices=["auto", "eager", "compile", "cpp"],
        help="one Celo2 contender per backend (default: auto, the optimizer's default, named plain 'Celo2')",
    )
    parser.add_argument(
        "--celo-backends", nargs="+", choices=[b for b in BACKENDS if b != "reference"],
        help="one Celo contender per backend (default: eager, plus on CPU cpp, which the default 'auto' runs there)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny models, 2 rounds: a smoke test of a few seconds")
    parser.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    parser.add_argument("--json", type=Path, help="also write the rows and the environment to this file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--population", type=int, default=32, metavar="P",
                        help="also time meta-training's population step with P members (0: skip; default 32)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {"sizes": [20_000, 100_000] if quick else [10**6, 10**7, 5 * 10**7], "rounds": 2 if quick else 7,
                "steps": 2 if quick else 3, "warmup": 1 if quick else 2}
    defaults["celo_backends"] = ["eager", "cpp"] if torch.device(args.device).type == "cpu" else ["eager"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be at least 0, got {args.warmup}")
    return args


def population_throughput(members: int, backends: Sequence[str], rounds: int, net: celo_hf.CeloNet, log) -> str:
    """Meta-training throughput: one inner step of ``members`` copies of the 64-32-10 MLP task
    (batch 64: loss, gradients and the population Celo update), in task-steps per second.
    Returns a markdown table; the Celo update's share of the step is reported too."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from meta_training import inner

    theta = {k: v[None].expand(members, *v.shape).contiguous() for k, v in net.state_dict().items()}
    lines = ["| population step | members | task-steps/s | ms/step | Celo update share |", "|---|---:|---:|---:|---:|"]
    for backend in backends:
        generator = torch.Generator().manual_seed(0)
        params = inner.init_params(members, [generator] * members)
        scales = {name: torch.ones_like(p) for name, p in params.items()}
        state = celo_hf.population.init(params, torch.full((members,), 1000), theta, net)
        x = torch.rand(members, 64, 64, generator=generator)
        y = torch.randint(10, (members, 64), generator=generator)
        totals, updates = [], []
        for step in range(2 + rounds * 3):
            start = time.perf_counter()
            loss, grads = inner.losses_and_grads(params, scales, x, y)
            middle = time.perf_counter()
            state = celo_hf.population.update(state, params, grads, loss, theta, net, backend)
            end = time.perf_counter()
            if step >= 2:
                totals.append(end - start)
                updates.append(end - middle)
        total, update = statistics.median(totals), statistics.median(updates)
        log(f"population[{backend}]: {total * 1e3:.1f} ms per step of {members} tasks")
        lines.append(f"| Celo[{backend}] | {members} | {members / total:,.0f} | {total * 1e3:.1f} | {update / total:.0%} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch build has no usable CUDA device")
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    net = celo_hf.load_celo_net(args.weights) if args.weights else celo_hf.CeloNet()
    from celo_hf.celo2.network import Celo2Net  # here: benchmarks/step_instructions.py imports this file's models
    # with an older celo_hf, which has no Celo2

    racers = contenders(net, args.celo_backends, Celo2Net() if args.celo2 else None, args.celo2_backends)
    gc.freeze()  # the many long-lived objects of torch's imports: keep collections short and rare
    info = environment(args, device)
    log(" ".join(f"{k}={v}" for k, v in info.items()))

    rows: list[Row] = []
    for spec in model_specs(args.models, args.sizes, args.quick):
        log(f"{spec.name}: {spec.numel:,} parameters in {len(spec.shapes)} tensors")
        rows += benchmark_model(spec, racers, device, args.rounds, args.steps, args.warmup, args.seed, log)
        gc.collect()
    print(render(rows, args.markdown))
    if args.population:
        print(population_throughput(args.population, args.celo_backends, args.rounds, net, log))
    if args.json is not None:
        args.json.write_text(json.dumps({"environment": info, "rows": [asdict(row) for row in rows]}, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
