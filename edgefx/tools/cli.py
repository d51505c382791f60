"""The ``edgefx`` command line: compile, inspect, and list what is available.

edgefx compile resnet18 --backend onnx -o out/
edgefx compile timm:deit_tiny_patch16_224 -p fold-bn -p dce --dump-dir dump/ -o out/
edgefx inspect mobilenet_v2 --sort macs --top 15
edgefx passes | edgefx models vit
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgefx.errors import EdgefxError, PassError

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
    """``NAME`` or ``NAME:key=value,key=value`` -> a configured Pass instance."""
    from edgefx.passes import PASSES

    name, _, arg_text = spec.partition(":")
    if name not in PASSES:
        raise PassError(f"unknown pass {name!r}", hint=f"available: {', '.join(sorted(PASSES))}")
    kwargs = {}
    for item in filter(None, arg_text.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise PassError(f"pass option {item!r} is not key=value", hint=f"e.g. {name}:key=0.5")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    try:
        return PASSES[name](**kwargs)
    except TypeError as exc:
        raise PassError(f"bad options for pass {name}: {exc}") from None


def _resolve(args: argparse.Namespace):
    from edgefx.frontend.zoo import resolve_model

    return resolve_model(args.model, args.input_shape)


def cmd_compile(args: argparse.Namespace) -> int:
    import edgefx

    passes = [parse_pass(p) for p in args.passes]
    options = {"opset": args.opset} if args.opset is not None else {}
    resolved = _resolve(args)
    compiled = edgefx.compile(
        resolved.model,
        resolved.example_inputs,
        passes=passes,
        backend=args.backend,
        dynamic_batch=not args.static_batch,
        dump_dir=args.dump_dir,
        tolerance=args.tolerance,
        backend_options=options,
    )
    console.print(compiled.report.table())
    specs = ", ".join(s.describe() for s in compiled.input_specs)
    console.print(f"inputs: {specs}")
    if args.output:
        out = compiled.save(args.output)
        files = ", ".join(sorted(p.name for p in out.iterdir()))
        console.print(f"saved to {out}/ ({files}); run it with edgefx.load({str(out)!r})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from edgefx.frontend import capture
    from edgefx.program import Program
    from edgefx.tools.tables import cost_table

    resolved = _resolve(args)
    program = (
        resolved.model
        if isinstance(resolved.model, Program)
        else capture(
            resolved.model,
            resolved.example_inputs,
            dynamic_batch=not args.static_batch,
            name=resolved.name,
        )
    )
    console.print(program)
    console.print(cost_table(program.cost(), top=args.top, sort=args.sort))
    if args.channels:
        from edgefx.analysis.depgraph import ChannelDependencyGraph
        from edgefx.tools.tables import channel_table

        console.print(channel_table(ChannelDependencyGraph(program.graph_module)))
    if args.blocks:
        from edgefx.analysis.vit import analysis_batch, find_blocks
        from edgefx.tools.tables import block_table

        batch = analysis_batch(program.example_inputs, program.dynamic_batch)
        console.print(block_table(find_blocks(program.graph_module, program.example_inputs, batch)))
    return 0


def cmd_passes(_args: argparse.Namespace) -> int:
    from edgefx.passes import PASSES

    table = Table(title="edgefx passes")
    for column in ("name", "class", "exact", "what it does"):
        table.add_column(column)
    for name, cls in sorted(PASSES.items()):
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        table.add_row(name, cls.__name__, "yes" if cls.exact else "no", doc)
    console.print(table)
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
    p.add_argument("--backend", default="onnx", help="onnx (default) or torch")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 21)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="max backend error relative to the output scale (default 1e-4)",
    )
    p.add_argument(
        "--dump-dir", default=None, help="write the readable graph after every pass here"
    )
    p.add_argument(
        "-o", "--output", default=None, help="folder to save the artifact and manifest in"
    )
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("inspect", help="layer table: module, op, output shape, MACs, params, share")
    model_args(p)
    p.add_argument("--top", type=int, default=None, help="show only the N largest rows")
    p.add_argument("--sort", choices=("graph", "macs", "params"), default="graph")
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
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("passes", help="list the available passes")
    p.set_defaults(func=cmd_passes)

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
