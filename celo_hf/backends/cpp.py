"""Hand-written C++ versions of the per-element kernels (``backend="cpp"``).

Same contract and maths as :mod:`celo_hf.backends.eager` (:class:`celo_hf.layout.Kernels`), plus
the whole of a float32 matrix batch's factored moments in one call (pass 0, the moving averages,
the preconditioner's factors and the row / column features' first-layer input, instead of some
fifty small torch operations). The source (``cpp_kernels.cpp``) writes each pass as one loop over a
chunk's elements in SIMD registers (AVX-512, AVX or plain 128-bit vectors, whichever the compiling
machine has): every element is read once per pass and nothing of full size is allocated. A matrix's
row and column factors stay factors. Passes 1 and 2 split large tensors into fixed blocks of rows
over ``torch.get_num_threads()`` threads; the blocks' partial sums are added in block order, so
results do not depend on the number of threads.

The library is compiled on first use with the system's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``; ``torch.compile`` on CPU needs one too), for this machine's CPU and the
rule's layout (:func:`celo_hf.layout.c_defines`: the configuration, the constants, the channel
offsets), and cached under ``$CELO_HF_KERNEL_CACHE`` (default ``~/.cache/celo_hf/kernels``), keyed
by the source, the flags, the defines, the compiler and the CPU. Arguments travel as small ctypes
structures that mirror the C++ ones. Float32 tensors are used in place; other dtypes (bfloat16
parameters or moments) go through float32 copies of each chunk, rounded back by torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..layout import (
    ROW_COL_GROUPS,
    Decays,
    FactoredStatistics,
    Factors,
    FoldedMlp,
    Grid,
    Kernels,
    CELO_CONSTANTS,
    KernelShape,
    Preconditioners,
    RuleConfig,
    RuleConstants,
    TensorState,
    UpdateWeights,
    c_defines,
    group_slices,
    kernel_channel_offsets,
    product,
    total,
)
from . import eager

SOURCE = Path(__file__).with_name("cpp_kernels.cpp")
FLAGS = ("-O3", "-march=native", "-std=gnu++17", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-pthread")

_Pointer = ctypes.c_void_p
_I64 = ctypes.c_int64


class GridArgs(ctypes.Structure):
    """``GridArgs`` of ``cpp_kernels.cpp``: a chunk's per-element arrays and their strides."""

    _fields_ = [
        *((name, _I64) for name in ("batch", "rows", "cols")),
        *((name, _Pointer) for name in ("p", "g", "m", "rms")),
        *((name, _I64) for name in ("p_sb", "p_sa", "g_sb", "g_sa", "m_sb", "m_sk", "m_sa", "rms_sb", "rms_sa")),
    ]


class FactorArgs(ctypes.Structure):
    """``Factors`` of ``cpp_kernels.cpp``: row and column parts of the preconditioners and of the
    first layer's extra input."""

    _fields_ = [(name, _Pointer) for name in ("qg_row", "qg_col", "qm_row", "qm_col", "h_row", "h_col")]


class MlpArgs(ctypes.Structure):
    """``MlpArgs`` of ``cpp_kernels.cpp``: pass 2's folded MLP."""

    _fields_ = [
        *((name, _Pointer) for name in ("first", "hidden_w", "hidden_b", "last_w", "last_b", "step_scale")),
        ("exp_mult", ctypes.c_float),
        ("direction_out", _Pointer), ("out_sb", _I64), ("out_sa", _I64),
    ]


class FactoredArgs(ctypes.Structure):
    """``FactoredArgs`` of ``cpp_kernels.cpp``: a matrix batch's factored-moment preparation."""

    _fields_ = [
        *((name, _I64) for name in ("batch", "rows", "cols", "d0")),
        ("g", _Pointer), ("g_sb", _I64), ("g_sa", _I64),
        *((name, _Pointer) for name in ("v_row", "v_col", "factored_decays", "first")),
        ("first_sb", _I64), ("groups", _I64 * 4), ("bias", _Pointer), ("bias_sb", _I64),
        *((name, _Pointer) for name in ("q_rows", "q_cols", "h_rows", "h_cols")),
    ]


class LayoutReport(ctypes.Structure):
    """``LayoutReport`` of ``cpp_kernels.cpp``: what a library was compiled with."""

    _fields_ = [
        *((name, ctypes.c_int32) for name in ("k", "h", "l", "channels")),
        ("offsets", ctypes.c_int32 * 10), ("constants", ctypes.c_float * 8),
    ]


_SIGNATURES = {
    "celo_layout": ([ctypes.POINTER(LayoutReport)], None),
    "celo_square_sums": ([_I64, _I64, _I64, _Pointer, _I64, _I64, _Pointer, _Pointer], None),
    "celo_factored_moments": ([ctypes.POINTER(FactoredArgs)], None),
    "celo_accumulate": (
        [ctypes.POINTER(GridArgs), ctypes.POINTER(FactorArgs), _Pointer, ctypes.c_float, ctypes.c_float, _Pointer,
         ctypes.c_int],
        None,
    ),
    "celo_mlp_step": ([ctypes.POINTER(GridArgs), ctypes.POINTER(FactorArgs), ctypes.POINTER(MlpArgs), ctypes.c_int], None),
}


def cache_dir() -> Path:
    """Where compiled libraries are kept."""
    configured = os.environ.get("CELO_HF_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "celo_hf" / "kernels"


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return candidate
    raise RuntimeError(
        "backend='cpp' compiles its kernels on first use and needs a C++ compiler, but none was found "
        "(looked for $CXX, c++, g++, clang++); install one (e.g. g++) or use backend='eager'"
    )


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    wanted = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def layout_of(lib: ctypes.CDLL) -> LayoutReport:
    """The configuration, channel offsets and constants ``lib`` was compiled with."""
    report = LayoutReport()
    lib.celo_layout(ctypes.byref(report))
    return report


@functools.cache
def library(shape: KernelShape) -> ctypes.CDLL:
    """The compiled kernels for rules of ``shape`` (built on first use, then cached)."""
    compiler = _compiler()
    defines = c_defines(shape)
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\n".join([SOURCE.read_text(), *FLAGS, *defines, compiler, version, _cpu_identity()]).encode()
    ).hexdigest()[:16]
    path = cache_dir() / f"celo_k{shape.decays}_h{shape.hidden}_l{shape.hidden_layers}_{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            built = Path(scratch) / path.name
            command = [compiler, *FLAGS, *defines, str(SOURCE), "-o", str(built)]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"compiling the cpp kernels failed ({' '.join(command)}):\n{result.stderr}")
            os.replace(built, path)  # atomic: concurrent builders (several processes) all succeed
    lib = ctypes.CDLL(str(path))
    for name, (argtypes, restype) in _SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, restype
    built = layout_of(lib)
    wanted_constants = torch.tensor(list(shape.constants.by_name().values()), dtype=torch.float32).tolist()
    if (built.k, built.h, built.l) != shape[:3] or list(built.constants) != wanted_constants:
        raise RuntimeError(
            f"{path} was built for {(built.k, built.h, built.l)} and constants {list(built.constants)}, "
            f"not {shape[:3]} and {wanted_constants}"
        )
    return lib


def prepare(config: RuleConfig) -> None:
    """Build (or load) the library for ``config`` now, so that a missing compiler shows when the
    optimizer is created rather than in its first step."""
    library(config.kernel_shape)


def kernels(weights: UpdateWeights) -> Kernels:
    """The C++ kernels for ``weights``' configuration (compiled on first use)."""
    return _kernels(weights.config.kernel_shape)


@functools.cache
def _kernels(shape: KernelShape) -> Kernels:
    lib = library(shape)
    return Kernels(
        square_sums=functools.partial(square_sums, lib, constants=shape.constants),
        factored_statistics=functools.partial(factored_statistics, lib),
        accumulate_=functools.partial(accumulate_, lib),
        mlp_step_=functools.partial(mlp_step_, lib),
    )


# ---- arguments ------------------------------------------------------------------------------------


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when the kernels can use it in place (float32, unit stride along rows), else a
    float32 copy."""
    return t if t.dtype == torch.float32 and t.stride(-1) == 1 else t.float().contiguous()


def _in_place(kernel: Callable[..., None], outputs: Sequence[torch.Tensor], *args: object) -> None:
    """Run ``kernel`` on float32 stand-ins of ``outputs`` (followed by ``args``) and copy back any
    that were copies."""
    working = [_float32(t) for t in outputs]
    kernel(*working, *args)
    for target, result in zip(outputs, working):
        if result is not target:
            target.copy_(result)


def _grid_args(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, rms: torch.Tensor) -> GridArgs:
    batch, rows, cols = p.shape
    return GridArgs(
        batch, rows, cols, _ptr(p), _ptr(g), _ptr(m), _ptr(rms),
        p.stride(0), p.stride(1), g.stride(0), g.stride(1), m.stride(0), m.stride(1), m.stride(2),
        rms.stride(0), rms.stride(1),
    )


def _row_and_column(
    parts: Factors, combine: Callable[[Sequence[torch.Tensor]], torch.Tensor], identity: float,
    batch: int, width: int, rows: int, cols: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split factors (or terms) broadcastable to ``(B, width, rows, cols)`` into a contiguous row part
    ``(B, width, rows)`` and column part ``(B, width, cols)``, each ``combine``-d; a missing part is
    ``identity``."""
    row_parts = [t for t in parts if t.shape[-1] == 1]
    col_parts = [t for t in parts if t.shape[-1] != 1]
    if any(t.shape[-2] != 1 for t in col_parts):
        raise ValueError(f"the cpp kernels take row and column factors, got shapes {[tuple(t.shape) for t in parts]}")

    def part(terms: list[torch.Tensor], shape: tuple[int, ...], size: int) -> torch.Tensor:
        if not terms:
            return torch.full((batch, width, size), identity, dtype=torch.float32)
        return combine(terms).float().expand(batch, width, *shape).reshape(batch, width, size).contiguous()

    return part(row_parts, (rows, 1), rows), part(col_parts, (1, cols), cols)


def _factor_args(
    pre: Preconditioners, m: torch.Tensor, hidden_in: Factors | None = None, width: int = 0
) -> tuple[FactorArgs, list[torch.Tensor | None]]:
    """The preconditioners' (and the first layer's ``width``-wide extra input's) row and column
    parts, and the tensors their addresses point into (keep them alive). A preconditioner shared by
    the gradient and the momentum is passed once, twice."""
    batch, decays, rows, cols = m.shape
    split = lambda q: _row_and_column(q, product, 1.0, batch, decays, rows, cols)  # noqa: E731
    q_g = split(pre.q_g)
    q_m = split(pre.q_m) if pre.q_m is not pre.q_g else q_g
    hidden = (None, None) if hidden_in is None else _row_and_column(hidden_in, total, 0.0, batch, width, rows, cols)
    parts = [*q_g, *q_m, *hidden]
    return FactorArgs(*(None if t is None else _ptr(t) for t in parts)), parts


# ---- the kernels ----------------------------------------------------------------------------------


def square_sums(
    lib: ctypes.CDLL, g: torch.Tensor, d0: int, d1: int, constants: RuleConstants = CELO_CONSTANTS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 0 (contract of :func:`celo_hf.backends.eager.square_sums`); matrices in C++, higher
    ranks through the eager kernel."""
    if g.dim() != 3:
        return eager.square_sums(g, d0, d1, constants=constants)
    g = _float32(g)
    batch, rows, cols = g.shape
    row_sums = torch.empty(batch, rows, dtype=torch.float32)
    col_sums = torch.empty(batch, cols, dtype=torch.float32)
    lib.celo_square_sums(batch, rows, cols, _ptr(g), g.stride(0), g.stride(1), _ptr(row_sums), _ptr(col_sums))
    by_axis = {0: col_sums, 1: row_sums}  # summed over matrix axis 0 (down columns) or axis 1 (along rows)
    return by_axis[d0], by_axis[d1]


def accumulate_(lib: ctypes.CDLL, grid: Grid, pre: Preconditioners, decays: Decays) -> torch.Tensor:
    """Pass 1 (contract of :func:`celo_hf.backends.eager.accumulate_`)."""
    batch, decays_count = grid.m.shape[:2]
    sums = torch.zeros(batch, kernel_channel_offsets(decays_count)["channels"], dtype=torch.float64)
    factors, keep_alive = _factor_args(pre, grid.m)  # noqa: F841 (the pointers point into them)
    p, g = _float32(grid.p), _float32(grid.g)
    momentum = decays.momentum.float().contiguous()

    def run(m32: torch.Tensor, rms32: torch.Tensor) -> None:
        lib.celo_accumulate(
            ctypes.byref(_grid_args(p, g, m32, rms32)), ctypes.byref(factors), _ptr(momentum),
            decays.rms, 1 - decays.rms, _ptr(sums), torch.get_num_threads(),
        )

    _in_place(run, (grid.m, grid.rms))
    return sums.float()


def mlp_step_(lib: ctypes.CDLL, grid: Grid, pre: Preconditioners, hidden_in: Factors, mlp: FoldedMlp) -> None:
    """Pass 2 (contract of :func:`celo_hf.backends.eager.mlp_step_`)."""
    factors, keep_alive = _factor_args(pre, grid.m, hidden_in, mlp.first.shape[2])  # noqa: F841 (the pointers point into them)
    g, m, rms = _float32(grid.g), _float32(grid.m), _float32(grid.rms)
    if mlp.hidden_layers:
        hidden_w = torch.stack([w for w, _ in mlp.hidden_layers], 1).float().contiguous()
        hidden_b = torch.stack([b for _, b in mlp.hidden_layers], 1).float().contiguous()
    else:
        hidden_w = hidden_b = torch.zeros(1)
    dense = [t.float().contiguous() for t in (mlp.first, hidden_w, hidden_b, *mlp.last, mlp.step_scale)]
    out = mlp.direction_out

    def run(p32: torch.Tensor, out32: torch.Tensor | None = None) -> None:
        target = (0, 0, 0) if out32 is None else (_ptr(out32), out32.stride(0), out32.stride(1))
        weights = MlpArgs(*(_ptr(t) for t in dense), mlp.exp_mult, *target)
        lib.celo_mlp_step(
            ctypes.byref(_grid_args(p32, g, m, rms)), ctypes.byref(factors), ctypes.byref(weights),
            torch.get_num_threads(),
        )

    if out is None:
        _in_place(run, (grid.p,))
    else:  # p is only read
        _in_place(lambda out32: run(_float32(grid.p), out32), (out,))


# ---- factored moments ------------------------------------------------------------------------------


def _whole_float32(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and t.is_contiguous()


def factored_statistics(
    lib: ctypes.CDLL, g: torch.Tensor, state: TensorState, w: UpdateWeights, d0: int
) -> FactoredStatistics | None:
    """A float32 matrix batch's factored moments in one C++ call (contract of
    :class:`celo_hf.layout.Kernels`); ``None`` for other batches (rank > 2, other dtypes, layouts)."""
    first_layout = w.first.stride()[1:] == (w.first.shape[2], 1) and w.first_bias.stride(-1) == 1
    if not (
        g.dim() == 3 and g.dtype == torch.float32 and g.stride(-1) == 1 and first_layout
        and _whole_float32(state["v_row"]) and _whole_float32(state["v_col"])
        and w.factored_decays.dtype == torch.float32 and w.factored_decays.is_contiguous()
    ):
        return None
    batch, rows, cols = g.shape
    decays, width = w.factored_decays.numel(), w.first.shape[2]
    q_rows, q_cols = torch.empty(batch, decays, rows), torch.empty(batch, decays, cols)
    h_rows, h_cols = torch.empty(batch, width, rows), torch.empty(batch, width, cols)
    along = (cols, rows) if d0 == 0 else (rows, cols)  # v_row's and v_col's lengths
    for key, length in zip(("v_row", "v_col"), along):
        if state[key].shape != (batch, decays, length):
            raise ValueError(f"{key} of shape {tuple(state[key].shape)} does not fit gradients {tuple(g.shape)} "
                             f"factored with d0={d0}: expected {(batch, decays, length)}")
    slices = group_slices(w.config.num_decays)
    args = FactoredArgs(
        batch, rows, cols, d0, _ptr(g), g.stride(0), g.stride(1), _ptr(state["v_row"]), _ptr(state["v_col"]),
        _ptr(w.factored_decays), _ptr(w.first), w.first.stride(0), (_I64 * 4)(*(slices[n].start for n in ROW_COL_GROUPS)),
        _ptr(w.first_bias), w.first_bias.stride(0), _ptr(q_rows), _ptr(q_cols), _ptr(h_rows), _ptr(h_cols),
    )
    lib.celo_factored_moments(ctypes.byref(args))
    on_rows, on_cols = (q_rows.unsqueeze(3), h_rows.unsqueeze(3)), (q_cols.unsqueeze(2), h_cols.unsqueeze(2))
    # v_row averages over axis d0, so it lies along the other axis (and v_col the other way round).
    (row_scale, row_hidden), (col_scale, col_hidden) = (on_cols, on_rows) if d0 == 0 else (on_rows, on_cols)
    return FactoredStatistics(row_scale, col_scale, row_hidden, col_hidden, matrix=True)
