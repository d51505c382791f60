"""edgefx's own torch ops (torch.library). Each file holds one op family: its reference
kernel, its fake (shape) kernel and its lowerings; importing this package registers them."""

from __future__ import annotations

from collections.abc import Callable

from edgefx.ops import pot
from edgefx.ops.pot import dequantize_pot, quantize_pot

__all__ = ["dequantize_pot", "onnx_translations", "quantize_pot", "tvm_converters"]


def onnx_translations() -> dict[Callable, Callable]:
    """torch op -> onnxscript function, for ``torch.onnx.export(custom_translation_table=)``."""
    return dict(pot.ONNX_TRANSLATIONS)


def tvm_converters() -> dict[str, Callable]:
    """op overload ``__name__`` -> Relax converter ``fn(node, importer)``, for TVM's
    ``from_exported_program(custom_convert_map=)``."""
    return dict(pot.TVM_CONVERTERS)
