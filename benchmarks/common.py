"""What the benchmark scripts share: latency medians, SNR, machine description, writing
``results/<name>.json`` and ``.md``."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from edgefx.analysis.latency import median_and_spread
from edgefx.analysis.numerics import NumericError

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# `python benchmarks/x.py` puts this folder first on sys.path, where its tvm.py would shadow
# the tvm package for every later `import tvm` (edgefx's TVM backend included): last instead
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]


def latency_ms(run: Callable[[], Any], repeat: int, warmup: int = 5) -> float:
    """Median wall time of ``run()`` in milliseconds over ``repeat`` calls, after warm-up."""
    return median_and_spread(run, repeat, warmup)[0] * 1e3


def snr_db(actual: torch.Tensor, reference: torch.Tensor) -> float | None:
    """Signal-to-noise ratio of ``actual`` against ``reference`` in dB; None when equal."""
    snr = NumericError.between([reference], [actual]).snr_db
    return None if snr == math.inf else snr


def load_average() -> float:
    """The machine's 1-minute load average, as benchmark headers record it at the start and
    the end of a run: timings mean little on a busy machine."""
    return round(os.getloadavg()[0], 2)


def load_text(load: dict[str, float] | None) -> str:
    """``{"start": .., "end": ..}`` as a header says it."""
    if not load:
        return "load not recorded"
    return f"load average {load['start']:.1f} at the start, {load['end']:.1f} at the end"


def header(script: str, argv: list[str] | None) -> dict[str, Any]:
    """The command, machine, date and versions every result file starts with."""
    return {
        "command": f"python benchmarks/{script} " + " ".join(argv or sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "versions": {"torch": torch.__version__},
    }


def write_results(out: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
