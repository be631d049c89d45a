"""celo_hf: the learned optimizers Celo and Celo2 for PyTorch and HuggingFace Transformers."""

from typing import Any

from .celo2.hub import load_celo2_net
from .celo2.network import Celo2Net
from .celo2.optimizer import Celo2
from .hub import load_celo_net
from .network import CeloNet
from .optimizer import Celo, create
from .weight_files import CeloWeightsError

#: Names from ``celo_hf.trainer``, imported on first use (it imports transformers, which is slow).
_TRAINER_NAMES = ("Celo2Factory", "CeloCallback", "CeloFactory", "CeloTrainer", "CeloTrainerMixin", "attach")

__all__ = ["Celo", "Celo2", "Celo2Net", "CeloNet", "CeloWeightsError", "create", "load_celo2_net", "load_celo_net", *_TRAINER_NAMES]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _TRAINER_NAMES:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'celo_hf' has no attribute {name!r}")
