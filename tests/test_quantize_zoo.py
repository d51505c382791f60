"""benchmarks/quantize_zoo.py: PotQuantize over the model zoo, one row per model.

The zoo's models take minutes each, so these tests run the per-model measurement on small
stand-ins (resolve_model patched), and the sweep, resume and table on recorded results.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import SmallNet, randomize_batchnorm
from torch import nn

from edgefx.errors import PassError
from edgefx.frontend import zoo as frontend_zoo

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    if str(_BENCHMARKS) not in sys.path:
        sys.path.append(str(_BENCHMARKS))  # quantize_zoo imports its neighbour zoo.py
    spec = importlib.util.spec_from_file_location(
        "edgefx_benchmarks_quantize_zoo", _BENCHMARKS / "quantize_zoo.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


qz = _load()


def _stand_in(monkeypatch: pytest.MonkeyPatch, model: nn.Module) -> None:
    """resolve_model gives ``model`` with an 8x8 example input, whatever the name."""
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    resolved = frontend_zoo.ResolvedModel("stand_in", model.eval(), (x,))
    monkeypatch.setattr(frontend_zoo, "resolve_model", lambda name, shape=None: resolved)


def _measure(name: str = "stand_in") -> dict[str, Any]:
    return qz.quantize_model(name, search="mse", size=None, calib_images=4, held_out=4)


def test_a_model_quantizes_and_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in(monkeypatch, randomize_batchnorm(SmallNet()))
    r = _measure()
    assert r["status"] == "quantized", r
    assert (r["layers"], r["matmuls"], r["batchnorm_folded"]) == (3, 0, 2)
    assert 0 < r["pass_s"] <= r["compile_s"] <= r["total_s"]
    check = r["quantized_check"]  # compile()'s own figures, as it reports them
    assert set(qz._STEP_COLUMNS) <= set(check)
    assert check["beyond_one_step"] <= 0.01
    assert 0 < r["snr_db"] < math.inf and r["onnx_snr_db"] is not None
    assert r["held_out_check"]["beyond_one_step"] <= 0.01
    row = qz._row(r)
    assert row.startswith("| stand_in | quantized |") and f"{r['snr_db']:.1f}" in row


def test_a_refused_check_is_a_failed_row_with_its_figures(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ONNX artifact compile() refuses (here: every output moved by a quarter of the output
    scale) is recorded as failed at stage check, with compile()'s reason and the figures of a
    second compile without the check."""
    from edgefx.backends import onnx as onnx_backend

    run = onnx_backend.OnnxArtifact.run

    def wrong(self, inputs):
        return [y + 0.25 * y.abs().max() for y in run(self, inputs)]

    monkeypatch.setattr(onnx_backend.OnnxArtifact, "run", wrong)
    _stand_in(monkeypatch, randomize_batchnorm(SmallNet()))
    r = _measure()
    assert (r["status"], r["stage"]) == ("failed", "check")
    assert "disagrees with" in r["reason"]
    assert r["quantized_check"]["beyond_one_step"] > 0.5
    assert r["onnx_snr_db"] < r["snr_db"]
    assert "**failed** (check)" in qz._row(r)


def test_nothing_to_quantize_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _stand_in(monkeypatch, nn.Sequential(nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()))
    r = _measure()
    assert r["status"] == "refused" and r["reason"].startswith("nothing quantized")
    assert r["layers"] == 0 and r["matmuls"] == 0


def test_an_unknown_model_fails_at_resolve() -> None:
    r = _measure("no_such_model_anywhere")
    assert (r["status"], r["stage"]) == ("failed", "resolve")
    assert "unknown model" in r["reason"]


def test_a_pass_refusal_is_told_from_a_broken_pass() -> None:
    assert qz._refusal(PassError("objective='bn_stats' needs BatchNorms after convs"))
    assert not qz._refusal(PassError("PotQuantize failed", hint="this is a bug in the pass; x"))
    assert not qz._refusal(ValueError("not an edgefx error"))


def test_a_killed_model_is_a_failed_row(tmp_path: Path) -> None:
    args = qz.argparse.Namespace(search="mse", calib_images=4, held_out=4, size=None, timeout=0.5)
    r = qz.run_in_subprocess("resnet18", args)
    assert r["status"] == "failed" and r["reason"] == "timeout after 0.5 s"


def _fake(name: str, **fields: Any) -> dict[str, Any]:
    return {"model": name, "source": "torchvision", "status": "quantized", "stage": None,
            "reason": None, "layers": 3, "matmuls": 0, "pass_s": 1.0, "compile_s": 2.0,
            "quantized_check": {"step": 0.5, "equal": 1.0, "within_one_step": 1.0,
                                "beyond_one_step": 0.0, "max_steps": 0.0, "snr_db": "inf"},
            "more_checks": {}, "snr_db": 30.0, "total_s": 3.0, **fields}  # fmt: skip


def test_the_table_shows_check_figures_a_newer_compile_adds() -> None:
    newer = _fake(
        "m",
        quantized_check={**_fake("m")["quantized_check"], "forced_flips": 3,
                         "forced": {"worst_share": 0.25}},
        more_checks={"teacher_forced": {"quantizers_flipped": 2, "per_quantizer": [{}, {}]},
                     "forced_steps": [1, 2]},
    )  # fmt: skip
    row = qz._row(newer)
    assert "forced_flips=3" in row and "teacher_forced.quantizers_flipped=2" in row
    assert "forced_steps: 2 entries" in row and "forced.worst_share=0.25" in row
    assert qz._row(_fake("m")).count("=") == 0  # today's figures all have columns


def test_sweep_resumes_only_with_the_same_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []

    def fake_run(name: str, args: Any) -> dict[str, Any]:
        ran.append(f"{name}:{args.search}")
        return _fake(name, search=args.search)

    monkeypatch.setattr(qz, "run_in_subprocess", fake_run)
    out = ["--out", str(tmp_path)]
    assert qz.main(["--models", "a,b", "--jobs", "2", *out]) == 0
    assert qz.main(["--models", "a,b,c", "--search", "joint", "--resume", *out]) == 2
    assert qz.main(["--models", "a,b,c", "--resume", *out]) == 0
    assert sorted(ran[:2]) == ["a:mse", "b:mse"] and ran[2:] == ["c:mse"]
    table = (tmp_path / "quantize_zoo.md").read_text()
    assert "search='mse'" in table and "3 quantized, 0 refused, 0 failed of 3 run" in table
    assert "python benchmarks/quantize_zoo.py --models a,b,c --resume" in table
