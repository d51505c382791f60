"""QDQToShift: latency of the integer (bit-shift) graph against float and QDQ, and how often
its codes disagree with the QDQ graph's, under each rounding rule.

For each model, in one run on one machine, at batch 1 and 8 (medians side by side):
- float: FoldBatchNorm, onnxruntime;
- qdq: FoldBatchNorm + PotQuantize (W8A8, minmax), Q/DQ run as written by onnxruntime;
- ort-int8: onnxruntime's own ``quantize_static`` (QDQ, int8 weights and activations,
  calibrated on the same batches) of the float ONNX model, run with its fused int8 kernels;
- shift-ort: + QDQToShift (default rounding: half to even), onnxruntime at opset 28
  (ConvInteger + BitShift);
- shift-tvm: the same shift Program through TVM Relax, ``tvm.compile(target="llvm")`` with
  no tuning and no schedules (naive loops; see PLATFORM.md) on one VM.

Rounding: per model and per rule (the default half to even, as the QDQ graph's quantize, and
``rounding="half_up"``), the share of the requantized codes that differ from the QDQ graph's
codes on held-out inputs, the largest difference in steps, and the share of outputs whose
top-1 class differs. Under half to even a difference can only come from a float32 sum of the
QDQ graph that is not exact (an accumulator beyond 2**24).

Random weights (``make_nondegenerate``) and random inputs: nothing is downloaded.

    python benchmarks/shift.py --models resnet18,mobilenet_v2 --size 224
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from common import RESULTS, header, latency_ms, load_average, load_text, write_results
from zoo import make_nondegenerate

import edgefx
import edgefx.ops
from edgefx.frontend import capture
from edgefx.passes import FoldBatchNorm, PassManager, PotQuantize, QDQToShift

SEED = 0
REQUANT = torch.ops.edgefx.requant_shift.default
QUANTIZE = torch.ops.edgefx.quantize_pot.default
TO_CODES = torch.ops.edgefx.float_to_codes.default


def _session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _ort_runner(session: ort.InferenceSession, x: np.ndarray):
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def _ort_static_int8(float_model: onnx.ModelProto, calib: list[torch.Tensor], tmp: Path) -> str:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, pre, dst = tmp / "float.onnx", tmp / "pre.onnx", tmp / "int8.onnx"
    onnx.save(float_model, src)
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    name = float_model.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{name: b.numpy()} for b in calib])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    per_channel=True)
    return str(dst)


def _codes(program: edgefx.Program, x: torch.Tensor, targets: set) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.op == "call_function" and n.target in targets:
                seen.append(out)
            return out

    with torch.no_grad():
        Recorder(program.graph_module).run(x)
    return seen


def _rounding(qdq: edgefx.Program, shift: edgefx.Program, x: torch.Tensor) -> dict[str, Any]:
    """Codes of the shift graph vs the QDQ graph's quantize_pot codes, pairwise in graph order
    (the rewrite replaces each quantize_pot in place: by a requant_shift, or by a
    float_to_codes where its input is float)."""
    q_codes = _codes(qdq, x, {QUANTIZE})
    s_codes = [c for c in _codes(shift, x, {REQUANT, TO_CODES}) if c.dtype != torch.int32]
    diff = total = 0
    steps = 0
    for a, b in zip(q_codes, s_codes, strict=True):
        d = (a.int() - b.int()).abs()
        diff += int((d > 0).sum())
        total += d.numel()
        steps = max(steps, int(d.max()))
    with torch.no_grad():
        ya, yb = qdq.run_flat([x])[0], shift.run_flat([x])[0]
    return {
        "requant_elements": total,
        "differ_fraction": diff / max(total, 1),
        "max_step_diff": steps,
        "top1_differ_fraction": float((ya.argmax(1) != yb.argmax(1)).float().mean()),
    }


def _tvm_runner(program: edgefx.Program, x: np.ndarray):
    import tvm
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    mod = from_exported_program(program.export(), keep_params_as_input=False,
                                custom_convert_map=edgefx.ops.tvm_converters())
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    data = tvm.runtime.tensor(x)
    return lambda: vm["main"](data)


def run_model(name: str, size: int, repeat: int, tvm_repeat: int) -> dict[str, Any]:
    import torchvision

    torch.manual_seed(SEED)
    model = getattr(torchvision.models, name)()
    gen = torch.Generator().manual_seed(SEED)
    calib = [torch.randn(8, 3, size, size, generator=gen) for _ in range(2)]
    make_nondegenerate(model, (calib[0],), batch=8)
    program = capture(model.eval(), (calib[0][:2],))
    folded, _ = PassManager([FoldBatchNorm()], progress=False).run(program)
    qdq, _ = PassManager([PotQuantize(calib, search="minmax")], progress=False).run(folded)
    shift, results = PassManager([QDQToShift()], progress=False).run(qdq)
    half_up, _ = PassManager([QDQToShift(rounding="half_up")], progress=False).run(qdq)
    report = results[0].report
    held_out = torch.randn(8, 3, size, size, generator=gen)
    row: dict[str, Any] = {
        "model": name,
        "size": size,
        "integer_layers": report["integer_layers"],
        "layers": len(report["layers"]),
        "islands": [f"{i['module'] or i['node']}: {i['reason']}" for i in report["islands"]],
        "rounding": _rounding(qdq, shift, held_out),
        "rounding_half_up": _rounding(qdq, half_up, held_out),
        "latency_ms": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        builds = {
            "float": edgefx.compile(folded, backend="onnx", progress=False),
            "qdq": edgefx.compile(qdq, backend="onnx", progress=False),
            "shift-ort": edgefx.compile(shift, backend="onnx", progress=False,
                                        backend_options={"opset": 28}),
        }
        paths = {}
        for key, compiled in builds.items():
            paths[key] = str(tmp / f"{key}.onnx")
            onnx.save(compiled.artifact.model, paths[key])
        paths["ort-int8"] = _ort_static_int8(builds["float"].artifact.model, calib, tmp)
        for batch in (1, 8):
            x = held_out[:batch].numpy()
            timings = {}
            for key in ("float", "qdq", "ort-int8", "shift-ort"):
                options_fuse = key != "qdq"  # the QDQ graph as written (the bit-exact mode)
                session = _session(paths[key])
                if not options_fuse:
                    opts = ort.SessionOptions()
                    opts.log_severity_level = 3
                    opts.intra_op_num_threads = 1
                    opts.add_session_config_entry("session.disable_quant_qdq", "1")
                    session = ort.InferenceSession(paths[key], opts,
                                                   providers=["CPUExecutionProvider"])
                timings[key] = latency_ms(_ort_runner(session, x), repeat)
                del session
            try:
                timings["shift-tvm"] = latency_ms(_tvm_runner(shift, x), tvm_repeat, warmup=1)
            except Exception as exc:
                timings["shift-tvm"] = None
                row["tvm_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            row["latency_ms"][f"batch{batch}"] = timings
            gc.collect()
    return row


def digits_accuracy(epochs: int = 30) -> list[dict[str, Any]]:
    """Top-1 on real data: scikit-learn's load_digits (8x8 images, shipped with the package),
    a tiny CNN trained here for a few seconds, then W8A8 and W4A4 PotQuantize (calibrated on
    the training split) and QDQToShift; float, fake-quant (QDQ) and integer top-1 on the
    held-out split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.25, random_state=SEED, stratify=labels
    )
    torch.manual_seed(SEED)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        model.train()
        for i in range(0, len(x_train), 128):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x_train[i:i + 128]),
                                                     y_train[i:i + 128])
            loss.backward()
            optimizer.step()
    model.eval()
    program = capture(model, (x_train[:2],))
    folded, _ = PassManager([FoldBatchNorm()], progress=False).run(program)

    def top1(p: edgefx.Program) -> float:
        return float((p.run_flat([x_test])[0].argmax(1) == y_test).float().mean()) * 100

    rows = []
    calib = [x_train[i:i + 256] for i in range(0, len(x_train), 256)]
    for bits in ((8, 8), (4, 4)):
        quantize = PotQuantize(calib, weight_bits=bits[0], act_bits=bits[1], search="mse")
        qdq, _ = PassManager([quantize],
                             progress=False).run(folded)
        shift, results = PassManager([QDQToShift()], progress=False).run(qdq)
        half_up, _ = PassManager([QDQToShift(rounding="half_up")], progress=False).run(qdq)
        compiled = edgefx.compile(shift, backend="onnx", progress=False,
                                  backend_options={"opset": 28})
        ort_pred = compiled(x_test).argmax(1)
        rows.append({
            "bits": f"W{bits[0]}A{bits[1]}",
            "test_images": len(y_test),
            "float_top1": top1(folded),
            "qdq_top1": top1(qdq),
            "integer_top1": top1(shift),
            "integer_ort_top1": float((ort_pred == y_test).float().mean()) * 100,
            "integer_half_up_top1": top1(half_up),
            "integer_layers": results[0].report["integer_layers"],
            "islands": len(results[0].report["islands"]),
        })
    return rows


def _maybe(value: float | None) -> str:
    return "not run" if value is None else f"{value:.2f}"


def _model_tables(data: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| model | batch | float ms | qdq ms | ort-int8 ms | shift-ort ms | shift-tvm ms "
        "| shift-ort / float |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        for batch, t in row["latency_ms"].items():
            tvm_ms = "n/a" if t["shift-tvm"] is None else f"{t['shift-tvm']:.1f}"
            lines.append(
                f"| {row['model']} {row['size']}px | {batch[5:]} | {t['float']:.2f} | "
                f"{t['qdq']:.2f} | {t['ort-int8']:.2f} | {t['shift-ort']:.2f} | {tvm_ms} | "
                f"{t['shift-ort'] / t['float']:.2f}x |"
            )
    lines += ["", "| model | rounding | integer layers | requantized codes differing from QDQ "
              "| max step | top-1 differs | float islands |", "|---|---|---|---|---|---|---|"]
    for row in data["rows"]:
        rules = [("half_even (default)", row["rounding"])]
        if "rounding_half_up" in row:
            rules.append(("half_up", row["rounding_half_up"]))
        for rule, r in rules:
            lines.append(
                f"| {row['model']} | {rule} | {row['integer_layers']}/{row['layers']} | "
                f"{r['differ_fraction']:.4%} of {r['requant_elements']} | "
                f"{r['max_step_diff']} | {r['top1_differ_fraction']:.1%} | "
                f"{'; '.join(row['islands']) or 'none'} |"
            )
    errors = [f"{row['model']}: {row['tvm_error']}" for row in data["rows"] if "tvm_error" in row]
    if errors:
        lines += ["", "TVM failed: " + "; ".join(errors)]
    return lines


def _digits_table(data: dict[str, Any]) -> list[str]:
    lines = ["", "Real data: scikit-learn `load_digits` (8x8 digits), a 2-conv CNN trained in "
             "this run, PotQuantize search='mse' calibrated on the training split, top-1 % on "
             "the held-out quarter (integer = the shift Program run by torch, default "
             "half-to-even rounding; integer-ort = the same on onnxruntime):", "",
             "| bits | test images | float | fake-quant (QDQ) | integer | integer-ort "
             "| integer, rounding=half_up | integer layers |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["digits"]:
        lines.append(
            f"| {r['bits']} | {r['test_images']} | {r['float_top1']:.2f} | "
            f"{r['qdq_top1']:.2f} | {r['integer_top1']:.2f} | {r['integer_ort_top1']:.2f} "
            f"| {_maybe(r.get('integer_half_up_top1'))} | {r['integer_layers']} |"
        )
    return lines


def _markdown(data: dict[str, Any]) -> str:
    lines = [
        "# QDQToShift: integer bit-shift graph vs float and QDQ",
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {data['machine']} ({load_text(data.get('load_average'))}: absolute "
        "figures are noisy on a shared 2-core machine, ratios taken in one run), "
        f"{data['date']}. onnxruntime with 1 intra-op thread; "
        "TVM untuned (`tvm.compile(target='llvm')`, no schedules). Models: W8A8, minmax "
        "exponents, random weights.",
    ]
    if data["rows"]:
        lines += _model_tables(data)
    if data.get("digits"):
        lines += _digits_table(data)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--tvm-repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-digits", action="store_true", help="skip the load_digits rows")
    parser.add_argument("--digits-only", action="store_true",
                        help="only the load_digits rows, written to results/shift_digits.*")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    data = header("shift.py", argv)
    data["rows"], data["digits"] = [], []
    start = load_average()
    data["load_average"] = {"start": start, "end": start}  # the end: after every step
    if args.digits_only:
        data["digits"] = digits_accuracy()
        write_results(args.out, "shift_digits", data, _markdown(data))
        return
    if not args.no_digits:  # cheapest first; results are written after every step
        data["digits"] = digits_accuracy()
        write_results(args.out, "shift", data, _markdown(data))
    for name in args.models.split(","):
        data["rows"].append(run_model(name, args.size, args.repeat, args.tvm_repeat))
        data["load_average"]["end"] = load_average()
        write_results(args.out, "shift", data, _markdown(data))


if __name__ == "__main__":
    main(sys.argv[1:])
