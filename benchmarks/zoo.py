"""Model-zoo sweep: does the ONNX artifact agree with eager PyTorch on every zoo model?

For each model (random weights, nothing downloaded): resolve it with
``edgefx.frontend.zoo.resolve_model``, run eager PyTorch at batch 1 and batch 4, compile it
once at batch 1 with ``edgefx.compile(..., backend="onnx")`` (dynamic batch), run the ONNX
artifact at batch 1 and batch 4 and compare. A model passes when the error relative to the
output scale (max |ort - eager| / max |eager|) is at most 1e-4 at both batch sizes.

Every model runs in a fresh subprocess (memory isolation, timeout). Results are written after
each model to ``<out>/zoo.json`` and rendered to ``<out>/zoo.md``.

    python benchmarks/zoo.py --models all                # the full sweep (hours on 2 cores)
    python benchmarks/zoo.py --models tv|timm|ci         # one source, or the CI subset
    python benchmarks/zoo.py --models resnet18,timm:deit_tiny_patch16_224 --out /tmp/zoo
    python benchmarks/zoo.py --models all --resume       # finish an interrupted sweep
    python benchmarks/zoo.py --one timm:swin_tiny_patch4_window7_224   # one model, in-process
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

TOLERANCE = 1e-4  # max abs error relative to the output scale, at batch 1 and at batch 4
RUN_BATCH = 4  # compiled at batch 1 (dynamic batch), run at this batch too
BATCH_SEED = 1  # seed of the batch-4 input (the batch-1 input is resolve_model's, seed 0)
CALIB_SEED = 2  # seed of the batch that sets BatchNorm statistics and fills tiny parameters
TINY_PARAM = 1e-4  # a parameter with every |value| at most this (zero / layer-scale init) ...
FILL_STD = 0.05  # ... is filled with N(0, FILL_STD^2)
MIN_SENSITIVITY = 1e-3  # below this the eager output hardly depends on the input
CHECK_VERSION = 3  # bump when what check_model measures changes; recorded in every result
DEFAULT_TIMEOUT_S = 900
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
STAGES = ("resolve", "eager", "capture", "passes", "backend", "check")
_STAGE_MARK = "[zoo] stage: "

# >= 30 timm architectures across families, small variants preferred. The first name of each
# line is the family's representative; input sizes are each model's pretrained_cfg default.
TIMM_MODELS: tuple[str, ...] = (
    "timm:resnet18", "timm:resnet50d",                              # ResNet
    "timm:regnetx_002", "timm:regnety_004",                         # RegNet
    "timm:mobilenetv3_small_100", "timm:mobilenetv3_large_100",     # MobileNetV3
    "timm:mobilenetv4_conv_small",                                  # MobileNetV4
    "timm:efficientnet_b0", "timm:tf_efficientnet_lite0",           # EfficientNet (TF 'same' pad)
    "timm:efficientnetv2_rw_t",                                     # EfficientNetV2
    "timm:convnext_atto", "timm:convnextv2_atto",                   # ConvNeXt
    "timm:vit_tiny_patch16_224",                                    # ViT
    "timm:deit_tiny_patch16_224", "timm:deit_tiny_distilled_patch16_224",  # DeiT
    "timm:swin_tiny_patch4_window7_224", "timm:swinv2_tiny_window8_256",  # Swin
    "timm:seresnext26d_32x4d", "timm:resnest14d",                   # SE-ResNeXt, ResNeSt
    "timm:densenet121",                                             # DenseNet
    "timm:inception_v3",                                            # Inception
    "timm:xception41",                                              # Xception
    "timm:mobilevit_xxs", "timm:mobilevitv2_050",                   # MobileViT
    "timm:efficientformer_l1", "timm:efficientformerv2_s0",         # EfficientFormer
    "timm:levit_128s",                                              # LeViT
    "timm:pit_ti_224",                                              # PiT
    "timm:cait_xxs24_224",                                          # CaiT
    "timm:twins_svt_small", "timm:twins_pcpvt_small",               # Twins
    "timm:poolformer_s12",                                          # PoolFormer / MetaFormer
    "timm:convmixer_1024_20_ks9_p14",                               # ConvMixer
    "timm:ghostnet_100",                                            # GhostNet
    "timm:repvgg_a0", "timm:mobileone_s0",                          # RepVGG, MobileOne
    "timm:mixnet_s",                                                # MixNet
    "timm:hrnet_w18_small",                                         # HRNet
    "timm:beit_base_patch16_224",                                   # BEiT
    "timm:xcit_nano_12_p16_224",                                    # XCiT
    "timm:coat_lite_tiny",                                          # CoaT
    "timm:dla34",                                                   # DLA
    "timm:vgg11_bn",                                                # VGG
    "timm:edgenext_xx_small",                                       # EdgeNeXt
    "timm:fastvit_t8",                                              # FastViT
    "timm:efficientvit_b0", "timm:efficientvit_m0",                 # EfficientViT (MIT, MSRA)
    "timm:maxvit_nano_rw_256",                                      # MaxViT
    "timm:pvt_v2_b0",                                               # PVT v2
    "timm:tiny_vit_5m_224",                                         # TinyViT
    "timm:mixer_b16_224", "timm:resmlp_12_224",                     # MLP-Mixer, ResMLP
    "timm:eva02_tiny_patch14_224",                                  # EVA-02 (RoPE)
    "timm:crossvit_tiny_240",                                       # CrossViT
    "timm:rexnet_100", "timm:lcnet_050", "timm:hgnetv2_b0",         # mobile CNNs
    "timm:cspdarknet53", "timm:dpn68", "timm:res2net50_14w_8s",     # more CNN families
    "timm:nf_resnet26",                                             # NFNet (no BN)
)

# The unmarked test subset that runs in CI: conv+BN residual, depthwise + SE, grouped conv +
# channel shuffle, fire modules, a plain ViT and a windowed (shifted-window) transformer.
CI_SUBSET: tuple[str, ...] = (
    "resnet18",
    "mobilenet_v3_small",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "timm:deit_tiny_patch16_224",
    "timm:swin_tiny_patch4_window7_224",
)


# --------------------------------------------------------------------------- model lists
def torchvision_models() -> list[str]:
    """Every torchvision classification architecture (80 with torchvision 0.29)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def all_models() -> list[str]:
    return torchvision_models() + list(TIMM_MODELS)


def select_models(spec: str) -> list[str]:
    """``tv``, ``timm``, ``all``, ``ci`` or a comma-separated list of names."""
    groups: dict[str, Callable[[], list[str]]] = {
        "tv": torchvision_models, "torchvision": torchvision_models,
        "timm": lambda: list(TIMM_MODELS), "all": all_models, "ci": lambda: list(CI_SUBSET),
    }
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part:
            names.extend(groups[part]() if part in groups else [part])
    return list(dict.fromkeys(names))


def source_of(name: str) -> str:
    return "timm" if name.startswith("timm:") else "torchvision"


# --------------------------------------------------------------------------- one model
def _leaves(out: object) -> list[Any]:
    from torch.utils import _pytree as pytree

    return pytree.tree_leaves(out)


def relative_error(reference: Sequence[Any], actual: Sequence[Any]) -> float:
    """max |actual - reference| / max |reference| over all output tensors (float64), by
    edgefx's own ``NumericError``: a different count or shape, or a NaN / infinity on one side
    that the other does not share, raises (a ValueError) naming the side."""
    from edgefx.analysis.numerics import NumericError
    from edgefx.errors import EdgefxError

    class ComparisonError(EdgefxError, ValueError):
        """The two output sets cannot be compared."""

    return NumericError.between(reference, actual, error=ComparisonError,
                                reference_name="the reference",
                                actual_name="the compared output").relative


def float64_reference(model: Any, inputs: Sequence[Any], eager: Sequence[Any],
                      ort: Sequence[Any]) -> dict[str, float]:
    """How far eager float32 and ORT each are from the same model run in float64: tells float32
    rounding (both off by about as much) from a lowering error (ORT much further off)."""
    import copy

    import torch

    reference = copy.deepcopy(model).double()
    with torch.no_grad():
        exact = _leaves(reference(*(x.double() if x.is_floating_point() else x for x in inputs)))
    return {"eager_fp32": relative_error(exact, eager),
            "ort": relative_error(exact, _leaves(ort))}


def _one_line(text: str, limit: int = 240) -> str:
    """The first line of an error; with the next one when the first only introduces it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # torch.onnx colours its messages
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[0]
    if line.endswith(":") and len(lines) > 1:
        line = f"{line} {lines[1]}"
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _error_stage(exc: BaseException) -> str:
    """Which compile() stage raised ``exc``: by error class, else by the edgefx frame in it."""
    from edgefx.errors import BackendError, CaptureError, InputError, PassError

    if isinstance(exc, (CaptureError, InputError)):
        return "capture"
    if isinstance(exc, PassError):
        return "passes"
    if isinstance(exc, BackendError):
        # compile()'s numeric check: "disagrees with the Program" / "... the quantized Program"
        return "check" if "disagrees with" in exc.message else "backend"
    stage = "capture"
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        path = frame.f_code.co_filename.replace(os.sep, "/")
        if "/edgefx/passes/" in path:
            stage = "passes"
        elif "/edgefx/backends/" in path:
            stage = "backend"
    return stage


# what the sweep's results depend on: a change here (committed or not) changes the results
_MEASURED_PATHS = ("edgefx", "benchmarks/zoo.py", "pyproject.toml")


def edgefx_revision(*scripts: str) -> str | None:
    """``git describe``-like revision of the edgefx sources that ran: HEAD, plus ``-dirty``
    when the code the sweep runs (``_MEASURED_PATHS`` and ``scripts``, paths from the repo
    root, e.g. ``benchmarks/prune_zoo.py``) has uncommitted or untracked changes.
    None outside a git checkout."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=repo, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *_MEASURED_PATHS,
                                *scripts],
                               cwd=repo, text=True, capture_output=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("-dirty" if dirty.strip() else "")) if head else None


class ZooError(Exception):
    """The sweep refuses to run as asked (its message says why and what to do instead)."""


def check_one_commit(out: Path, revision: str | None, existing: dict[str, Any] | None,
                     stem: str = "zoo") -> None:
    """The committed table must come from one clean commit: refuse to write results from a
    dirty tree (or outside git) into ``benchmarks/results/``, and refuse to resume a table
    (``<stem>.json``) measured at another commit. Ad-hoc ``--out`` folders take anything."""
    if out.resolve() != DEFAULT_OUT.resolve():
        return
    if revision is None or revision.endswith("-dirty"):
        raise ZooError(
            f"refusing to write {DEFAULT_OUT}: the sources are "
            f"{'not in a git checkout' if revision is None else 'uncommitted (' + revision + ')'};"
            " the committed table must come from one clean commit. Commit first, or write an "
            "ad-hoc table with --out DIR")
    if existing is not None and existing.get("commit") != revision:
        raise ZooError(
            f"refusing to resume {DEFAULT_OUT / (stem + '.json')}: it was measured at commit "
            f"{existing.get('commit') or 'unknown'}, this tree is {revision}; a table mixes no "
            "commits. Resume from a checkout of that commit, or start afresh without --resume")


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1 << 20 if sys.platform == "darwin" else 1 << 10), 1)


def make_nondegenerate(model: Any, example: Sequence[Any], *, batch: int) -> dict[str, int]:
    """Make a randomly initialised model's output depend on its input, so the check means
    something: fill every parameter whose values are all within +-TINY_PARAM (zero-initialised
    heads, e.g. torchvision ViT; zero residual-branch BN gammas; layer-scale gammas of 1e-5 or
    1e-6, e.g. CaiT, ConvNeXt) with N(0, FILL_STD^2) and set every BatchNorm's running
    statistics from one random batch. With default init and identity BN statistics, e.g.
    torchvision's GoogLeNet outputs its fc bias whatever the input, ViT-B/16 outputs zeros and
    CaiT's output depends on its input by 6e-6 of its scale.
    """
    import torch

    generator = torch.Generator().manual_seed(CALIB_SEED)
    filled = 0
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and p.numel() and float(p.abs().max()) <= TINY_PARAM:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * FILL_STD)
                filled += 1
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if norms:
        calib = tuple(torch.randn((batch, *x.shape[1:]), generator=generator, dtype=x.dtype)
                      for x in example)
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: after one batch, exactly its statistics
            m.train()
        try:
            with torch.no_grad():
                model(*calib)
        finally:
            for m, momentum in zip(norms, momenta, strict=True):
                m.momentum = momentum
                m.eval()
    return {"params_filled": filled, "batchnorms_calibrated": len(norms)}


def input_sensitivity(outputs: Sequence[Any]) -> float:
    """How much a batch's outputs differ from its first sample's, relative to the output scale
    (0 when the output does not depend on the input)."""
    spread = scale = 0.0
    for y in outputs:
        if y.dim() and y.shape[0] > 1 and y.numel() and y.is_floating_point():
            y64 = y.detach().double()
            spread = max(spread, float((y64 - y64[:1]).abs().max()))
            scale = max(scale, float(y64.abs().max()))
    return spread / scale if scale > 0 else 0.0


def check_model(name: str, *, tolerance: float = TOLERANCE, run_batch: int = RUN_BATCH,
                on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Compile ``name`` to ONNX at batch 1 and compare it with eager PyTorch at batch 1 and
    ``run_batch``. Never raises for a model that fails: the result says where and why.

    The model's random weights are first made non-degenerate (:func:`make_nondegenerate`);
    a model whose eager output still hardly depends on its input fails at stage 'eager'.

    Result keys: model, source, status ('ok'/'fail'), stage and reason (failures), rel_err_b1,
    rel_err_b4, macs, params, capture_s, build_s, total_s, backend_check_rel, input_shape,
    sensitivity, init (what make_nondegenerate changed), check (CHECK_VERSION), edgefx_git,
    error (the full error text), peak_rss_mb.
    """
    import torch

    import edgefx
    from edgefx.errors import EdgefxError
    from edgefx.frontend.zoo import resolve_model

    result: dict[str, Any] = {
        "model": name, "source": source_of(name), "status": "fail", "stage": None, "reason": None,
        "rel_err_b1": None, "rel_err_b4": None, "macs": None, "params": None,
        "capture_s": None, "build_s": None, "total_s": None, "check": CHECK_VERSION,
        "edgefx_git": edgefx_revision(),
    }
    start = time.perf_counter()
    stage = "resolve"

    def enter(new_stage: str) -> None:
        nonlocal stage
        stage = new_stage
        if on_stage is not None:
            on_stage(new_stage)

    try:
        enter("resolve")
        resolved = resolve_model(name)
        x1 = tuple(resolved.example_inputs)
        generator = torch.Generator().manual_seed(BATCH_SEED)
        x4 = tuple(torch.randn((run_batch, *x.shape[1:]), generator=generator, dtype=x.dtype)
                   for x in x1)
        result["input_shape"] = [list(x.shape) for x in x1]

        enter("eager")
        result["init"] = make_nondegenerate(resolved.model, x1, batch=run_batch)
        with torch.no_grad():
            eager1 = _leaves(resolved.model(*x1))
            eager4 = _leaves(resolved.model(*x4))
        for out in (*eager1, *eager4):
            if not bool(torch.isfinite(out).all()):
                raise ValueError("eager PyTorch output is not finite (random weights overflow)")
        result["sensitivity"] = input_sensitivity(eager4)
        if result["sensitivity"] < MIN_SENSITIVITY:
            raise ValueError(f"eager output hardly depends on the input (sensitivity "
                             f"{result['sensitivity']:.1e}): the comparison would be vacuous")

        enter("capture")  # compile() runs capture -> passes -> backend
        # tolerance=inf: compile() would refuse a lowering whose batch-1 error is over 1e-4;
        # keep the artifact so the error is measured (against eager) and reported below.
        compiled = edgefx.compile(resolved.model, x1, backend="onnx", progress=False,
                                  tolerance=math.inf)
        report = compiled.report
        result.update(macs=report.captured.macs, params=report.captured.params,
                      capture_s=round(report.capture_s, 2), build_s=round(report.build_s, 2),
                      backend_check_rel=report.backend_check.relative if report.backend_check
                      else None)

        enter("check")
        result["rel_err_b1"] = relative_error(eager1, _leaves(compiled(*x1)))
        result["rel_err_b4"] = relative_error(eager4, _leaves(compiled(*x4)))
        worst = max(result["rel_err_b1"], result["rel_err_b4"])
        if worst <= tolerance:
            result.update(status="ok", stage=None)
        else:
            reason = (f"ORT differs from eager: rel err {result['rel_err_b1']:.2g} at batch 1, "
                      f"{result['rel_err_b4']:.2g} at batch {run_batch} (tolerance {tolerance:g})")
            try:
                result["float64"] = float64_reference(resolved.model, x4, eager4, compiled(*x4))
                reason += (f"; against float64 eager at batch {run_batch}: eager float32 is "
                           f"{result['float64']['eager_fp32']:.2g} off, ORT "
                           f"{result['float64']['ort']:.2g}")
            except Exception as exc:  # the diagnosis is optional; the failure stands
                reason += f"; no float64 reference ({type(exc).__name__})"
            result.update(stage="check", reason=reason)
    except Exception as exc:  # a failing model is a result, not a crash of the sweep
        reason = failure_reason(exc)
        if not isinstance(exc, EdgefxError) and stage in ("capture", "passes", "backend"):
            reason = f"unexpected {reason}"  # edgefx promises EdgefxError subclasses
        result.update(stage=_error_stage(exc) if stage == "capture" else stage, reason=reason,
                      error_type=type(exc).__name__, error=str(exc)[:4000])
    result["total_s"] = round(time.perf_counter() - start, 2)
    result["peak_rss_mb"] = _peak_rss_mb()
    return result


# --------------------------------------------------------------------------- isolation
def run_isolated(name: str, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """:func:`check_model` in a fresh interpreter, killed after ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="edgefx-zoo-") as tmp:
        result_file = Path(tmp) / "result.json"
        stderr_file = Path(tmp) / "stderr.txt"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name,
               "--result-file", str(result_file)]
        start = time.perf_counter()
        with open(stderr_file, "w") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr,
                                    start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        elapsed = round(time.perf_counter() - start, 2)
        if result_file.is_file() and not timed_out:
            return json.loads(result_file.read_text())
        log = stderr_file.read_text(errors="replace").splitlines()
    stages = [line.removeprefix(_STAGE_MARK) for line in log if line.startswith(_STAGE_MARK)]
    stage = stages[-1] if stages else "resolve"
    if timed_out:
        reason = f"timeout after {timeout:g} s"
    elif proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        reason = f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
    else:
        tail = [line for line in log if line.strip() and not line.startswith(_STAGE_MARK)]
        reason = f"exit code {proc.returncode}: {tail[-1].strip() if tail else 'no output'}"
    return {"model": name, "source": source_of(name), "status": "fail", "stage": stage,
            "reason": reason, "rel_err_b1": None, "rel_err_b4": None, "macs": None,
            "params": None, "capture_s": None, "build_s": None, "total_s": elapsed,
            "check": CHECK_VERSION, "edgefx_git": edgefx_revision(),  # the tree that ran it
            "error": "\n".join(log[-40:])}


# --------------------------------------------------------------------------- pass sweeps
# What the per-pass zoo tables (prune_zoo.py, quantize_zoo.py) share: each model in a fresh
# interpreter, the sweep loop with --resume, the command-line options and the table header.
def run_one_isolated(script: Path, name: str, options: Sequence[str],
                     timeout: float) -> tuple[dict[str, Any] | None, str | None]:
    """``python SCRIPT --one NAME OPTIONS`` in a fresh interpreter (memory isolation) on this
    checkout's edgefx, killed after ``timeout`` seconds: the result it wrote and None, or None
    and why there is none (timeout, or the exit code and the last line of its stderr)."""
    with tempfile.TemporaryDirectory(prefix=f"edgefx-{script.stem}-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(script), "--one", name, *options, "--result-file", str(out)]
        repo = str(Path(__file__).resolve().parent.parent)  # this checkout's edgefx
        env = {**os.environ,
               "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            tail = [line for line in proc.stderr.splitlines() if line.strip()]
            reason = f"exit code {proc.returncode}: {_one_line(tail[-1]) if tail else 'no output'}"
            if proc.returncode < 0:
                sig = signal.Signals(-proc.returncode).name
                reason = f"killed by {sig}" + (" (out of memory?)" if sig == "SIGKILL" else "")
        except subprocess.TimeoutExpired:
            reason = f"timeout after {timeout:g} s"
        if out.is_file():
            return json.loads(out.read_text()), None
    return None, reason


def pass_result(name: str, script: str, **settings: Any) -> dict[str, Any]:
    """A pass sweep's record of one model before it runs: failed at stage resolve until it
    gets further; ``settings`` are what the figures depend on (budget, search ...)."""
    return {"model": name, "source": source_of(name), "status": "failed", "stage": "resolve",
            "reason": None, **settings, "edgefx_git": edgefx_revision(script)}


def resolve_sized(name: str, size: int | None, result: dict[str, Any]) -> tuple[Any, tuple]:
    """The zoo model ``name`` (eval mode, random weights) and its batch-1 example inputs, at
    ``size`` x ``size`` or the model's default size; records the input shape in ``result``."""
    from edgefx.frontend.zoo import resolve_model

    resolved = resolve_model(name, None if size is None else (1, 3, size, size))
    inputs = tuple(resolved.example_inputs)
    result["input_shape"] = [list(x.shape) for x in inputs]
    return resolved.model, inputs


def failure_reason(exc: BaseException) -> str:
    """One line saying why: an EdgefxError's message, else the exception's type and text."""
    from edgefx.errors import EdgefxError

    if isinstance(exc, EdgefxError):
        return _one_line(exc.message)
    return f"{type(exc).__name__}: {_one_line(str(exc))}".rstrip(": ")


def add_sweep_arguments(parser: argparse.ArgumentParser, *, timeout: float) -> None:
    """The options every pass sweep takes: --models, --size, --timeout, --out, --resume,
    --one (and the hidden --result-file its subprocess writes to)."""
    parser.add_argument("--models", default="all",
                        help="tv | timm | all | ci | NAME,NAME,... (timm names as timm:NAME)")
    parser.add_argument("--size", type=int, help="input size instead of each model's default")
    parser.add_argument("--timeout", type=float, default=timeout,
                        help=f"seconds per model before it is killed (default {timeout:g})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for the .json and .md (default benchmarks/results)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in OUT and run only the missing models")
    parser.add_argument("--jobs", type=int, default=1,
                        help="models run at once, each in its own subprocess (default 1)")
    parser.add_argument("--one", metavar="NAME", help="one model in this process (JSON out)")
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)


def emit_one(result: dict[str, Any], result_file: Path | None) -> None:
    """``--one``'s output: the result as JSON, into the file its parent reads or to stdout."""
    text = json.dumps(result, indent=1)
    if result_file:
        result_file.write_text(text)
    else:
        print(text)


def pass_sweep(names: Sequence[str], out: Path, stem: str, *, settings: dict[str, Any],
               run: Callable[[str], dict[str, Any]], render: Callable[[dict[str, Any]], str],
               line: Callable[[dict[str, Any]], str], command: str, resume: bool,
               script: str, jobs: int = 1) -> dict[str, Any]:
    """Run ``run(name)`` for each model not yet in ``OUT/<stem>.json``, writing the json and
    ``render(data)`` to ``<stem>.md`` after each and printing ``line(result)``. ``settings``
    (what the figures depend on: budget, search, size ...) are kept in the data; resuming a
    table measured with other settings, or (in benchmarks/results) at another commit or from
    a dirty tree, is refused (ZooError). ``script``: the sweep's path from the repo root;
    ``jobs``: models run at once (each in its own subprocess)."""
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    revision = edgefx_revision(script)
    existing = json.loads(json_path.read_text()) if resume and json_path.is_file() else None
    check_one_commit(out, revision, existing, stem)
    if existing is not None:
        changed = {k: (existing.get(k), v) for k, v in settings.items() if existing.get(k) != v}
        if changed:
            raise ZooError(f"refusing to resume {json_path}: it was measured with "
                           + ", ".join(f"{k}={old!r} (now {new!r})"
                                       for k, (old, new) in changed.items())
                           + "; resume with the same options or start afresh")
        data = existing
        data["commands"].append(command)
        data["models"] = list(dict.fromkeys([*data["models"], *names]))
        data["finished"] = None
    else:
        data = {"commands": [command], "commit": revision, "started": _now(), "finished": None,
                **settings, "machine": machine_info(), "models": list(names), "results": {}}
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        _write_atomic(json_path, json.dumps(data, indent=1) + "\n")
        _write_atomic(md_path, render(data))

    save()
    todo = [n for n in names if n not in data["results"]]
    with ThreadPoolExecutor(max_workers=max(jobs, 1)) as pool:  # results come back in order
        for i, (name, result) in enumerate(zip(todo, pool.map(run, todo), strict=True), 1):
            data["results"][name] = result
            save()
            print(f"[{stem}] {i}/{len(todo)} {name}: {line(result)}", flush=True)
    data["finished"] = _now()
    save()
    return data


def commit_and_machine(data: dict[str, Any]) -> list[str]:
    """A pass sweep's header lines: the commit it measured, the machine it ran on and the
    library versions."""
    machine = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    return [f"- commit {data.get('commit') or 'unknown'}; machine: {machine.get('cpus')} CPU "
            f"cores ({machine.get('cpu', '?')}), {machine.get('ram_gib', '?')} GiB RAM, "
            f"{machine.get('platform', '')}",
            f"- versions: {versions}"]


# --------------------------------------------------------------------------- results
def machine_info() -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    import edgefx

    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(),
                            "python": platform.python_version()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    versions = {"edgefx": edgefx.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
                "onnxruntime": onnxruntime.__version__}
    for module in ("torchvision", "timm", "onnxscript"):
        with contextlib.suppress(ImportError):
            versions[module] = __import__(module).__version__
    info["versions"] = versions
    return info


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _si(n: int | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)


def _err(x: float | None) -> str:
    return "" if x is None else f"{x:.1e}"


def _seconds(x: float | None) -> str:
    return "" if x is None else f"{x:.1f}"


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _float32_limited(result: dict[str, Any]) -> bool:
    """A failed check where ORT is nearer the float64 result than eager float32 is."""
    f64 = result.get("float64") or {}
    return (result.get("stage") == "check" and f64.get("ort") is not None
            and f64.get("eager_fp32") is not None and f64["ort"] <= f64["eager_fp32"])


def produced_by(data: dict[str, Any]) -> list[str]:
    """A sweep table's first lines: the command(s) that produced it, when it started and
    whether it finished."""
    return [
        "Produced by" + (" (in steps)" if len(data["commands"]) > 1 else "") + ":",
        "",
        "```",
        *data["commands"],
        "```",
        "",
        f"- started {data['started']}, "
        + (f"finished {data['finished']}" if data.get("finished") else "**not finished**"),
    ]


def render_markdown(data: dict[str, Any]) -> str:
    results: dict[str, dict[str, Any]] = data["results"]
    planned: list[str] = data["models"]
    done = [results[n] for n in planned if n in results]
    ok = sum(r["status"] == "ok" for r in done)
    stale = [r["model"] for r in done if r.get("check", 1) != CHECK_VERSION]
    commit = data.get("commit")
    foreign = [r["model"] for r in done if r.get("edgefx_git") != commit]
    machine = data["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    lines = [
        "# edgefx model zoo: ONNX (onnxruntime) vs eager PyTorch",
        "",
        *produced_by(data),
        f"- machine: {machine.get('cpus')} CPU cores ({machine.get('cpu', 'unknown CPU')}), "
        f"{machine.get('ram_gib', '?')} GiB RAM, {machine.get('platform', '')}, "
        f"python {machine.get('python')}",
        f"- every row measured at commit **{commit or 'unknown'}**" + (
            f", except {len(foreign)} measured at another revision: {', '.join(foreign)}"
            if foreign else ""),
        f"- versions: {versions}",
        f"- check (version {CHECK_VERSION}): random weights, near-zero parameters filled and "
        f"BatchNorm statistics set from a random batch (`make_nondegenerate`); compiled once "
        f"at batch 1 (dynamic batch) with "
        f"`edgefx.compile(model, x, backend=\"onnx\")`, run at batch 1 and batch "
        f"{data['run_batch']}; rel err = max abs error / max |eager output|; pass if both "
        f"<= {data['tolerance']:g}",
        "",
        *([f"- **{len(stale)} result(s) come from an older version of the check** "
           f"({', '.join(stale)}); refresh them with `--resume --redo stale`", ""]
          if stale else []),
        f"**{ok} ok / {len(done) - ok} failed** of {len(done)} run"
        + (f" ({len(planned) - len(done)} of {len(planned)} not run yet)"
           if len(done) < len(planned) else ""),
        "",
    ]
    for source, title in (("torchvision", "torchvision (`list_models(module=torchvision.models)`)"),
                          ("timm", "timm")):
        rows = [r for r in done if r["source"] == source]
        names = [n for n in planned if source_of(n) == source]
        if not names:
            continue
        n_ok = sum(r["status"] == "ok" for r in rows)
        lines += [f"## {title}: {n_ok} ok / {len(rows) - n_ok} failed of {len(rows)} run", "",
                  "| model | status | MACs | params | rel err b1 | rel err b4 | capture s "
                  "| build s | total s | reason |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|---|"]
        for r in sorted(rows, key=lambda r: r["model"]):
            status = "ok" if r["status"] == "ok" else f"**FAIL** ({r.get('stage')})"
            lines.append(
                f"| {r['model'].removeprefix('timm:')} | {status} | {_si(r.get('macs'))} "
                f"| {_si(r.get('params'))} | {_err(r.get('rel_err_b1'))} "
                f"| {_err(r.get('rel_err_b4'))} | {_seconds(r.get('capture_s'))} "
                f"| {_seconds(r.get('build_s'))} | {_seconds(r.get('total_s'))} "
                f"| {_cell(r.get('reason'))} |")
        lines.append("")
    failed = [r for r in done if r["status"] != "ok"]
    lines += ["## Failures", ""]
    if failed:
        lines += [f"- `{r['model']}` ({r.get('stage')}): {_cell(r.get('reason'))}"
                  for r in sorted(failed, key=lambda r: r["model"])]
        rounding = sorted(r["model"] for r in failed if _float32_limited(r))
        if rounding:
            lines += ["", f"Of these, {', '.join(f'`{m}`' for m in rounding)} miss the tolerance "
                      "by float32 rounding, not by a lowering error: run in float64, the same "
                      "model's output is nearer to ORT's than to eager float32's, i.e. eager "
                      "float32 is itself further than ORT from the exact result."]
    else:
        lines.append("None.")
    lines.append("")
    return "\n".join(lines)


def _redo_filter(spec: str | None) -> Callable[[dict[str, Any]], bool]:
    """Which existing results ``--redo`` re-runs: failed, stale, all, or NAME,NAME,..."""
    if not spec:
        return lambda r: False
    if spec == "failed":
        return lambda r: r["status"] != "ok"
    if spec == "stale":
        return lambda r: r.get("check", 1) != CHECK_VERSION
    if spec == "all":
        return lambda r: True
    chosen = set(select_models(spec))
    return lambda r: r["model"] in chosen


def sweep(names: Sequence[str], out: Path, *, timeout: float, jobs: int, command: str,
          resume: bool, redo: str | None = None) -> dict[str, Any]:
    json_path, md_path = out / "zoo.json", out / "zoo.md"
    revision = edgefx_revision()
    existing = json.loads(json_path.read_text()) if resume and json_path.is_file() else None
    check_one_commit(out, revision, existing)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] | None = None
    if existing is not None:
        data = existing
        data["commands"].append(command)
        data["models"] = list(dict.fromkeys([*data["models"], *names]))
        data["finished"] = None
    if data is None:
        data = {"commands": [command], "commit": revision, "started": _now(), "finished": None,
                "tolerance": TOLERANCE, "run_batch": RUN_BATCH, "timeout_s": timeout,
                "machine": machine_info(), "models": list(names), "results": {}}
    again = _redo_filter(redo)
    todo = [n for n in names if n not in data["results"] or again(data["results"][n])]

    def save() -> None:
        _write_atomic(json_path, json.dumps(data, indent=1) + "\n")
        _write_atomic(md_path, render_markdown(data))

    save()
    total = len(todo)

    def one(name: str) -> dict[str, Any]:
        print(f"[zoo] start {name}", flush=True)
        return run_isolated(name, timeout)

    def record(i: int, result: dict[str, Any]) -> None:
        data["results"][result["model"]] = result
        save()
        detail = (f"rel err {_err(result['rel_err_b1'])} / {_err(result['rel_err_b4'])}"
                  if result["status"] == "ok" else f"{result['stage']}: {result['reason']}")
        print(f"[zoo] {i}/{total} {result['model']}: {result['status']} "
              f"({result['total_s']:.0f} s) {detail}", flush=True)

    if jobs <= 1:
        for i, name in enumerate(todo, start=1):
            record(i, one(name))
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for i, result in enumerate(pool.map(one, todo), start=1):
                record(i, result)
    data["finished"] = _now()
    save()
    return data


# --------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="all",
                        help="tv | timm | all | ci | NAME,NAME,... (timm names as timm:NAME)")
    parser.add_argument("--jobs", type=int, default=1, help="models run at once (default 1)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help="seconds per model before it is killed and recorded as failed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="folder for zoo.json and zoo.md (default benchmarks/results)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in OUT/zoo.json and run only the rest")
    parser.add_argument("--redo", metavar="WHICH",
                        help="with --resume: also re-run these models already in zoo.json: "
                             "failed | stale (older check version) | all | NAME,NAME,...")
    parser.add_argument("--one", metavar="NAME",
                        help="check one model in this process and print its result as JSON")
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        def mark(stage: str) -> None:
            print(f"{_STAGE_MARK}{stage}", file=sys.stderr, flush=True)

        result = check_model(args.one, on_stage=mark)
        text = json.dumps(result, indent=1)
        if args.result_file:
            args.result_file.write_text(text)
        else:
            print(text)
        return 0 if result["status"] == "ok" else 1

    names = select_models(args.models)
    command = shlex.join(["python", "benchmarks/zoo.py", *argv])
    try:
        data = sweep(names, args.out, timeout=args.timeout, jobs=args.jobs, command=command,
                     resume=args.resume, redo=args.redo)
    except ZooError as exc:
        print(f"[zoo] {exc}", file=sys.stderr, flush=True)
        return 2
    failed = [n for n in names if data["results"][n]["status"] != "ok"]
    print(f"[zoo] {len(names) - len(failed)} ok / {len(failed)} failed; "
          f"wrote {args.out / 'zoo.json'} and {args.out / 'zoo.md'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
