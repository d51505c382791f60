"""The TVM backend: x86 libraries agree with the Program (float models to 1e-4 of the output
scale, PotQuantize-d ones bit for bit with the ONNX backend), deploy folders, targets as data,
GPU builds that produce kernels, and clear refusals."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
import torch

import edgefx
from edgefx import ArtifactError, BackendError
from edgefx.backends.tvm import PRESETS, TvmArtifact
from edgefx.backends.tvm.backend import LIBRARY_FILE, RUN_SCRIPT
from edgefx.backends.tvm.profiling import Signature
from edgefx.frontend import capture
from edgefx.passes import FoldBatchNorm, PotQuantize
from edgefx.tools import cli

pytest.importorskip("tvm")

REL_TOL = 1e-4


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    actual, reference = actual.detach().double(), reference.detach().double()
    return float((actual - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def small_tvm(small_net, x1) -> edgefx.Compiled:
    """SmallNet (BN folded) for this x86 host, dynamic batch."""
    return edgefx.compile(small_net, (x1,), passes=[FoldBatchNorm()], backend="tvm")


@pytest.fixture(scope="module")
def small_rpi4(small_net, x1, tmp_path_factory):
    """(Compiled, saved folder) of SmallNet for the Raspberry Pi 4 preset."""
    compiled = edgefx.compile(small_net, (x1,), backend="tvm", target="rpi4")
    folder = compiled.save(tmp_path_factory.mktemp("rpi4") / "deploy")
    return compiled, folder


# ----------------------------------------------------------------------------- x86 exactness
def test_small_net_matches_the_program_at_other_batches(small_tvm, x4):
    report = small_tvm.report
    assert report.backend == "tvm" and report.backend_check.relative <= REL_TOL
    assert report.backend_info["target"] == "x86_64" and report.backend_info["dynamic_batch"]
    # compiled at batch 1, run at 4 and 3: the batch stays symbolic through Relax
    for x in (x4, x4[:3]):
        assert rel_err(small_tvm(x), small_tvm.program(x)) <= REL_TOL


def test_resnet18_matches_the_program(resnet18_folded):
    folded, _ = resnet18_folded
    compiled = edgefx.compile(folded, backend="tvm")
    assert compiled.report.backend_check.relative <= REL_TOL
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    assert rel_err(compiled(x), folded(x)) <= REL_TOL


def assert_quantized_matches_onnx(folded: edgefx.Program, size: int) -> None:
    """Integer codes times powers of two accumulate exactly in float32, so a right lowering
    of quantize_pot/dequantize_pot reproduces the Program, and ONNX, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    calib = [torch.randn(4, 3, size, size, generator=gen) for _ in range(2)]
    quantized = PotQuantize(calib, search="mse", weight_bits=4)(folded).program
    on_tvm = edgefx.compile(quantized, backend="tvm")
    on_onnx = edgefx.compile(quantized, backend="onnx")
    assert on_tvm.report.backend_check.max_abs == 0.0
    x = torch.randn(3, 3, size, size, generator=gen)
    assert torch.equal(on_tvm(x), on_onnx(x))


def test_pot_quantized_small_net_gives_the_onnx_backends_numbers(small_folded):
    folded, _ = small_folded
    assert_quantized_matches_onnx(folded, 8)


@pytest.mark.slow
def test_pot_quantized_resnet18_gives_the_onnx_backends_numbers(resnet18_folded):
    folded, _ = resnet18_folded
    assert_quantized_matches_onnx(folded, 32)


def test_quantize_pot_rounds_half_to_even_and_clamps():
    class Quantize(torch.nn.Module):
        def forward(self, x):
            exponent = torch.tensor([-1, 0], dtype=torch.int32)
            q = torch.ops.edgefx.quantize_pot(x, exponent, 1, 4, True)
            u = torch.ops.edgefx.quantize_pot(x.abs(), exponent[1], 0, 3, False)
            return q, u, torch.ops.edgefx.dequantize_pot(q, exponent, 1)

    ties = torch.tensor([[0.25, 0.5], [0.75, 1.5], [-0.25, 2.5], [-0.75, -1.5], [9.0, -30.0]])
    compiled = edgefx.compile(Quantize(), (ties.reshape(5, 2),), backend="tvm")
    want = compiled.program.run_flat([ties])
    got = compiled.artifact.run([ties])
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "timm:deit_small_patch16_224"])
@pytest.mark.parametrize("size", [64, 224])
def test_zoo_models_match_the_program(name, size):
    from edgefx.frontend.zoo import resolve_model

    if "deit" in name and size != 224:
        pytest.skip("DeiT-S's position embedding is for 224x224 inputs")
    resolved = resolve_model(name, (1, 3, size, size))
    compiled = edgefx.compile(resolved.model, resolved.example_inputs, backend="tvm")
    assert compiled.report.backend_check.relative <= REL_TOL


@pytest.mark.slow
def test_channel_pruned_resnet50_matches_the_program():
    import torchvision

    from edgefx.passes import ChannelPrune

    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 64, 64)
    compiled = edgefx.compile(
        model, (x,), passes=[ChannelPrune(macs=0.5), FoldBatchNorm()], backend="tvm"
    )
    assert compiled.report.backend_check.relative <= REL_TOL
    assert compiled.report.final.macs < 0.55 * compiled.report.captured.macs


# ----------------------------------------------------------------------------- deploy folders
def test_deploy_folder_runs_with_run_py_and_loads_back(small_tvm, x4, tmp_path):
    folder = small_tvm.save(tmp_path / "deploy")
    assert {LIBRARY_FILE, RUN_SCRIPT, "manifest.json"} <= {p.name for p in folder.iterdir()}
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["backend"] == "tvm" and manifest["target"]["name"] == "x86_64"
    assert manifest["inputs"][0]["shape"] == ["batch", 3, 8, 8]
    assert manifest["tvm_versions"]["apache-tvm"] == "0.27.0.post1"
    (fold,) = manifest["report"]["passes"]
    assert fold["pass"] == "FoldBatchNorm" and fold["after"]["macs"] > 0
    loaded = edgefx.load(folder)
    assert isinstance(loaded.artifact, TvmArtifact)
    assert torch.equal(loaded(x4), small_tvm(x4))

    # run.py stands alone: numpy + the TVM runtime, no edgefx, no torch
    source = (folder / RUN_SCRIPT).read_text()
    assert "edgefx" not in source.split('"""')[2] and "torch" not in source.split('"""')[2]
    np.save(tmp_path / "x.npy", x4.numpy())
    done = subprocess.run(
        [sys.executable, str(folder / RUN_SCRIPT), "--inputs", str(tmp_path / "x.npy"),
         "--out", str(tmp_path / "y.npz"), "--repeat", "3"],
        capture_output=True, text=True, cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "median latency over 2 runs" in done.stdout
    with np.load(tmp_path / "y.npz") as saved:
        assert np.array_equal(saved["arr_0"], small_tvm(x4).numpy())


def test_a_folder_for_another_target_says_why_it_cannot_run(small_rpi4):
    compiled, folder = small_rpi4
    assert "built for aarch64 and this host is x86_64" in compiled.report.backend_check_skipped
    assert "not checked" in str(compiled.report)
    with pytest.raises(ArtifactError, match=r"rpi4.*cannot run on this machine") as info:
        edgefx.load(folder)
    assert "run.py" in info.value.hint and "--rpc" in info.value.hint
    with pytest.raises(ArtifactError, match="cannot run here"):
        compiled(torch.randn(1, 3, 8, 8))
    lib = (folder / LIBRARY_FILE).read_bytes()
    assert lib[:4] == b"\x7fELF" and lib[18] == 183  # e_machine EM_AARCH64


def test_missing_cross_compiler_names_the_debian_package(small_rpi4, tmp_path, monkeypatch):
    compiled, _ = small_rpi4
    monkeypatch.setenv("PATH", str(tmp_path))  # no aarch64-linux-gnu-g++ here
    with pytest.raises(BackendError, match="aarch64-linux-gnu-g\\+\\+") as info:
        compiled.save(tmp_path / "out")
    assert "g++-aarch64-linux-gnu" in info.value.hint


def test_profile_folder_traces_the_dataflow_and_times_every_kernel_call(small_tvm, x4, tmp_path):
    """The VM instrument sees every kernel call: each reads what earlier calls wrote, the last
    one wrote the model's output, and each was timed ``runs`` times on its own."""
    from edgefx.backends.tvm.profiling import profile_folder, tvm_threads

    folder = small_tvm.save(tmp_path / "deploy")
    pool = tvm_threads()  # the thread pool is the process's: profiling puts it back
    x = x4[:2].numpy()
    profile = profile_folder(folder, [x], runs=3, warmup=1, threads=1)
    assert tvm_threads() == pool
    calls = profile.calls
    assert [c.index for c in calls] == list(range(len(calls)))
    assert all(p < c.index for c in calls for p in c.producers)
    # the last call computed the output, and its inputs go back to a call that read only the
    # model's input (and weights)
    output = small_tvm(torch.from_numpy(x)).numpy()
    assert calls[-1].outputs[-1].matches(Signature.of(output))
    chain, seen = [calls[-1].index], set()
    while chain:
        index = chain.pop()
        seen.add(index)
        chain.extend(calls[index].producers)
    assert any(not calls[i].producers for i in seen) and len(seen) >= 4
    assert all(len(c.times) == 3 and c.ms == statistics.median(c.times) for c in calls)
    assert profile.run_ms > 0 and profile.threads == 1


def test_signatures_tell_tensors_apart_to_float_rounding():
    gen = np.random.default_rng(0)
    a = gen.standard_normal((2, 8, 5, 5)).astype(np.float32)
    same = Signature.of(a)
    assert same.matches(Signature.of(a * (1 + 1e-6)))  # another runtime's rounding
    assert not same.matches(Signature.of(a.reshape(2, 8, 25)))  # another shape
    assert not same.matches(Signature.of(np.maximum(a, 0)))  # another op's output
    assert not same.matches(Signature.of(a + 0.01 * np.abs(a).mean()))


# ----------------------------------------------------------------------------- targets
def test_presets_are_data_with_descriptions():
    assert {"x86_64", "aarch64", "rpi4", "rpi5", "jetson-orin-nano", "mali", "adreno",
            "cuda"} <= set(PRESETS)  # fmt: skip
    assert all(p.description and p.target["kind"] for p in PRESETS.values())
    assert PRESETS["rpi5"].target["mattr"] == ["+neon", "+dotprod"]
    assert PRESETS["jetson-orin-nano"].target["arch"] == "sm_87"


def test_targets_command_lists_every_preset(capsys):
    assert cli.main(["targets"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS)


def test_a_users_target_dict_is_accepted(small_program):
    target = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53"}
    compiled = edgefx.compile(small_program, backend="tvm", target=target)
    assert compiled.report.backend_info["target"] == "custom"
    assert compiled.artifact.target["arch"] == "aarch64"
    assert "aarch64" in compiled.report.backend_check_skipped


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("rpi3", "unknown TVM target 'rpi3'"),
        ({"kind": "llvm", "mcpu": "cortex-a72", "flux": 3}, "TVM rejects the target.*flux"),
        ({"kind": "vulkan"}, "kind 'vulkan' is not one edgefx can run"),
        ({"kind": "llvmx"}, "kind 'llvmx' is not one edgefx can run"),
        ({"kind": "llvm", "num-cores": "four"}, "TVM rejects the target.*num-cores"),
        (42, "preset name or a target dict"),
    ],
)
def test_bad_targets_are_refused_before_any_work(small_program, target, message):
    with pytest.raises(BackendError, match=message):
        edgefx.compile(small_program, backend="tvm", target=target)


def test_every_unconvertible_op_is_listed_at_once():
    class Unusual(torch.nn.Module):
        def forward(self, x):
            shifted = torch.bitwise_left_shift(x.to(torch.int32), 1).float()
            return shifted + torch.special.bessel_j0(x) + torch.kthvalue(x, 2, -1, True)[0]

    program = capture(Unusual(), (torch.randn(2, 3, 4, 4),))
    with pytest.raises(BackendError, match="cannot convert 3 op") as info:
        edgefx.compile(program, backend="tvm")
    text = str(info.value)
    for op in ("bitwise_left_shift", "special_bessel_j0", "kthvalue"):
        assert op in text


# ----------------------------------------------------------------------------- GPU targets
@pytest.mark.parametrize(
    ("target", "kind", "marker"),
    [
        ("cuda", "cuda", "__global__"),
        ("jetson-orin-nano", "cuda", "__global__"),
        ("mali", "opencl", "__kernel"),
        ("adreno", "opencl", "__kernel"),
    ],
)
def test_gpu_targets_build_kernels_without_a_gpu(small_net, x1, target, kind, marker):
    static = target == "adreno"  # TVM's Adreno schedules need static shapes
    compiled = edgefx.compile(
        small_net, (x1,), passes=[FoldBatchNorm()], backend="tvm", target=target,
        dynamic_batch=not static,
    )  # fmt: skip
    sources = compiled.artifact.device_sources()
    assert list(sources) == [kind]
    assert sources[kind].count(marker) >= 3  # one kernel per conv at least
    if not compiled.artifact.cannot_run_here:
        assert compiled.report.backend_check.relative <= REL_TOL


def test_adreno_with_a_dynamic_batch_asks_for_a_static_one(small_program):
    with pytest.raises(BackendError, match="static shapes") as info:
        edgefx.compile(small_program, backend="tvm", target="adreno")
    assert "--static-batch" in info.value.hint


@pytest.mark.gpu
def test_cuda_library_runs_on_this_gpu(small_net, x1, x4):
    import tvm

    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU on this machine")
    compiled = edgefx.compile(small_net, (x1,), backend="tvm", target="cuda")
    assert compiled.report.backend_check.relative <= REL_TOL
    assert rel_err(compiled(x4), compiled.program(x4)) <= REL_TOL


# ----------------------------------------------------------------------------- CLI
def test_cli_compiles_for_a_board_and_saves(small_program, tmp_path, capsys):
    path = small_program.save(tmp_path / "small.pt2")
    out = tmp_path / "rpi5"
    code = cli.main(["compile", str(path), "--backend", "tvm", "--target", "rpi5", "-o", str(out)])
    assert code == 0
    assert "not checked" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["target"]["name"] == "rpi5"
    assert cli.main(["run", str(out)]) == 2  # an aarch64 folder does not run on x86
    assert "--emulate" in capsys.readouterr().err


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the x86 host case")
def test_cli_runs_a_host_folder(small_tvm, tmp_path, capsys):
    folder = small_tvm.save(tmp_path / "host")
    assert cli.main(["run", str(folder), "--batch", "2", "--out", str(tmp_path / "y.npz")]) == 0
    assert "float32[2, 4]" in capsys.readouterr().out


# ----------------------------------------------------------------------------- tuning
@pytest.mark.parametrize("trials", [-1, 2.5, True])
def test_bad_tune_trials_are_refused(small_program, trials):
    with pytest.raises(BackendError, match="tune_trials must be an integer"):
        edgefx.compile(small_program, backend="tvm", backend_options={"tune_trials": trials})


def test_tuning_asks_for_a_static_batch(small_program, tmp_path):
    with pytest.raises(BackendError, match="static shapes") as info:
        edgefx.compile(
            small_program, backend="tvm",
            backend_options={"tune_trials": 8, "work_dir": tmp_path},
        )  # fmt: skip
    assert "--static-batch" in info.value.hint


@pytest.mark.slow
def test_tuning_task_by_task_records_and_reuses_its_database(small_net, x1, tmp_path):
    options = {"tune_trials": 16, "work_dir": tmp_path / "db", "progress": False}
    first = edgefx.compile(small_net, (x1,), backend="tvm", dynamic_batch=False,
                           backend_options=options)  # fmt: skip
    tuning = first.artifact.build_info["tuning"]
    tasks = tuning["tasks_tuned"] + len(tuning["tasks_failed"])
    assert tasks >= 2 and first.report.backend_check.relative <= REL_TOL
    second = edgefx.compile(small_net, (x1,), backend="tvm", dynamic_batch=False,
                            backend_options=options)  # fmt: skip
    again = second.artifact.build_info["tuning"]
    assert again["tasks_reused"] == tuning["tasks_tuned"]
    assert second.report.backend_check.relative <= REL_TOL


def test_a_task_given_its_trials_before_is_reused_with_fewer_records(monkeypatch):
    """A small search space yields fewer distinct valid candidates than trials: the work dir
    remembers the trials each task was given, so the next build reuses it instead of tuning
    it again (records alone never reach the trial count)."""
    from types import SimpleNamespace

    from edgefx.backends.tvm import tuning

    class Database:
        def has_workload(self, mod):
            return True

        def commit_workload(self, mod):
            return mod

        def get_top_k(self, workload, k):
            return [1, 2, 3]

    monkeypatch.setattr(tuning, "_task_key", lambda task: task.task_name)
    task = SimpleNamespace(task_name="fused_reshape_add", dispatched=[None])
    assert not tuning._is_tuned(Database(), task, {}, 16)
    assert tuning._is_tuned(Database(), task, {"fused_reshape_add": 16}, 16)
    assert not tuning._is_tuned(Database(), task, {"fused_reshape_add": 8}, 16)
    assert tuning._is_tuned(Database(), task, {}, 3)
