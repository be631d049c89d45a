"""PES: the truncated estimator agrees with the true gradient of an unrolled smooth problem."""

import torch

from meta_training.pes import antithetic_population, pes_gradient, sample_perturbations


def _unrolled_problem(theta: torch.Tensor, steps: int) -> torch.Tensor:
    """Per-step losses ``(steps, P)`` of a damped system ``x <- x - theta * x`` started at ones."""
    x = torch.ones(theta.shape[0], theta.shape[1])
    target = torch.tensor([0.2, -0.1, 0.3])
    losses = []
    for _ in range(steps):
        losses.append(((x - target) ** 2).sum(1))
        x = x - theta * x
    return torch.stack(losses)


def test_truncated_pes_agrees_with_the_true_gradient_across_truncations():
    """Three truncations of one 30-step trajectory, 4000 antithetic slots: the summed PES estimate
    points along the autograd gradient of the trajectory's (per-truncation averaged) loss."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    theta = torch.tensor([0.05, 0.1, 0.02])
    slots, std, truncation, length = 4000, 0.01, 10, 30

    true_theta = theta.clone().requires_grad_(True)
    true_loss = _unrolled_problem(true_theta[None], length).sum() / truncation
    (true_grad,) = torch.autograd.grad(true_loss, true_theta)

    accumulator = torch.zeros(slots, 3)
    x = torch.ones(2 * slots, 3)
    target = torch.tensor([0.2, -0.1, 0.3])
    total = torch.zeros(3)
    for start in range(0, length, truncation):
        eps = sample_perturbations(slots, 3, std, generator)
        population = antithetic_population(theta, eps)
        losses = []
        for _ in range(truncation):
            losses.append(((x - target) ** 2).sum(1))
            x = x - population * x
        losses = torch.stack(losses)
        done = torch.zeros(truncation, slots, dtype=torch.bool)
        if start + truncation == length:
            done[-1] = True
        estimate = pes_gradient(
            losses[:, :slots], losses[:, slots:], torch.ones(truncation, slots), done, eps, accumulator, std
        )
        accumulator = estimate.accumulator
        total += estimate.grad

    cosine = torch.nn.functional.cosine_similarity(total, true_grad, dim=0)
    assert cosine > 0.95, (total, true_grad)
    assert torch.allclose(total.norm(), true_grad.norm(), rtol=0.2)
    # After the trajectory finished, each slot's accumulator restarts from the last perturbation.
    assert torch.equal(accumulator, eps)


def test_pes_splits_a_truncation_at_the_reset():
    """Steps before a slot's trajectory ended use the accumulator, steps after only the new noise;
    reset (masked) steps count for nothing."""
    eps = torch.tensor([[1.0, 0.0]])
    accumulator = torch.tensor([[0.0, 2.0]])
    loss_pos = torch.tensor([[3.0], [5.0], [0.0], [7.0]])
    loss_neg = torch.tensor([[1.0], [1.0], [0.0], [1.0]])
    mask = torch.tensor([[1.0], [1.0], [0.0], [1.0]])
    done = torch.tensor([[False], [True], [False], [False]])
    estimate = pes_gradient(loss_pos, loss_neg, mask, done, eps, accumulator, std=1.0)
    # before: step 0 only (delta 2); after: steps 1 and 3 (deltas 4 and 6); 3 masked steps.
    before, after = 2.0 / 3, 10.0 / 3
    expected = (before * (accumulator + eps) + after * eps) / 2
    assert torch.allclose(estimate.grad, expected[0])
    assert torch.equal(estimate.accumulator, eps)  # the trajectory finished: restart from eps
