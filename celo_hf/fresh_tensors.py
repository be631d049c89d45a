"""Fresh tensors: the parameters a pretrained model's loader had to initialise (a new classifier head).

Celo's model-start gain (:mod:`celo_hf.step_gain`, ``gain_signal="model_start"``) shrinks every
step of a run whose first gradients are tiny next to the weights, the mark of a pretrained model.
A head that ``from_pretrained`` initialised for the new task is not pretrained, yet it took the same
shrunken steps: MiniLM-L6's fresh head grew by under 7% of its norm in 100 steps and the fine-tune
learned late or not at all. A param group marked ``{"fresh": True}`` (:data:`FRESH`) takes no
gradient-scale gain (its tensors step as Celo v1 steps) and is left out of the gain's first-step
statistic. Celo's weights without a gain (the paper's) step the same either way.

:func:`celo_hf.create` marks the tensors :func:`newly_initialised` finds, or the names it is given.
"""

from __future__ import annotations

import torch

#: The param-group key: ``True`` for tensors newly initialised on a pretrained model.
FRESH = "fresh"


def newly_initialised(model: torch.nn.Module) -> set[str]:
    """Names (as ``model.named_parameters()`` gives them) of the trainable parameters that
    ``transformers``' ``from_pretrained`` initialised because the checkpoint lacked them, such as a
    new task's head.

    ``from_pretrained`` (transformers 5.x) marks each parameter it loads with the attribute
    ``_is_hf_initialized``; one it had to initialise carries no mark. A model none of whose
    parameters carries the mark (built from a config, not by ``transformers``, or whose parameters
    were replaced by new objects after loading) has no fresh parameters: the empty set. Adapters added
    afterwards (peft's LoRA) and peft's copies of a fresh head (``modules_to_save``) are fresh too.
    """
    named = list(model.named_parameters())
    loaded = {name for name, p in named if getattr(p, "_is_hf_initialized", False)}
    return {name for name, p in named if name not in loaded and p.requires_grad} if loaded else set()
