"""Model zoo: the ONNX artifact agrees with eager PyTorch (rel err <= 1e-4 at batch 1 and 4).

The check itself lives in benchmarks/zoo.py (``check_model``), shared with the sweep that
writes benchmarks/results/zoo.md. CI runs the small subset ``CI_SUBSET`` in-process; the full
sweep (every torchvision classifier and the timm list) is marked ``zoo`` and runs each model
in a fresh subprocess with a timeout:

    pytest tests/test_zoo.py                 # CI subset
    pytest tests/test_zoo.py -m zoo          # every model (hours on 2 cores)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torchvision")
pytest.importorskip("timm")

_ZOO_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo.py"


def _load_zoo():
    spec = importlib.util.spec_from_file_location("edgefx_benchmarks_zoo", _ZOO_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()


def _assert_ok(result: dict[str, Any]) -> None:
    assert result["status"] == "ok", (
        f"{result['model']} failed at {result['stage']}: {result['reason']}\n"
        f"{result.get('error') or ''}"
    )
    assert result["rel_err_b1"] <= zoo.TOLERANCE
    assert result["rel_err_b4"] <= zoo.TOLERANCE


@pytest.mark.parametrize("name", zoo.CI_SUBSET)
def test_zoo_subset(name: str) -> None:
    _assert_ok(zoo.check_model(name))


@pytest.mark.zoo
@pytest.mark.parametrize("name", zoo.all_models())
def test_zoo_full(name: str) -> None:
    _assert_ok(zoo.run_isolated(name, timeout=zoo.DEFAULT_TIMEOUT_S))


def test_select_models() -> None:
    assert len(zoo.TIMM_MODELS) >= 30
    assert len(set(zoo.TIMM_MODELS)) == len(zoo.TIMM_MODELS)
    assert set(zoo.CI_SUBSET) <= set(zoo.all_models())
    assert zoo.select_models("ci,resnet18") == list(zoo.CI_SUBSET)
    assert zoo.select_models("tv") == zoo.torchvision_models()


def test_relative_error() -> None:
    import torch

    ref = [torch.tensor([1.0, -4.0]), torch.tensor([2.0])]
    assert zoo.relative_error(ref, [torch.tensor([1.0, -4.0]), torch.tensor([2.0])]) == 0.0
    assert zoo.relative_error(ref, [torch.tensor([1.0, -3.0]), torch.tensor([2.0])]) == 0.25
    with pytest.raises(ValueError, match="shape"):
        zoo.relative_error(ref, [torch.zeros(3), torch.zeros(1)])


def test_failure_is_a_result() -> None:
    result = zoo.check_model("no_such_model_anywhere")
    assert result["status"] == "fail"
    assert result["stage"] == "resolve"
    assert "unknown model" in result["reason"]


def test_make_nondegenerate_fills_zeros_and_sets_batchnorm_statistics() -> None:
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4),
                                torch.nn.Flatten(), torch.nn.Linear(16, 2)).eval()
    torch.nn.init.zeros_(model[3].weight)  # a zero-initialised head: output ignores the input
    x = (torch.randn(1, 3, 2, 2),)
    with torch.no_grad():
        assert zoo.input_sensitivity([model(torch.randn(4, 3, 2, 2))]) == 0.0
    done = zoo.make_nondegenerate(model, x, batch=4)
    assert done == {"params_filled": 2, "batchnorms_calibrated": 1}  # head weight, BN bias
    assert not model.training and not model[1].training
    assert model[1].momentum == 0.1 and not torch.equal(model[1].running_var, torch.ones(4))
    with torch.no_grad():
        assert zoo.input_sensitivity([model(torch.randn(4, 3, 2, 2))]) > 0.01


def test_relative_error_refuses_non_finite_values() -> None:
    import torch

    ref = [torch.tensor([1.0, -4.0])]
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="compared output is not finite"):
            zoo.relative_error(ref, [torch.tensor([1.0, bad])])
        with pytest.raises(ValueError, match="reference is not finite"):
            zoo.relative_error([torch.tensor([1.0, bad])], ref)
    # the same non-finite value on both sides is no error, and the rest is still measured
    both = [torch.tensor([1.0, float("nan"), float("-inf")])]
    assert zoo.relative_error(both, [torch.tensor([1.5, float("nan"), float("-inf")])]) == 0.5
    with pytest.raises(ValueError, match="not finite"):
        zoo.relative_error(both, [torch.tensor([1.0, float("nan"), float("inf")])])


def test_committed_table_comes_from_one_clean_commit(tmp_path: Path) -> None:
    results = zoo.DEFAULT_OUT
    with pytest.raises(zoo.ZooError, match="uncommitted"):
        zoo.check_one_commit(results, "abc123-dirty", None)
    with pytest.raises(zoo.ZooError, match="not in a git checkout"):
        zoo.check_one_commit(results, None, None)
    with pytest.raises(zoo.ZooError, match="measured at commit abc123"):
        zoo.check_one_commit(results, "def456", {"commit": "abc123"})
    zoo.check_one_commit(results, "abc123", {"commit": "abc123"})  # resuming the same commit
    zoo.check_one_commit(results, "abc123", None)
    zoo.check_one_commit(tmp_path, "abc123-dirty", {"commit": "other"})  # ad-hoc: anything


def test_sweep_records_its_commit_and_refuses_a_dirty_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = {"model": "m", "source": "torchvision", "status": "ok", "stage": None, "reason": None,
            "rel_err_b1": 0.0, "rel_err_b4": 0.0, "total_s": 0.0, "check": zoo.CHECK_VERSION}
    monkeypatch.setattr(zoo, "run_isolated", lambda name, timeout: {**fake, "model": name,
                                                                     "edgefx_git": "abc123"})
    monkeypatch.setattr(zoo, "edgefx_revision", lambda: "abc123")
    data = zoo.sweep(["m"], tmp_path, timeout=1, jobs=1, command="cmd", resume=False)
    assert data["commit"] == "abc123"
    assert "every row measured at commit **abc123**" in (tmp_path / "zoo.md").read_text()
    monkeypatch.setattr(zoo, "edgefx_revision", lambda: "abc123-dirty")
    monkeypatch.setattr(zoo, "DEFAULT_OUT", tmp_path)
    with pytest.raises(zoo.ZooError, match="uncommitted"):
        zoo.sweep(["m"], tmp_path, timeout=1, jobs=1, command="cmd", resume=True)
    assert zoo.main(["--models", "m", "--out", str(tmp_path), "--resume"]) == 2


def test_a_killed_model_is_recorded_with_the_commit_that_ran_it() -> None:
    """A subprocess killed on timeout (or by the kernel for memory) still carries the sweep's
    commit and check version, so the table does not call it another revision."""
    result = zoo.run_isolated("resnet18", timeout=0.5)
    assert result["status"] == "fail" and result["reason"].startswith("timeout")
    assert result["edgefx_git"] == zoo.edgefx_revision()
    assert result["check"] == zoo.CHECK_VERSION
