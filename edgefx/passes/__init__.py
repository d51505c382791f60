"""Graph passes. Each pass lives in its own file; ``PASSES`` maps CLI names to classes."""

from edgefx.passes.base import Figures, NumericError, Pass, PassManager, PassResult, check_passes
from edgefx.passes.dead_code import DeadCodeElimination
from edgefx.passes.fold_batchnorm import FoldBatchNorm

PASSES: dict[str, type[Pass]] = {
    "fold-bn": FoldBatchNorm,
    "dce": DeadCodeElimination,
}

__all__ = [
    "PASSES",
    "DeadCodeElimination",
    "Figures",
    "FoldBatchNorm",
    "NumericError",
    "Pass",
    "PassManager",
    "PassResult",
    "check_passes",
]
