"""Numeric distance between two sets of outputs (max abs, relative to scale, SNR).

Non-finite values are never averaged away: where one side is NaN or infinite and the other is
not the same value, :meth:`NumericError.between` raises instead of returning a distance (a NaN
would otherwise compare as no error at all, since ``max(0.0, nan)`` is ``0.0``). Elements that
are non-finite on both sides in the same way (NaN and NaN, or an infinity of the same sign) are
left out of the distance and counted in ``nonfinite``.
"""

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
    nonfinite: int = 0  # elements non-finite on both sides alike (left out of the figures)

    @classmethod
    def between(
        cls,
        reference: Sequence[torch.Tensor],
        actual: Sequence[torch.Tensor],
        *,
        error: type[EdgefxError] = EdgefxError,
        reference_name: str = "the reference",
        actual_name: str = "the result",
    ) -> NumericError:
        """Compare ``actual`` with ``reference``.

        A different count or shape, or a non-finite value on one side that the other side does
        not share, raises ``error``; its message names the side (``reference_name`` /
        ``actual_name``), the output and how many elements are NaN or infinite.
        """
        if len(reference) != len(actual):
            raise error(f"output count changed: {len(reference)} -> {len(actual)}")
        max_abs = scale = signal = noise = 0.0
        nonfinite = 0
        for index, (ref, out) in enumerate(zip(reference, actual, strict=True)):
            if ref.shape != out.shape:
                raise error(f"output shape changed: {tuple(ref.shape)} -> {tuple(out.shape)}")
            ref64, out64 = ref.detach().double(), out.detach().double()
            ref_ok, out_ok = torch.isfinite(ref64), torch.isfinite(out64)
            both_bad = ~ref_ok & ~out_ok
            alike = both_bad & ((ref64 == out64) | (ref64.isnan() & out64.isnan()))
            _raise_if_nonfinite(out64, alike, index, actual_name, reference_name, error)
            _raise_if_nonfinite(ref64, alike, index, reference_name, actual_name, error)
            nonfinite += int(alike.sum())
            finite = ref_ok & out_ok
            ref64, out64 = ref64[finite], out64[finite]
            diff = (ref64 - out64).abs()
            if diff.numel():
                max_abs = max(max_abs, float(diff.max()))
                scale = max(scale, float(ref64.abs().max()))
            signal += float((ref64**2).sum())
            noise += float((diff**2).sum())
        total = sum(r.numel() for r in reference)
        if total and nonfinite == total:
            raise error(
                f"every output element of {reference_name} and {actual_name} is NaN or infinite: "
                "there is nothing finite to compare",
                hint="check the model and its example inputs (random weights can overflow)",
            )
        relative = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
        if noise == 0:
            snr = math.inf
        elif signal == 0:
            snr = -math.inf
        else:
            snr = 10 * math.log10(signal / noise)
        return cls(max_abs, relative, snr, nonfinite)

    def to_dict(self) -> dict[str, float | str | int]:
        def finite(x: float) -> float | str:
            return x if math.isfinite(x) else str(x)

        return {
            "max_abs": self.max_abs,
            "relative": finite(self.relative),
            "snr_db": finite(self.snr_db),
            "nonfinite": self.nonfinite,
        }


def _raise_if_nonfinite(
    values: torch.Tensor,
    accepted: torch.Tensor,
    index: int,
    name: str,
    other: str,
    error: type[EdgefxError],
) -> None:
    """Raise ``error`` if ``values`` is non-finite anywhere but where ``accepted`` (the other
    side holds the same non-finite value there)."""
    bad = ~torch.isfinite(values) & ~accepted
    if not bool(bad.any()):
        return
    nans = int((values.isnan() & bad).sum())
    infs = int(bad.sum()) - nans
    raise error(
        f"{name} is not finite where {other} is: output {index} has {nans} NaN and {infs} "
        f"infinite value(s) (of {values.numel()}) that {other} does not share",
        hint="a NaN or Inf is never a match; find the op that overflows or divides by zero "
        "(run the passes with dump_dir to see each graph)",
    )
