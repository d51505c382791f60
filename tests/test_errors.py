"""EdgefxError and its children: hierarchy, attributes and the text the CLI prints."""

from __future__ import annotations

import pytest

import edgefx
from edgefx.errors import (
    ArtifactError,
    BackendError,
    CaptureError,
    EdgefxError,
    InputError,
    ModelNotFoundError,
    PassError,
)

CHILDREN = [InputError, CaptureError, PassError, BackendError, ArtifactError, ModelNotFoundError]


@pytest.mark.parametrize("cls", CHILDREN, ids=lambda c: c.__name__)
def test_every_error_is_an_edgefx_error(cls):
    assert issubclass(cls, EdgefxError)
    assert issubclass(cls, Exception)
    with pytest.raises(EdgefxError):
        raise cls("boom")


@pytest.mark.parametrize("cls", [EdgefxError, *CHILDREN], ids=lambda c: c.__name__)
def test_errors_are_exported_from_the_package(cls):
    assert getattr(edgefx, cls.__name__) is cls
    assert cls.__name__ in edgefx.__all__


def test_siblings_are_distinct():
    """Catching one kind must not swallow another."""
    for cls in CHILDREN:
        others = tuple(c for c in CHILDREN if c is not cls)
        assert not issubclass(cls, others)


def test_str_is_the_message_then_labelled_fields():
    error = PassError(
        "it broke",
        node="conv2d_3",
        module="layer1.0.conv1",
        op="aten.conv2d",
        hint="do it differently",
    )
    assert str(error).splitlines() == [
        "it broke",
        "  node: conv2d_3",
        "  module: layer1.0.conv1",
        "  op: aten.conv2d",
        "  hint: do it differently",
    ]
    assert (error.message, error.node, error.module, error.op, error.hint) == (
        "it broke",
        "conv2d_3",
        "layer1.0.conv1",
        "aten.conv2d",
        "do it differently",
    )


def test_empty_fields_are_left_out():
    error = InputError("bad input", hint="pass a tensor")
    assert str(error) == "bad input\n  hint: pass a tensor"
    assert str(BackendError("plain")) == "plain"
    assert error.node is None and error.module is None and error.op is None


def test_args_hold_the_formatted_text():
    """``raise`` / logging / pytest show ``args[0]``: it must be the full text, fields included."""
    error = CaptureError("cannot capture", module="gate (Gate)", hint="use torch.where")
    assert error.args == (str(error),)
    assert "gate (Gate)" in error.args[0] and "torch.where" in error.args[0]


def test_fields_are_keyword_only():
    with pytest.raises(TypeError):
        EdgefxError("message", "node")  # type: ignore[misc]
