"""Why a quantized Program and its ONNX model can disagree: for each model, run the ONNX model
in onnxruntime at each graph-optimisation level (and with single optimisers disabled) with
every QuantizeLinear output exposed, and report the first quantizer whose integer codes differ
from the Program's, the float op feeding it, and the share of codes that differ.

    python benchmarks/qdq_mismatch.py --models resnet18:nofold,efficientnet_b0

``:nofold`` quantizes with ``PotQuantize(fold_batchnorm=False)``, leaving the BatchNorms as
float islands between dequantize and quantize (what the issue's first case did). Random
weights with randomised BatchNorm statistics, 64x64 random-normal inputs, search="mse".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from common import RESULTS, header, write_results

LEVELS = {
    "disable_all": (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, None),
    "basic": (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, None),
    "extended": (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, None),
    "all (edgefx default)": (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, None),
    "all - ConstantFolding": (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ["ConstantFolding"]),
    "all - ConvBNFusion": (ort.GraphOptimizationLevel.ORT_ENABLE_ALL, ["ConvBNFusion"]),
}


def run_model(spec: str) -> list[dict[str, Any]]:
    import torchvision

    import edgefx
    from edgefx.frontend import capture
    from edgefx.passes import PotQuantize

    name, _, variant = spec.partition(":")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.3)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    calib = [torch.randn(4, 3, 64, 64, generator=gen)]
    quantize = PotQuantize(calib, search="mse", fold_batchnorm=variant != "nofold")
    compiled = edgefx.compile(
        capture(model, (x,)), passes=[quantize], backend="onnx", tolerance=1.0, progress=False
    )
    model_proto = onnx.ModelProto()
    model_proto.CopyFrom(compiled.artifact.model)
    q_outputs = [n.output[0] for n in model_proto.graph.node if n.op_type == "QuantizeLinear"]
    for name_ in q_outputs:
        model_proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name_))
    seen: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            seen[n.name] = value = super().run_node(n)
            return value

    with torch.no_grad():
        Recorder(compiled.program.graph_module).run(x)
    q_nodes = [
        n
        for n in compiled.program.graph_module.graph.nodes
        if n.target is torch.ops.edgefx.quantize_pot.default
    ]
    reference = compiled.program.run_flat()[0]
    rows = []
    for label, (level, disabled) in LEVELS.items():
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.disable_quant_qdq", "1")
        options.graph_optimization_level = level
        session = ort.InferenceSession(
            model_proto.SerializeToString(),
            options,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=disabled,
        )
        outs = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        out = torch.from_numpy(outs[0])
        row = {
            "model": spec,
            "onnxruntime": label,
            "output_rel": float((out - reference).abs().max() / reference.abs().max()),
            "quantizers": len(q_nodes),
            "first_differing": None,
            "after_op": None,
            "share": 0.0,
            "identical_before": len(q_nodes),
        }
        for i, (node, codes) in enumerate(zip(q_nodes, outs[1:], strict=True)):
            diff = np.abs(seen[node.name].numpy().astype(np.int32) - codes.astype(np.int32))
            if diff.max() > 0:
                row.update(
                    first_differing=node.name,
                    after_op=str(node.args[0].target),
                    share=float((diff > 0).mean()),
                    identical_before=i,
                )
                break
        print(f"[qdq_mismatch] {row}", file=sys.stderr)
        rows.append(row)
    return rows


def render(data: dict[str, Any]) -> str:
    lines = [
        "# Where a quantized Program and onnxruntime part ways",
        "",
        f"Produced by `{data['command']}` on {data['machine']} ({data['date']}). Per model and "
        "onnxruntime setting: the output difference relative to the output scale, and the "
        "first quantizer (in graph order) whose codes differ from the Program's, the op "
        "feeding it and the share of its codes that differ.",
        "",
        "| model | onnxruntime | output rel. diff | first differing quantizer | after | share "
        "| identical before |",
        "|---|---|--:|---|---|--:|--:|",
    ]
    for r in data["rows"]:
        lines.append(
            f"| {r['model']} | {r['onnxruntime']} | {r['output_rel']:.3g} "
            f"| {r['first_differing'] or '-'} | {r['after_op'] or '-'} | {r['share']:.2g} "
            f"| {r['identical_before']} of {r['quantizers']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="resnet18:nofold,efficientnet_b0")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = [row for spec in args.models.split(",") for row in run_model(spec)]
    data = {**header("qdq_mismatch.py", argv), "rows": rows}
    write_results(args.out, "qdq_mismatch", data, render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
