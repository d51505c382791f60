"""The ``edgefx`` command line: compile, inspect, and list what is available.

edgefx compile resnet18 --backend onnx -o out/
edgefx compile timm:deit_tiny_patch16_224 -p fold-bn -p dce --dump-dir dump/ -o out/
edgefx inspect mobilenet_v2 --top 15 --svg mnv2.svg
edgefx diff before.pt2 after.pt2 | edgefx profile out/ --html profile.html
edgefx passes | edgefx models vit
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgefx.errors import ArtifactError, EdgefxError, PassError

# Tables stay readable when piped (rich would fall back to 80 columns); text is printed as is.
console = Console(markup=False, highlight=False, width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a shape: {text!r} (write e.g. 1,3,224,224)"
        ) from None
    if not shape or any(d < 1 for d in shape):
        raise argparse.ArgumentTypeError(f"not a shape: {text!r} (dims must be >= 1)")
    return shape


def parse_pass(spec: str):
    """``NAME`` or ``NAME:key=value,key=value`` -> a configured Pass instance. Values are Python
    literals (``0.5``, ``'mse'``, ``['fc', 'layer4']``), or else taken as text (``l1``); a
    comma inside brackets or quotes does not split; ``round-to`` is ``round_to``."""
    from edgefx.passes import PASSES

    name, _, arg_text = spec.partition(":")
    if name not in PASSES:
        raise PassError(f"unknown pass {name!r}", hint=f"available: {', '.join(sorted(PASSES))}")
    options = pass_options(PASSES[name])
    kwargs = {}
    for item in _split_options(arg_text):
        key, eq, value = item.partition("=")
        if not eq:
            raise PassError(f"pass option {item!r} is not key=value", hint=f"e.g. {name}:key=0.5")
        key = key.strip().replace("-", "_")
        if key not in options:
            raise PassError(
                f"unknown option {key!r} for pass {name}",
                hint=f"{name} takes {', '.join(options)} (see `edgefx passes`)",
            )
        try:
            kwargs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key] = value.strip()
    try:
        return PASSES[name](**kwargs)
    except TypeError as exc:
        raise PassError(f"bad options for pass {name}: {exc}") from None


def pass_options(cls: type) -> list[str]:
    """The keyword options a pass class takes (its constructor's parameters)."""
    parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
    kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return [p.name for p in parameters if p.kind not in kinds]


def _split_options(text: str) -> list[str]:
    """``text`` split at the commas outside brackets and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item.strip()]


def _resolve(args: argparse.Namespace):
    from edgefx.frontend.zoo import resolve_model

    return resolve_model(args.model, args.input_shape)


def cmd_compile(args: argparse.Namespace) -> int:
    import edgefx

    passes = [parse_pass(p) for p in args.passes]
    options = {"opset": args.opset} if args.opset is not None else {}
    if args.tune_trials:
        options.update(tune_trials=args.tune_trials, work_dir=args.tune_dir)
    if args.tune_rpc:
        options["rpc"] = {"tracker": args.tune_rpc, "key": args.tune_rpc_key}
    resolved = _resolve(args)
    compiled = edgefx.compile(
        resolved.model,
        resolved.example_inputs,
        passes=passes,
        backend=args.backend,
        target=args.target,
        dynamic_batch=not args.static_batch,
        dump_dir=args.dump_dir,
        tolerance=args.tolerance,
        backend_options=options,
    )
    console.print(compiled.report.table())
    specs = ", ".join(s.describe() for s in compiled.input_specs)
    console.print(f"inputs: {specs}")
    if args.dump_dir:
        from edgefx.tools.dump import INDEX

        index = Path(args.dump_dir) / INDEX
        if index.is_file():  # (edgefx.compile draws the stages: see edgefx/__init__.py)
            console.print(f"stages, pictures and diffs: {index}")
    if args.output:
        out = compiled.save(args.output)
        files = ", ".join(sorted(p.name for p in out.iterdir()))
        console.print(f"saved to {out}/ ({files}); run it with edgefx.load({str(out)!r})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgefx.tools import commands

    target = commands.load(args.model, args)
    program = target.program
    if commands.inspect(args, target, console):  # printed JSON: nothing may follow
        return 0
    if args.channels:
        from edgefx.analysis.depgraph import ChannelDependencyGraph
        from edgefx.tools.tables import channel_table

        if program is None:
            raise ArtifactError(f"--channels needs a Program; {target.name} is only ONNX")
        console.print(channel_table(ChannelDependencyGraph(program.graph_module)))
    if args.blocks:
        _print_blocks(target)
    return 0


def _print_blocks(target) -> None:
    """--blocks: the attention blocks TokenGate reads, and the tokens through them (the gates
    of a gated model, whose blocks TokenGate's analysis no longer reads)."""
    from edgefx.analysis.vit import analysis_batch, find_blocks
    from edgefx.errors import first_line
    from edgefx.tools.layers import block_tokens
    from edgefx.tools.tables import block_table, token_table

    program = target.program
    if program is None:
        raise ArtifactError(f"--blocks needs a Program; {target.name} is only ONNX")
    gate_passes = [entry for entry in program.history if entry.startswith("TokenGate")]
    batch = analysis_batch(program.example_inputs, program.dynamic_batch)
    try:
        console.print(block_table(find_blocks(program.graph_module, program.example_inputs, batch)))
    except Exception as exc:  # a gated graph: refused, or data-dependent token counts
        if not gate_passes:
            raise
        console.print(f"(TokenGate's block analysis does not read the gated graph: "
                      f"{first_line(exc)})")  # fmt: skip
    rows = block_tokens(target.graph())
    if gate_passes or any(row.gate for row in rows):
        console.print(token_table(rows, gate_passes))


def cmd_diff(args: argparse.Namespace) -> int:
    from edgefx.tools import commands

    return commands.diff(args, console)


def cmd_profile(args: argparse.Namespace) -> int:
    from edgefx.tools import commands

    return commands.profile(args, console)


def cmd_passes(_args: argparse.Namespace) -> int:
    from edgefx.passes import PASSES

    table = Table(title="edgefx passes (-p NAME:option=value,...)")
    for column in ("name", "class", "exact", "what it does", "options"):
        table.add_column(column)
    for name, cls in sorted(PASSES.items()):
        doc = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        options = ", ".join(pass_options(cls))
        table.add_row(name, cls.__name__, "yes" if cls.exact else "no", doc, options)
    console.print(table)
    return 0


def cmd_targets(_args: argparse.Namespace) -> int:
    from edgefx.backends.tvm.targets import PRESETS

    table = Table(title="edgefx TVM targets (--backend tvm --target NAME)")
    for column in ("name", "arch", "device", "what it is"):
        table.add_column(column)
    for preset in PRESETS.values():
        table.add_row(preset.name, preset.arch, preset.device, preset.description)
    console.print(table)
    console.print("From Python, a TVM target dict works too: target={'kind': 'llvm', ...}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np

    from edgefx.backends.tvm import runners

    if args.inputs:
        inputs = [np.load(path) for path in args.inputs]
    else:
        inputs = runners.inputs_for(args.directory, args.batch)
    if args.rpc:
        outputs = runners.run_rpc(args.directory, inputs, args.rpc, args.rpc_key)
    elif args.emulate:
        outputs = runners.run_emulated(args.directory, inputs)
    else:
        outputs = runners.run_local(args.directory, inputs)
    for i, y in enumerate(outputs):
        console.print(f"output {i}: {y.dtype}{list(y.shape)} mean {float(y.mean()):.6g}")
    if args.out:
        np.savez(args.out, *outputs)
        console.print(f"outputs written to {args.out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from edgefx.frontend.zoo import timm_names, torchvision_names

    names = [*torchvision_names(), *(f"timm:{n}" for n in timm_names())]
    shown = [n for n in names if args.filter in n]
    console.print("\n".join(shown) if shown else f"no model name contains {args.filter!r}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgefx", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--debug", action="store_true", help="show full Python tracebacks on errors"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "model",
            help="torchvision/timm name (timm:NAME), package.module:factory, or a .pt2 file",
        )
        p.add_argument(
            "--input-shape",
            type=parse_shape,
            default=None,
            help="example input shape, e.g. 1,3,224,224 (default: the model's own)",
        )
        p.add_argument(
            "--static-batch",
            action="store_true",
            help="capture with a fixed batch size instead of a dynamic one",
        )

    def picture_args(p: argparse.ArgumentParser, default_color: str = "macs") -> None:
        p.add_argument("--svg", metavar="FILE", default=None, help="draw the graph (graphviz)")
        p.add_argument(
            "--html", metavar="FILE", default=None, help="offline report: tables + picture"
        )
        p.add_argument(
            "--color",
            default=default_color,
            metavar="METRIC",
            help="colour boxes by macs, params, channels, tokens, quant-error or latency "
            f"(default {default_color})",
        )
        p.add_argument("--expand", action="store_true", help="draw repeated blocks one by one")
        p.add_argument(
            "--model-explorer",
            metavar="FILE",
            default=None,
            help="write per-node MACs (latency for profile) as Google Model Explorer node data",
        )

    p = sub.add_parser("compile", help="capture, run passes, lower to a backend, check, save")
    model_args(p)
    p.add_argument(
        "-p",
        "--pass",
        dest="passes",
        action="append",
        default=[],
        metavar="PASS",
        help="pass to run, in order; NAME or NAME:key=value,... (see `edgefx passes`)",
    )
    p.add_argument("--backend", default="onnx", help="onnx (default), tvm or torch")
    p.add_argument(
        "--target", default=None, help="TVM target preset (see `edgefx targets`); tvm only"
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 21)")
    p.add_argument(
        "--tune-trials", type=int, default=0, help="tvm: MetaSchedule trials (needs --static-batch)"
    )
    p.add_argument(
        "--tune-dir", default=None, help="tvm: tuning database folder, reused across builds"
    )
    p.add_argument(
        "--tune-rpc",
        default=None,
        metavar="HOST:PORT",
        help="tvm: measure the tuning candidates on a board, through this TVM RPC tracker",
    )
    p.add_argument(
        "--tune-rpc-key", default=None, help="tvm: the board's key with the --tune-rpc tracker"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="max backend error relative to the output scale (default 1e-4)",
    )
    p.add_argument(
        "--dump-dir",
        default=None,
        help="write the readable graph, picture and Program after every pass here, and an "
        "index.html walking through them",
    )
    p.add_argument(
        "-o", "--output", default=None, help="folder to save the artifact and manifest in"
    )
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser(
        "inspect", help="layers of a model, Program, ONNX file or compiled folder: MACs, params"
    )
    model_args(p)
    p.add_argument("--top", type=int, default=None, help="show only the N costliest rows")
    p.add_argument("--sort", choices=("graph", "macs", "params"), default="graph")
    p.add_argument(
        "--nodes", action="store_true", help="one row per graph node instead of per module"
    )
    p.add_argument(
        "--channels",
        action="store_true",
        help="also show the channel dependency graph: which channels ChannelPrune may remove",
    )
    p.add_argument(
        "--blocks",
        action="store_true",
        help="also show the transformer blocks TokenGate found (heads, tokens, prefix tokens)",
    )
    p.add_argument(
        "--quant",
        action="store_true",
        help="bits, exponents and weight SQNR of power-of-two quantized layers",
    )
    p.add_argument("--json", action="store_true", help="print the layers as JSON instead")
    picture_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "diff", help="what changed between two models: layers, channels, dtype, MACs, params"
    )
    p.add_argument("a", help="before: a model, .pt2, .onnx or compiled folder")
    p.add_argument("b", help="after: a model, .pt2, .onnx or compiled folder")
    p.add_argument("--input-shape", type=parse_shape, default=None, help="for model names")
    p.add_argument("--all", action="store_true", help="also list the unchanged layers")
    p.add_argument("--json", action="store_true", help="print the diff as JSON instead")
    picture_args(p)
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser(
        "profile",
        help="time every kernel of a compiled folder (onnxruntime's profiler, or TVM's VM "
        "instrument) and charge it to its source module",
    )
    p.add_argument(
        "target", help="a folder from `edgefx compile -o DIR` (ONNX or TVM), or an .onnx file"
    )
    p.add_argument("--runs", type=int, default=20, help="measured runs (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="runs dropped first (default 3)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime / TVM threads (default 1)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument(
        "--nodes", action="store_true", help="one row per ONNX node / TVM kernel call"
    )
    p.add_argument("--top", type=int, default=None, help="show only the N slowest rows")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead")
    picture_args(p, default_color="latency")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("passes", help="list the available passes")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("targets", help="list the TVM target presets")
    p.set_defaults(func=cmd_targets)

    p = sub.add_parser("run", help="run a saved TVM folder: here, over TVM RPC, or emulated")
    p.add_argument("directory", help="folder written by `edgefx compile --backend tvm -o DIR`")
    p.add_argument("--rpc", default=None, help="host:port of a TVM RPC server (or tracker)")
    p.add_argument("--rpc-key", default=None, help="device key when --rpc is a tracker")
    p.add_argument(
        "--emulate", action="store_true", help="run an aarch64 folder under qemu-user"
    )
    p.add_argument("--inputs", nargs="*", default=None, help=".npy files, one per input")
    p.add_argument("--batch", type=int, default=1, help="batch of the random inputs")
    p.add_argument("--out", default=None, help="write the outputs to this .npz file")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("models", help="list built-in model names (containing FILTER)")
    p.add_argument("filter", nargs="?", default="")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EdgefxError as exc:
        if args.debug:
            raise
        err_console.print(
            f"[bold red]error[/] ({type(exc).__name__}): {escape(str(exc))}",
            highlight=False,
            soft_wrap=True,
        )
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
