"""Resolve a model name given on the command line into a model and example inputs.

MODEL is one of
- a torchvision classification architecture (``resnet18``) or ``torchvision:NAME``,
- a timm architecture (``timm:deit_small_patch16_224``, or the bare name if torchvision has none),
- ``package.module:factory``: a callable returning an ``nn.Module`` or ``(module, example_inputs)``,
- a ``.pt2`` file written by ``Program.save`` or ``torch.export.save``.
Weights are random (seeded): nothing is downloaded.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from edgefx.errors import ModelNotFoundError
from edgefx.program import Program

DEFAULT_INPUT = (1, 3, 224, 224)
SEED = 0


@dataclass
class ResolvedModel:
    name: str
    model: torch.nn.Module | Program
    example_inputs: tuple[torch.Tensor, ...] | None  # None for a Program: it carries its own


@cache
def torchvision_names() -> tuple[str, ...]:
    try:
        import torchvision
    except ImportError:
        return ()
    return tuple(torchvision.models.list_models(module=torchvision.models))


@cache
def timm_names() -> tuple[str, ...]:
    try:
        import timm
    except ImportError:
        return ()
    return tuple(timm.list_models())


def _example(shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(SEED)
    return (torch.randn(shape, generator=generator),)


def _torchvision(name: str, input_shape: tuple[int, ...] | None) -> ResolvedModel:
    import torchvision

    torch.manual_seed(SEED)
    model = torchvision.models.get_model(name, weights=None).eval()
    return ResolvedModel(name, model, _example(input_shape or DEFAULT_INPUT))


def _timm(name: str, input_shape: tuple[int, ...] | None) -> ResolvedModel:
    import timm

    torch.manual_seed(SEED)
    model = timm.create_model(name, pretrained=False).eval()
    default = (1, *model.pretrained_cfg.get("input_size", DEFAULT_INPUT[1:]))
    return ResolvedModel(f"timm:{name}", model, _example(input_shape or default))


def _factory(spec: str, input_shape: tuple[int, ...] | None) -> ResolvedModel:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelNotFoundError(
            f"cannot import {spec}: {exc}",
            hint="MODEL must be 'package.module:factory' on sys.path",
        ) from None
    made = factory()
    model, inputs = made if isinstance(made, tuple) else (made, None)
    if not isinstance(model, torch.nn.Module):
        raise ModelNotFoundError(
            f"{spec} returned {type(model).__name__}, not an nn.Module",
            hint="the factory returns a module, or (module, example_inputs)",
        )
    if input_shape is not None or inputs is None:
        inputs = _example(input_shape or DEFAULT_INPUT)
    elif isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    return ResolvedModel(attr, model, tuple(inputs))


def resolve_model(spec: str, input_shape: tuple[int, ...] | None = None) -> ResolvedModel:
    """Turn a MODEL string into a model (or Program) and example inputs."""
    if spec.endswith(".pt2"):
        if not Path(spec).is_file():
            raise ModelNotFoundError(f"no such file: {spec}")
        if input_shape is not None:
            raise ModelNotFoundError(
                "--input-shape does not apply to a saved .pt2 program",
                hint="a saved program carries its own example inputs",
            )
        return ResolvedModel(Path(spec).stem, Program.load(spec), None)
    source, _, name = spec.partition(":") if ":" in spec else ("", "", spec)
    if source == "timm":
        if name not in timm_names():
            _not_found(name, timm_names(), "timm")
        return _timm(name, input_shape)
    if source == "torchvision":
        if name not in torchvision_names():
            _not_found(name, torchvision_names(), "torchvision")
        return _torchvision(name, input_shape)
    if source:
        return _factory(spec, input_shape)
    if spec in torchvision_names():
        return _torchvision(spec, input_shape)
    if spec in timm_names():
        return _timm(spec, input_shape)
    _not_found(spec, torchvision_names() + timm_names(), "torchvision or timm")
    raise AssertionError("unreachable")


def _not_found(name: str, known: tuple[str, ...], where: str) -> None:
    close = difflib.get_close_matches(name, tuple(dict.fromkeys(known)), n=3)
    hint = (
        f"did you mean {', '.join(close)}?"
        if close
        else ("use a torchvision/timm architecture name, package.module:factory, or a .pt2 file")
    )
    raise ModelNotFoundError(f"unknown model {name!r} in {where}", hint=hint)
