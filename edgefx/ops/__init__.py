"""edgefx's own torch ops (torch.library). Each file holds one op family: its reference
kernel, its fake (shape) kernel and its lowerings; importing this package registers them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from edgefx.ops import integer, pot
from edgefx.ops.integer import (
    codes_to_float,
    conv_int,
    float_to_codes,
    linear_int,
    matmul_int,
    max_pool_int,
    requant_shift,
)
from edgefx.ops.pot import dequantize_pot, quantize_pot

__all__ = [
    "codes_to_float",
    "conv_int",
    "dequantize_pot",
    "float_to_codes",
    "linear_int",
    "matmul_int",
    "max_pool_int",
    "onnx_translations",
    "quantize_pot",
    "requant_shift",
    "tvm_converters",
]

_OP_FILES = (pot, integer)


def onnx_translations() -> dict[Callable, Callable]:
    """torch op -> onnxscript function, for ``torch.onnx.export(custom_translation_table=)``."""
    table: dict[Callable, Callable] = {}
    for module in _OP_FILES:
        table.update(getattr(module, "ONNX_TRANSLATIONS", {}))
    return table


def tvm_converters() -> dict[str, Callable[[Any, Any], Any]]:
    """TVM importer key (``op_overload.__name__``) -> converter ``fn(node, importer)``, for
    ``tvm.relax.frontend.torch.from_exported_program(custom_convert_map=)``."""
    table: dict[str, Callable[[Any, Any], Any]] = {}
    for module in _OP_FILES:
        table.update(getattr(module, "TVM_CONVERTERS", {}))
    return table
