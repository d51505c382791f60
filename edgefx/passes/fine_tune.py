"""FineTune: train a Program's weights on labelled data (after pruning, or QAT after
quantizing), keeping its graph.

The Program is trained through :func:`edgefx.training.trainable` (BatchNorm on batch
statistics, straight-through rounding for PotQuantize's quantizers) and written back with
``program.with_weights``: same graph, new values, nothing re-captured.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch.optim.swa_utils import AveragedModel
from torch.utils import _pytree as pytree

from edgefx.errors import EdgefxError, PassError
from edgefx.passes.base import Pass
from edgefx.program import Program

_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
}
_OPTIMIZERS = ("adam", "adamw", "sgd")
_SCHEDULES = ("cosine", "constant")


class FineTune(Pass):
    """Train the Program's weights on labelled batches (QAT on a quantized Program).

    Args:
        data: the training data: a DataLoader or any re-iterable collection (e.g. a list) of
            ``(inputs..., target)`` batches; read once per epoch.
        epochs: passes over ``data``.
        lr: the learning rate (cosine-annealed to 0 over the run by default).
        loss: ``"cross_entropy"`` (default), ``"mse"``, or a callable ``loss(output, target)``
            returning a scalar tensor (``output`` is the model's output as it returns it).
        optimizer: ``"adam"`` (default), ``"adamw"``, ``"sgd"`` (momentum 0.9), or a callable
            taking the parameters and returning a ``torch.optim.Optimizer``.
        weight_decay: passed to the optimizer.
        schedule: ``"cosine"`` (default) or ``"constant"`` learning rate.
        weight_bits: the width of PotQuantize's weight codes (default: read from the history).
        average_last: average the weights over the last this many epochs (SWA-style, Izmailov
            et al. 2018): after every optimizer step of those epochs the parameters join a
            running mean (``torch.optim.swa_utils.AveragedModel``), which the trained Program
            holds in the end. Buffers (BatchNorm running statistics) stay those of the last
            step. 0 (default) keeps the last step's weights.
        progress: show a progress bar (default: when stderr is a terminal).
    """

    name = "FineTune"

    def __init__(
        self,
        data: Iterable[Any] | None = None,
        *,
        epochs: int = 1,
        lr: float = 1e-3,
        loss: str | Callable[[Any, torch.Tensor], torch.Tensor] = "cross_entropy",
        optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
        weight_decay: float = 0.0,
        schedule: str = "cosine",
        weight_bits: int | None = None,
        average_last: int = 0,
        progress: bool | None = None,
    ) -> None:
        if data is None:
            raise PassError(
                "FineTune needs training data",
                hint="FineTune(loader, epochs=3) with a DataLoader of (inputs, target) batches; "
                "from Python only (the CLI has no data to give it)",
            )
        if isinstance(data, torch.Tensor) or not isinstance(data, Iterable):
            raise PassError(
                f"data must be a DataLoader or a list of (inputs, target) batches, got "
                f"{type(data).__name__}",
                hint="e.g. FineTune(DataLoader(TensorDataset(x, y), batch_size=32))",
            )
        if iter(data) is data:
            raise PassError(
                "data is a one-shot iterator, but FineTune reads it once per epoch (and to "
                "measure the loss before and after)",
                hint="pass a DataLoader or a list of batches",
            )
        if not (isinstance(epochs, int) and epochs >= 1):
            raise PassError(f"epochs must be a positive integer, got {epochs!r}")
        if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
            raise PassError(f"lr must be a positive number, got {lr!r}", hint="e.g. lr=1e-3")
        if not ((isinstance(loss, str) and loss in _LOSSES) or callable(loss)):
            raise PassError(
                f"loss must be one of {', '.join(_LOSSES)} or a callable, got {loss!r}",
                hint="e.g. loss=torch.nn.functional.cross_entropy",
            )
        if not ((isinstance(optimizer, str) and optimizer in _OPTIMIZERS) or callable(optimizer)):
            raise PassError(
                f"optimizer must be one of {', '.join(_OPTIMIZERS)} or a callable, got "
                f"{optimizer!r}",
                hint="e.g. optimizer=lambda params: torch.optim.SGD(params, lr=0.01)",
            )
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise PassError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
        if schedule not in _SCHEDULES:
            raise PassError(f"schedule must be one of {', '.join(_SCHEDULES)}, got {schedule!r}")
        if not (
            isinstance(average_last, int)
            and not isinstance(average_last, bool)
            and 0 <= average_last <= epochs
        ):
            raise PassError(
                f"average_last must be a whole number of epochs in [0, epochs={epochs}], got "
                f"{average_last!r}",
                hint="e.g. FineTune(loader, epochs=20, average_last=5); 0 keeps the last weights",
            )
        self.data = data
        self.epochs = epochs
        self.lr = float(lr)
        self.loss = loss
        self.optimizer = optimizer
        self.weight_decay = float(weight_decay)
        self.schedule = schedule
        self.weight_bits = weight_bits
        self.average_last = average_last
        self.progress = progress

    def __repr__(self) -> str:
        loss = self.loss if isinstance(self.loss, str) else getattr(self.loss, "__name__", "fn")
        opt = (
            self.optimizer
            if isinstance(self.optimizer, str)
            else getattr(self.optimizer, "__name__", "fn")
        )
        return (
            f"FineTune(epochs={self.epochs}, lr={self.lr:g}, loss={loss!r}, optimizer={opt!r}, "
            f"weight_decay={self.weight_decay:g}, schedule={self.schedule!r}"
            + (f", average_last={self.average_last}" if self.average_last else "")
            + ")"
        )

    # ------------------------------------------------------------------ the pass
    def run(self, program: Program) -> tuple[Program, dict[str, Any]]:
        module = program.trainable(weight_bits=self.weight_bits)
        report = self.fit(module, program)
        return program.with_weights(module, repr(self)), report

    def fit(
        self,
        module: torch.nn.Module,
        program: Program,
        *,
        extra_loss: Callable[[], torch.Tensor] | None = None,
        extra_params: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        """Train ``module`` (made by ``program.trainable()``, possibly rewritten further) in
        place and return the report; ``module`` is left in eval mode.

        ``extra_loss()``, called after each forward pass, is added to the task loss (TokenGate
        adds its MACs term, read off the gates of that pass). ``extra_params`` are optimizer
        parameter groups (dicts with ``params`` and their own ``lr``) trained beside the
        weights; the learning-rate schedule scales every group alike."""
        params = [p for p in module.parameters() if p.requires_grad]
        extra = {id(p) for group in extra_params or [] for p in group["params"]}
        params = [p for p in params if id(p) not in extra]
        if not params:
            raise PassError(
                f"{program.name} has no trainable parameters",
                hint="FineTune trains float weights (or PotQuantize's codes, as QAT)",
            )
        n_inputs = len(program.input_specs)
        loss_fn = _LOSSES[self.loss] if isinstance(self.loss, str) else self.loss
        start = time.perf_counter()
        # the loss before training, which also checks every batch against the input specs
        loss_before, steps_per_epoch = self._mean_loss(module, loss_fn, n_inputs, program)
        optimizer = self._optimizer(params)
        for group in extra_params or []:
            optimizer.add_param_group(dict(group))
        total = steps_per_epoch * self.epochs
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
            if self.schedule == "cosine"
            else None
        )
        epoch_losses: list[float] = []
        # the running mean of the weights over the last epochs (also of extra_params')
        averaged = AveragedModel(module) if self.average_last else None
        first_averaged = self.epochs - self.average_last
        console = Console(stderr=True)
        show = console.is_terminal if self.progress is None else self.progress
        with Progress(
            TextColumn("FineTune epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not show,
            transient=True,
        ) as bar:
            task = bar.add_task("train", total=total, epoch=f"1/{self.epochs}", loss="-")
            for epoch in range(self.epochs):
                module.train()
                total_loss, seen = 0.0, 0
                for index, batch in enumerate(self.data):
                    inputs, target = self._split(batch, index, n_inputs)
                    loss = self._loss(loss_fn, module(*inputs), target, index)
                    if extra_loss is not None:
                        loss = loss + extra_loss()
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise PassError(
                            f"the training loss is {value} at epoch {epoch + 1}, batch {index}",
                            hint=f"lower the learning rate (lr={self.lr:g})",
                        )
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    if scheduler is not None and scheduler.last_epoch < total:
                        scheduler.step()
                    if averaged is not None and epoch >= first_averaged:
                        averaged.update_parameters(module)
                    size = int(inputs[0].shape[0])
                    total_loss += value * size
                    seen += size
                    bar.update(
                        task,
                        advance=1,
                        epoch=f"{epoch + 1}/{self.epochs}",
                        loss=f"{total_loss / seen:.4f}",
                    )
                epoch_losses.append(total_loss / max(seen, 1))
        if averaged is not None:
            with torch.no_grad():
                for param, mean in zip(
                    module.parameters(), averaged.module.parameters(), strict=True
                ):
                    param.copy_(mean)
        train_s = time.perf_counter() - start
        loss_after, _ = self._mean_loss(module, loss_fn, n_inputs)
        module.eval()
        report = {
            "epochs": self.epochs,
            "batches_per_epoch": steps_per_epoch,
            "loss_before": loss_before,
            "loss_after": loss_after,
            "epoch_train_loss": [round(v, 6) for v in epoch_losses],
            "averaged_steps": int(averaged.n_averaged) if averaged is not None else 0,
            "train_s": round(train_s, 3),
            "trainable": getattr(module, "summary", {}),
        }
        return report

    def _optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if callable(self.optimizer):
            optimizer = self.optimizer(params)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise PassError(
                    f"optimizer(params) returned a {type(optimizer).__name__}, not a "
                    "torch.optim.Optimizer",
                    hint="e.g. optimizer=lambda params: torch.optim.SGD(params, lr=0.01)",
                )
            return optimizer
        if self.optimizer == "sgd":
            return torch.optim.SGD(
                params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay, nesterov=True
            )
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)

    @staticmethod
    def _split(batch: Any, index: int, n_inputs: int) -> tuple[tuple[torch.Tensor, ...], Any]:
        if not isinstance(batch, (tuple, list)) or len(batch) != n_inputs + 1:
            what = (
                f"a {type(batch).__name__} of {len(batch)}"
                if isinstance(batch, (tuple, list))
                else f"a {type(batch).__name__}"
            )
            raise PassError(
                f"FineTune data batch {index} is {what}; it needs {n_inputs} input(s) and a target",
                hint="yield (inputs..., target) tuples, e.g. a DataLoader of TensorDataset(x, y)",
            )
        return tuple(batch[:n_inputs]), batch[n_inputs]

    @staticmethod
    def _loss(
        loss_fn, output: Any, target: Any, index: int, need_grad: bool = True
    ) -> torch.Tensor:
        try:
            loss = loss_fn(output, target)
        except Exception as exc:
            shapes = [list(t.shape) for t in pytree.tree_leaves(output)]
            raise PassError(
                f"the loss failed on batch {index}: {type(exc).__name__}: {exc}",
                hint=f"the model's output shapes are {shapes}; target "
                f"{getattr(target, 'dtype', type(target).__name__)}"
                f"{list(getattr(target, 'shape', []))}",
            ) from exc
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = list(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise PassError(
                f"the loss must be a scalar tensor, got {shape} on batch {index}",
                hint="reduce it, e.g. a mean over the batch",
            )
        if need_grad and not loss.requires_grad:
            raise PassError(
                "the loss does not depend on the trainable parameters (no gradient)",
                hint="compute it from the model's output",
            )
        return loss

    def _mean_loss(
        self, module: torch.nn.Module, loss_fn, n_inputs: int, program: Program | None = None
    ) -> tuple[float, int]:
        """The mean loss over ``data`` in eval mode (what the Program computes) and the number
        of batches; with ``program``, every batch's inputs are checked against its specs."""
        module.eval()
        total, seen, count = 0.0, 0, 0
        with torch.no_grad():
            for index, batch in enumerate(self.data):
                inputs, target = self._split(batch, index, n_inputs)
                if program is not None:
                    try:
                        program.check_inputs(inputs)
                    except EdgefxError as exc:
                        raise PassError(
                            f"FineTune data batch {index} does not fit {program.name}: "
                            f"{exc.message}",
                            hint="batches are (inputs..., target); " + (exc.hint or "").strip(),
                        ) from exc
                loss = self._loss(loss_fn, module(*inputs), target, index, need_grad=False)
                size = int(inputs[0].shape[0])
                total += float(loss) * size
                seen += size
                count += 1
        if count == 0:
            raise PassError("FineTune data holds no batches", hint="is the DataLoader empty?")
        return total / seen, count
