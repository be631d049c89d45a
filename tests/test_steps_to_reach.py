"""recipes/compare.py's "steps to reach": the first step at which a run's mean over its last
FINAL_WINDOW losses is at most a target (another run's final loss), on synthetic curves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))
from compare import FINAL_WINDOW, steps_to_reach, window_means  # noqa: E402


def test_window_means_are_full_windows_only():
    assert window_means([1.0, 2.0, 3.0, 4.0, 5.0], 2) == [1.5, 2.5, 3.5, 4.5]
    assert window_means([1.0, 2.0, 3.0], 10) == [2.0]  # shorter than the window: one mean of all of it
    with pytest.raises(ValueError, match="got 0 losses and window 3"):
        window_means([], 3)
    with pytest.raises(ValueError, match="got 2 losses and window 0"):
        window_means([1.0, 2.0], 0)


def test_one_lucky_early_loss_does_not_count_as_reaching():
    """A flat noisy curve whose first mini-batch loss happens to be low: a per-step comparison says step 1."""
    losses = [0.2] + [0.7, 0.6] * 20
    steps = list(range(1, len(losses) + 1))
    assert steps_to_reach(steps, losses, 0.6) is None  # its 10-step means: 0.61, then 0.65 (0.655 ...)
    assert steps_to_reach(steps, losses, 0.61) == FINAL_WINDOW  # the first full window


def test_a_linear_descent_reaches_the_target_where_its_window_mean_does():
    """loss_i = 1 - 0.01 i (i = 0, 1, ...): the window ending at index j has mean 1 - 0.01 (j - 4.5)."""
    losses = [1.0 - 0.01 * i for i in range(100)]
    steps = list(range(1, 101))
    assert steps_to_reach(steps, losses, 1.0 - 0.01 * (40 - 4.5) + 1e-9) == 41  # index 40 is step 41
    assert steps_to_reach(steps, losses, 1.0 - 0.01 * (99 - 4.5) + 1e-9) == 100  # its own final loss: the last step
    assert steps_to_reach(steps, losses, 0.0) is None


def test_steps_are_taken_from_the_curve_and_short_curves_are_one_window():
    logged_every_5 = [5, 10, 15, 20, 25, 30, 35, 40, 45, 50, 55, 60]
    losses = [1.0] * 6 + [0.0] * 6
    assert steps_to_reach(logged_every_5, losses, 0.5, window=4) == 40  # window [1, 1, 0, 0] closes at step 40
    assert steps_to_reach([1, 2, 3], [0.9, 0.5, 0.4], 0.6) == 3  # fewer losses than FINAL_WINDOW: their mean 0.6
    assert steps_to_reach([1, 2, 3], [0.9, 0.5, 0.4], 0.59) is None
    with pytest.raises(ValueError, match="got 3 steps and 2 losses"):
        steps_to_reach([1, 2, 3], [0.9, 0.5], 0.6)
