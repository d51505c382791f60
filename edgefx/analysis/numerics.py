"""Numeric distance between two sets of outputs (max abs, relative to scale, SNR)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from edgefx.errors import EdgefxError


@dataclass(frozen=True)
class NumericError:
    """How far one set of outputs is from a reference, over all output tensors."""

    max_abs: float
    relative: float  # max_abs / max |reference|: the error relative to the output scale
    snr_db: float  # 10 log10(signal power / error power); inf when identical

    @classmethod
    def between(
        cls,
        reference: Sequence[torch.Tensor],
        actual: Sequence[torch.Tensor],
        *,
        error: type[EdgefxError] = EdgefxError,
    ) -> NumericError:
        """Compare ``actual`` with ``reference``; a different count or shape raises ``error``."""
        if len(reference) != len(actual):
            raise error(f"output count changed: {len(reference)} -> {len(actual)}")
        max_abs = scale = signal = noise = 0.0
        for ref, out in zip(reference, actual, strict=True):
            if ref.shape != out.shape:
                raise error(f"output shape changed: {tuple(ref.shape)} -> {tuple(out.shape)}")
            ref64, out64 = ref.detach().double(), out.detach().double()
            diff = (ref64 - out64).abs()
            if diff.numel():
                max_abs = max(max_abs, float(diff.max()))
                scale = max(scale, float(ref64.abs().max()))
            signal += float((ref64**2).sum())
            noise += float((diff**2).sum())
        relative = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        snr = (
            math.inf if noise == 0 else 10 * math.log10(signal / noise) if signal > 0 else -math.inf
        )
        return cls(max_abs, relative, snr)

    def to_dict(self) -> dict[str, float | str]:
        def finite(x: float) -> float | str:
            return x if math.isfinite(x) else str(x)

        return {
            "max_abs": self.max_abs,
            "relative": finite(self.relative),
            "snr_db": finite(self.snr_db),
        }
