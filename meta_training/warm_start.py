"""Starting points for meta-training (``docs/meta-training.md`` §7.4, "warm start"): an Adam-like
update MLP (:func:`adam_like`), a linearly decaying learned schedule (:func:`decaying_schedule`),
and trained weights with a wider update MLP that computes the same update (:func:`widened`).

    python -m meta_training.warm_start --widen 8 --weights celo_hf/default_weights --out <folder>

With a few thousand outer steps on a CPU, PES cannot move a random update rule far. Instead of
the spec's regression fit, the update MLP is *set* so that its direction output is exactly
``gain`` times the normalised ``momentum(0.9) / sqrt(rms)`` feature (Adam's direction, normalised
over the tensor) and its log-magnitude output is 0: with ReLU units, ``x = relu(x) - relu(-x)``.
All other first-layer weights are small random numbers, so PES sees every input from the start.
A deviation from the reference, which starts from a random MLP.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from celo_hf import CeloNet, load_celo_net
from celo_hf.diagnostics import calibrate_zero_gradient_, feature_columns
from celo_hf.features import PROGRESS_CENTRES, SCHEDULER_INPUT_SIZE, progress_features

#: Index of the ``momentum(0.9) * rsqrt(rms)`` channel among the 30 MLP inputs (group 5, first decay).
ADAM_DIRECTION_FEATURE = 7
#: Lowest value of the decaying schedule (reached at the end of training and kept after it).
DECAY_FLOOR = 0.01


def adam_like(net: CeloNet, gain: float, noise: float = 1e-3, seed: int = 0) -> CeloNet:
    """``net`` with its update MLP replaced by the Adam-mimicking rule (in place; returned).

    Requires the paper's MLP shape (two hidden layers of width >= 2).
    """
    layers = [m for m in net.mlp if isinstance(m, torch.nn.Linear)]
    if len(layers) != 3 or layers[0].out_features < 2:
        raise ValueError(f"adam_like needs an MLP with 2 hidden layers of width >= 2, got {net.mlp}")
    first, hidden, last = layers
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * noise)
            layer.bias.zero_()
        first.weight[0, ADAM_DIRECTION_FEATURE] = 1.0  # unit 0: relu(x)
        first.weight[1, ADAM_DIRECTION_FEATURE] = -1.0  # unit 1: relu(-x)
        hidden.weight[:2, :2] = torch.eye(2)
        last.weight[0, :2] = torch.tensor([gain, -gain])  # direction = gain * x
        last.weight[1:, :] = 0.0  # log-magnitude 0
    return net


#: Scheduler inputs that carry the loss features (the first ``len(PROGRESS_CENTRES)`` are progress).
_LOSS_COLUMNS = slice(len(PROGRESS_CENTRES), SCHEDULER_INPUT_SIZE)


def linear_decay(fraction: torch.Tensor, floor: float = DECAY_FLOOR) -> torch.Tensor:
    """The target schedule: ``max(1 - fraction, floor)`` (fraction = step / total_steps)."""
    return torch.clamp(1.0 - fraction, min=floor)


def decaying_schedule(net: CeloNet, iterations: int = 400, points: int = 111, seed: int = 0) -> CeloNet:
    """Set the learned scheduler so that ``lr_mult`` follows :func:`linear_decay` of training
    progress, whatever the loss (in place; returned). [ours]

    Constant-lr AdamW is the usual baseline and decaying the step is the cheapest way to beat it,
    but a few hundred PES iterations on the scheduler do not discover a decay from a flat start.
    So the scheduler starts as one: its loss-feature inputs are zeroed (PES may grow them back), the
    recurrence is switched off (``weight_hh = 0``, forget gate nearly shut, input / output gates
    nearly open) so ``h`` is a function of progress alone, and the remaining weights are fitted by
    Adam to ``log lr_mult = log linear_decay(progress)`` over progress ``0 .. 1.1``, run as one
    sequence through the real :meth:`CeloNet.schedule`.
    """
    hidden = net.lstm.hidden_size
    gates = {"input": (0, 4.0), "forget": (1, -4.0), "output": (3, 4.0)}  # PyTorch order i, f, g, o
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        net.input_proj.weight[:, _LOSS_COLUMNS] = 0.0
        net.pool_proj.weight[:, _LOSS_COLUMNS] = 0.0
        net.lstm.weight_hh.zero_()
        net.lstm.bias_hh.zero_()
        for index, bias in gates.values():
            net.lstm.bias_ih[index * hidden : (index + 1) * hidden] = bias
        net.lstm.weight_ih.copy_(torch.randn(net.lstm.weight_ih.shape, generator=generator) * hidden**-0.5)
        net.init_hidden.zero_()
        net.init_cell.zero_()
    fraction = torch.linspace(0.0, 1.1, points)
    inputs = torch.zeros(points, 1, SCHEDULER_INPUT_SIZE)
    inputs[:, 0, : len(PROGRESS_CENTRES)] = progress_features(fraction)
    target = torch.log(linear_decay(fraction))
    fitted = [net.input_proj.weight, net.input_proj.bias, net.pool_proj.weight, net.pool_proj.bias,
              net.lstm.weight_ih, net.lr_head.weight, net.lr_head.bias]
    frozen_columns = [net.input_proj.weight, net.pool_proj.weight]
    optimizer = torch.optim.Adam(fitted, lr=1e-2)
    for _ in range(iterations):
        state = net.initial_state()
        log_lr = []
        for row in inputs:
            lr_mult, state = net.schedule(row, state)
            log_lr.append(torch.log(lr_mult))
        loss = torch.mean((torch.cat(log_lr) - target) ** 2)
        optimizer.zero_grad()
        loss.backward()
        for weight in frozen_columns:
            weight.grad[:, _LOSS_COLUMNS] = 0.0
        optimizer.step()
    net.zero_grad(set_to_none=True)
    return net


def widened(net: CeloNet, width: int, noise: float = 0.1, seed: int = 0) -> CeloNet:
    """A copy of ``net`` whose update MLP's two hidden layers have ``width`` units, computing the
    same update (net2net-style): the old units keep their weights and read no new unit; each new
    unit reads every input of its layer through weights ``N(0, noise^2)`` (bias 0), and nothing reads
    it yet (its outgoing weights are 0), so PES can grow it. The scheduler is copied as it is; if
    ``net`` is zero-gradient calibrated (:func:`celo_hf.diagnostics.calibrate_zero_gradient_`), so
    is the copy."""
    old = net.mlp_layers()
    narrow = old[0][0].shape[0]
    if len(old) != 3 or width <= narrow:
        raise ValueError(f"widened needs an MLP with 2 hidden layers narrower than width {width}, got {narrow} units")
    wide = CeloNet(**{**net._hub_mixin_config, "mlp_hidden_size": width})
    state = {k: v.clone() for k, v in net.state_dict().items() if not k.startswith("mlp.")}
    generator = torch.Generator().manual_seed(seed)
    new = wide.mlp_layers()
    with torch.no_grad():
        for index, ((weight, bias), (old_weight, old_bias)) in enumerate(zip(new, old)):
            fresh_rows = index < len(old) - 1  # hidden layers get new units; the output layer does not
            weight.zero_()
            bias.zero_()
            if fresh_rows:
                weight[narrow:] = torch.randn(weight[narrow:].shape, generator=generator) * noise
            weight[: old_weight.shape[0], : old_weight.shape[1]] = old_weight
            bias[: old_bias.shape[0]] = old_bias
    wide.load_state_dict(state | {k: v for k, v in wide.state_dict().items() if k.startswith("mlp.")})
    if not net.mlp_layers()[0][0][:, feature_columns(net, "param")].any():
        calibrate_zero_gradient_(wide)
    return wide


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write trained weights with a wider update MLP (widened).")
    parser.add_argument("--widen", type=int, required=True, help="hidden units per layer of the wider MLP")
    parser.add_argument("--weights", default=None, help="the weights to widen (default: the embedded default)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    widened(load_celo_net(args.weights), args.widen).save_pretrained(args.out)


if __name__ == "__main__":
    main()
