"""The paper's comparison metrics against tuned Adam (``docs/meta-training.md`` §6.3-6.4).

Curves are numpy arrays of per-step training losses, index ``t`` holding the loss at step ``t + 1``.
A non-finite loss counts as ``+inf`` (a run that blew up is worse than any finite loss), so every
function here is defined for diverged runs too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

#: Width of the trailing moving average, as a fraction of the run length ("lightly smoothed").
SMOOTHING_FRACTION = 0.05
#: The fewest trailing steps averaged for a run's final training loss (:func:`final_window`).
FINAL_WINDOW_MIN = 10


def as_losses(curves: np.ndarray) -> np.ndarray:
    """Float64 copy with NaN and -inf/+inf mapped to ``+inf``."""
    curves = np.asarray(curves, dtype=np.float64)
    return np.where(np.isfinite(curves), curves, np.inf)


def smooth(curve: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average: entry ``t`` is the mean of ``curve[max(0, t - window + 1) : t + 1]``
    (``+inf`` as soon as the window holds a non-finite loss)."""
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    curve = as_losses(curve)
    finite = np.where(np.isfinite(curve), curve, 0.0)
    sums = np.cumsum(finite)
    bad = np.cumsum(~np.isfinite(curve))
    lagged_sums = np.concatenate([np.zeros(window), sums[:-window]])[: curve.size]
    lagged_bad = np.concatenate([np.zeros(window, dtype=bad.dtype), bad[:-window]])[: curve.size]
    counts = np.minimum(np.arange(1, curve.size + 1), window)
    return np.where(bad - lagged_bad > 0, np.inf, (sums - lagged_sums) / counts)


def smoothing_window(steps: int) -> int:
    """The moving-average width used for a run of ``steps`` steps."""
    return max(1, round(SMOOTHING_FRACTION * steps))


def summary_curve(runs: np.ndarray) -> np.ndarray:
    """Seed-averaged, lightly smoothed curve of ``runs`` ``(seeds, steps)``."""
    runs = as_losses(np.atleast_2d(runs))
    return smooth(runs.mean(0), smoothing_window(runs.shape[1]))


def final_window(steps: int) -> int:
    """How many trailing steps make a run's final training loss: 5% of the run, at least 10."""
    return max(FINAL_WINDOW_MIN, smoothing_window(steps))


def final_mean(run: np.ndarray, window: int) -> float:
    """Mean training loss over the last ``window`` steps of ``run`` ``(steps,)`` (``+inf`` if any
    of them is not finite)."""
    if window < 1:
        raise ValueError(f"final window must be >= 1 step, got {window}")
    return float(as_losses(run)[-window:].mean())


def best_learning_rate(final_losses: Mapping[float, float]) -> float:
    """The grid's selection rule, fixed before any run: the learning rate with the lowest final
    training loss (non-finite counts as ``+inf``); on a tie, the smaller learning rate."""
    if not final_losses:
        raise ValueError("no learning rates to choose from")
    return min(final_losses, key=lambda lr: (float(as_losses(np.array(final_losses[lr]))), lr))


def first_step_at_or_below(curve: np.ndarray, level: float) -> int | None:
    """The first step (1-based) at which ``curve <= level``, or ``None``."""
    hits = np.flatnonzero(as_losses(curve) <= level)
    return int(hits[0]) + 1 if hits.size else None


def final_loss_ratio(adam: np.ndarray, other: np.ndarray) -> float:
    """``FL = L_adam(T) / L_other(T)`` on summary curves: > 1 when ``other`` ends lower.
    ``0`` when ``other`` ended non-finite; ``inf`` when only Adam did; ``nan`` if both did."""
    a, o = as_losses(adam)[-1], as_losses(other)[-1]
    if math.isinf(o):
        return math.nan if math.isinf(a) else 0.0
    if o == 0.0:
        return math.inf if a > 0 else 1.0
    return float(a / o)


def speedup(adam: np.ndarray, other: np.ndarray) -> tuple[float, bool]:
    """``(SP, fell_back)`` on summary curves of equal length ``T``.

    ``SP = T / t_other`` where ``t_other`` is the first step at which ``other <= L_adam(T)``. If
    ``other`` never gets there, the fallback ``SP = t_adam(L_other(T)) / T`` (the step at which Adam
    first reaches ``other``'s final loss, over ``T``; at most 1) and ``fell_back = True``.
    """
    adam, other = as_losses(adam), as_losses(other)
    if adam.shape != other.shape:
        raise ValueError(f"curves must have the same length, got {adam.shape} and {other.shape}")
    steps = adam.size
    reached = first_step_at_or_below(other, adam[-1])
    if reached is not None:
        return steps / reached, False
    adam_reached = first_step_at_or_below(adam, other[-1])
    assert adam_reached is not None  # adam[-1] < other[-1] here, so Adam gets there by step T
    return adam_reached / steps, True


def diverged(run: np.ndarray) -> bool:
    """Whether one run diverged: a non-finite loss anywhere, or a final (smoothed) loss above the
    loss at the first step."""
    run = as_losses(run)
    if not np.isfinite(run).all():
        return True
    return bool(smooth(run, smoothing_window(run.size))[-1] > run[0])


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: drop ``floor(n / 4)`` values from each end of the sorted values and
    average the rest (``scipy.stats.trim_mean(values, 0.25)``)."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    if ordered.size == 0:
        raise ValueError("IQM of no values")
    cut = int(0.25 * ordered.size)
    return float(ordered[cut : ordered.size - cut].mean())


def bootstrap_iqm_ci(
    adam_runs: Sequence[np.ndarray],
    other_runs: Sequence[np.ndarray],
    replicates: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Stratified bootstrap over seeds (as rliable): per task, resample Adam's and the other
    optimizer's seeds with replacement, recompute both metrics, take the IQM over tasks.

    Args:
        adam_runs, other_runs: per task, the runs ``(seeds, steps)`` of each optimizer.

    Returns ``{"final_loss_ratio": (low, high), "speedup": (low, high)}`` at ``level`` coverage.
    """
    if len(adam_runs) != len(other_runs) or not adam_runs:
        raise ValueError(f"need the same non-zero number of tasks, got {len(adam_runs)} and {len(other_runs)}")
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {"final_loss_ratio": [], "speedup": []}
    for _ in range(replicates):
        ratios, speedups = [], []
        for adam, other in zip(adam_runs, other_runs):
            adam, other = np.atleast_2d(adam), np.atleast_2d(other)
            a = summary_curve(adam[rng.integers(adam.shape[0], size=adam.shape[0])])
            o = summary_curve(other[rng.integers(other.shape[0], size=other.shape[0])])
            ratios.append(final_loss_ratio(a, o))
            speedups.append(speedup(a, o)[0])
        samples["final_loss_ratio"].append(iqm(ratios))
        samples["speedup"].append(iqm(speedups))
    tail = 100 * (1 - level) / 2
    return {key: tuple(float(q) for q in np.nanpercentile(values, [tail, 100 - tail])) for key, values in samples.items()}
