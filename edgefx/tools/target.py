"""What ``edgefx inspect / diff / profile`` look at: a TARGET string made into a Target.

TARGET is any of
- a model name or ``package.module:factory`` (captured here, see ``edgefx.frontend.zoo``),
- a saved Program (``.pt2``),
- an ONNX file (``.onnx``; node modules read from an ``onnx_nodes.json`` beside it, if any),
- a compiled folder written by ``Compiled.save`` (its ``manifest.json`` says what is in it:
  the Program it was lowered from, the backend's artifact, the compile report). A backend
  whose artifact edgefx cannot read here (e.g. a TVM library) is still inspected through the
  folder's ``program.pt2``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefx.errors import ArtifactError
from edgefx.program import Program
from edgefx.tools.layers import LayerGraph, onnx_graph, program_graph

MANIFEST = "manifest.json"  # the names Compiled.save writes (edgefx.compiler)
NODE_MAP_FILE = "onnx_nodes.json"


@dataclass
class Target:
    """A Program and/or a lowered model, and what is known about how it was made."""

    name: str
    program: Program | None = None
    onnx_path: Path | None = None
    node_map: dict[str, dict[str, str]] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None
    _onnx: Any = None
    _graph: LayerGraph | None = None

    @property
    def onnx_model(self) -> Any:
        if self._onnx is None and self.onnx_path is not None:
            self._onnx = load_onnx(self.onnx_path)
        return self._onnx

    def graph(self) -> LayerGraph:
        """The layers: from the Program when there is one (it has the source modules, shapes
        and MACs by the cost analysis), else from the ONNX model."""
        if self._graph is None:
            if self.program is not None:
                self._graph = program_graph(self.program)
            elif self.onnx_path is not None:
                self._graph = onnx_graph(self.onnx_model, self.node_map, name=self.name)
            else:  # pragma: no cover - load_target never builds one
                raise ArtifactError(f"{self.name}: nothing to inspect")
        return self._graph

    def onnx_layers(self) -> LayerGraph:
        """The layers of the lowered ONNX model itself (for diffs across formats)."""
        if self.onnx_path is None:
            raise ArtifactError(f"{self.name} has no ONNX model")
        return onnx_graph(self.onnx_model, self.node_map, name=self.name)

    def pass_reports(self) -> list[dict[str, Any]]:
        """The compile report's per-pass entries, if a manifest recorded them."""
        report = self.manifest.get("report") or {}
        return list(report.get("passes") or [])


def load_onnx(path: Path) -> Any:
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as exc:  # protobuf DecodeError, ValidationError, OSError, ...
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(
            f"cannot read ONNX model {path}: {text}",
            hint="the file must be an ONNX model (e.g. model.onnx from `edgefx compile -o`)",
        ) from None
    return model


def _node_map_beside(path: Path) -> dict[str, dict[str, str]]:
    candidate = path.parent / NODE_MAP_FILE
    if candidate.is_file():
        try:
            return json.loads(candidate.read_text())
        except ValueError as exc:
            raise ArtifactError(f"{candidate} is not valid JSON: {exc}") from None
    return {}


def load_folder(folder: Path) -> Target:
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{folder} is a folder without {MANIFEST}",
            hint="pass a folder written by `edgefx compile -o DIR` / Compiled.save",
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except ValueError as exc:
        raise ArtifactError(f"{manifest_path} is not valid JSON: {exc}") from None
    target = Target(name=folder.name, manifest=manifest, folder=folder)
    artifact = manifest.get("artifact")
    if artifact and str(artifact).endswith(".onnx"):
        target.onnx_path = folder / artifact
        node_map = folder / manifest.get("node_map", NODE_MAP_FILE)
        target.node_map = json.loads(node_map.read_text()) if node_map.is_file() else {}
    program_file = manifest.get("program")
    if program_file and (folder / program_file).is_file():
        target.program = Program.load(folder / program_file)
        target.name = target.program.name
    if target.program is None and target.onnx_path is None:
        raise ArtifactError(
            f"{folder}: the {manifest.get('backend', '?')} artifact has no program.pt2 or "
            "ONNX model beside it to inspect",
            hint="compile with Compiled.save(dir) (include_program=True, the default)",
        )
    return target


def load_target(spec: str, input_shape: tuple[int, ...] | None = None, **capture_options) -> Target:
    """Turn a TARGET string into a Target (capturing a named model)."""
    path = Path(spec)
    if spec.endswith(".onnx"):
        if not path.is_file():
            raise ArtifactError(f"no such ONNX file: {spec}")
        return Target(name=path.stem, onnx_path=path, node_map=_node_map_beside(path))
    if path.is_dir():
        return load_folder(path)
    from edgefx.frontend import capture
    from edgefx.frontend.zoo import resolve_model

    resolved = resolve_model(spec, input_shape)
    if isinstance(resolved.model, Program):
        return Target(name=resolved.model.name, program=resolved.model)
    program = capture(
        resolved.model, resolved.example_inputs, name=resolved.name, **capture_options
    )
    return Target(name=resolved.name, program=program)
