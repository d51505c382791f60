"""The errors edgefx raises.

Every error names what it is about (a node, a module, an input, a pass), says what went wrong
in a line or two and gives a hint. The CLI prints ``str(error)`` and nothing else, so the text
must stand on its own.
"""

from __future__ import annotations


class EdgefxError(Exception):
    """Base class of every error edgefx raises on purpose."""

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        module: str | None = None,
        op: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.message = message
        self.node = node
        self.module = module
        self.op = op
        self.hint = hint
        super().__init__(self._format())

    def _format(self) -> str:
        lines = [self.message]
        for label, value in (("node", self.node), ("module", self.module), ("op", self.op)):
            if value:
                lines.append(f"  {label}: {value}")
        if self.hint:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none), for reports."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class InputError(EdgefxError):
    """Example inputs or call arguments of the wrong type, rank, shape or dtype."""


class CaptureError(EdgefxError):
    """torch.export could not capture the model."""


class PassError(EdgefxError):
    """A pass was misconfigured, refused the graph, or broke a promise it made (e.g. exactness)."""


class BackendError(EdgefxError):
    """Unknown backend, failed lowering, or a lowered model that disagrees with its Program."""


class ArtifactError(EdgefxError):
    """A saved Program or compiled artifact is missing, corrupt or from an incompatible version."""


class ModelNotFoundError(EdgefxError):
    """A model name given on the command line resolves to nothing."""
