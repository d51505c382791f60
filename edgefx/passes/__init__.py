"""Graph passes. Each pass lives in its own file; ``PASSES`` maps CLI names to classes."""

from edgefx.passes.base import Figures, NumericError, Pass, PassManager, PassResult, check_passes
from edgefx.passes.channel_prune import ChannelPrune
from edgefx.passes.dead_code import DeadCodeElimination
from edgefx.passes.fine_tune import FineTune
from edgefx.passes.fold_batchnorm import FoldBatchNorm
from edgefx.passes.pot_quantize import PotQuantize
from edgefx.passes.qdq_to_shift import QDQToShift
from edgefx.passes.token_gate import TokenGate

PASSES: dict[str, type[Pass]] = {
    "prune": ChannelPrune,
    "fold-bn": FoldBatchNorm,
    "dce": DeadCodeElimination,
    "pot": PotQuantize,
    "finetune": FineTune,
    "shift": QDQToShift,
    "gate": TokenGate,
}

__all__ = [
    "PASSES",
    "ChannelPrune",
    "DeadCodeElimination",
    "Figures",
    "FineTune",
    "FoldBatchNorm",
    "NumericError",
    "Pass",
    "PassManager",
    "PassResult",
    "PotQuantize",
    "QDQToShift",
    "TokenGate",
    "check_passes",
]
