"""Frontends: turn a user's model into a Program."""

from edgefx.frontend.capture import capture, normalize_inputs

__all__ = ["capture", "normalize_inputs"]
