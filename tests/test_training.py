"""Program.trainable() / with_weights(): the graph trains like the eager model (BatchNorm on
batch statistics, gradients to every parameter, straight-through rounding on a quantized
Program) and goes back into a Program with the same graph, which lowers to ONNX and matches."""

from __future__ import annotations

import pytest
import torch
from prune_models import Couplings, randomize
from torch import nn

import edgefx
from edgefx import InputError
from edgefx.frontend import capture
from edgefx.ops.pot import qrange
from edgefx.passes import ChannelPrune, FoldBatchNorm, PassManager, PotQuantize
from edgefx.training import fake_quantize_pot


def inputs(n: int, seed: int, size: int = 16) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def couplings() -> edgefx.Program:
    torch.manual_seed(0)
    return capture(randomize(Couplings(), 1), (inputs(2, 0),))


@pytest.fixture(scope="module")
def pruned(couplings) -> edgefx.Program:
    return PassManager([ChannelPrune(macs=0.5)]).run(couplings)[0]


@pytest.fixture(scope="module")
def quantized(couplings) -> edgefx.Program:
    calib = [inputs(8, 1)]
    return PassManager(
        [FoldBatchNorm(), PotQuantize(calib, weight_bits=4, act_bits=4, search="mse")]
    ).run(couplings)[0]


def state(program: edgefx.Program) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in program.graph_module.state_dict().items()}


def sgd_step(module: nn.Module, x: torch.Tensor, lr: float = 0.05) -> None:
    module.train()
    out = module(x)
    loss = (out**2).mean()
    module.zero_grad()
    loss.backward()
    with torch.no_grad():
        for p in module.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def test_eval_mode_computes_what_the_program_computes(couplings, pruned, quantized):
    x = inputs(4, 2)
    for program in (couplings, pruned, quantized):
        module = program.trainable().eval()
        with torch.no_grad():
            assert torch.equal(module(x), program(x)), program.history


def test_batchnorm_statistics_update_in_train_mode_only(couplings):
    module = couplings.trainable()
    stats = {k: v.clone() for k, v in module.named_buffers() if "running_" in k}
    assert stats, "Couplings has BatchNorms"
    module.eval()
    with torch.no_grad():
        module(inputs(4, 3))
    assert all(torch.equal(module.get_buffer(k), v) for k, v in stats.items())
    module.train()
    with torch.no_grad():
        train_out = module(inputs(4, 3))
    changed = [k for k, v in stats.items() if not torch.equal(module.get_buffer(k), v)]
    assert sorted(changed) == sorted(stats)
    # in train mode BN normalises with the batch's statistics, not the running ones
    with torch.no_grad():
        assert not torch.allclose(train_out, couplings(inputs(4, 3)))


def test_gradients_reach_every_parameter_of_a_pruned_program(couplings, pruned):
    shrunk = {k: v.shape for k, v in pruned.graph_module.named_parameters()}
    full = dict(couplings.graph_module.named_parameters())
    assert any(full[k].shape != s for k, s in shrunk.items() if k in full), "pruning cut weights"
    module = pruned.trainable()
    params = dict(module.graph.named_parameters())
    assert {k: p.shape for k, p in params.items()} == shrunk
    module(inputs(4, 4)).square().mean().backward()
    for name, p in params.items():
        assert p.is_leaf and p.requires_grad, name
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_trainable_is_a_copy_and_the_program_is_untouched(couplings):
    before = state(couplings)
    module = couplings.trainable()
    sgd_step(module, inputs(4, 5))
    after = state(couplings)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(
        p.data_ptr() != q.data_ptr()
        for p in module.parameters()
        for q in couplings.graph_module.parameters()
    )


def test_trained_program_has_the_trained_values_and_lowers_to_onnx(couplings):
    module = couplings.trainable()
    sgd_step(module, inputs(8, 6))
    trained = couplings.with_weights(module, "trained")
    assert trained.graph_module.code == couplings.graph_module.code
    assert trained.history[-1] == "trained"
    x = inputs(3, 7)
    module.eval()
    with torch.no_grad():
        expected = module(x)
        assert torch.equal(trained(x), expected)
        assert not torch.allclose(trained(x), couplings(x))
    compiled = edgefx.compile(trained, backend="onnx", progress=False)
    assert torch.allclose(torch.as_tensor(compiled(x)), expected, atol=1e-4, rtol=1e-4)


def test_untrained_round_trip_is_exact(pruned, quantized):
    for program in (pruned, quantized):
        back = program.with_weights(program.trainable())
        assert all(torch.equal(v, state(back)[k]) for k, v in state(program).items())


def test_straight_through_estimator_passes_gradient_inside_the_range_only():
    exponent = torch.tensor(-2, dtype=torch.int32)  # scale 0.25, 4-bit signed: [-2, 1.75]
    x = torch.tensor([-3.0, -1.1, 0.0, 0.3, 1.6, 2.5], requires_grad=True)
    out = fake_quantize_pot(x, exponent, 1, 4, True)
    assert out.tolist() == [-2.0, -1.0, 0.0, 0.25, 1.5, 1.75]
    out.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]


def test_quantized_program_trains_its_weights_and_keeps_codes_on_the_grid(quantized):
    module = quantized.trainable()
    assert module.summary["quantized_weights"] > 0 and module.summary["fake_quantizers"] > 0
    weights = [q for q in module.quantized if q.bits != 32]
    assert weights and all(q.bits == 4 for q in weights)  # read from PotQuantize's history
    module(inputs(4, 8)).square().mean().backward()
    for q in module.quantized:
        grad = module.graph.get_parameter(q.parameter).grad
        assert grad is not None and grad.abs().sum() > 0, f"no gradient reaches {q.codes}"
    sgd_step(module, inputs(8, 9), lr=0.5)
    trained = quantized.with_weights(module)
    codes_changed = 0
    for q in module.quantized:
        codes = trained.graph_module.get_buffer(q.codes)
        assert codes.dtype == quantized.graph_module.get_buffer(q.codes).dtype
        if q.bits != 32:
            low, high = qrange(q.bits, q.signed)
            assert low <= int(codes.min()) and int(codes.max()) <= high
        codes_changed += not torch.equal(codes, quantized.graph_module.get_buffer(q.codes))
    assert codes_changed > 0
    x = inputs(3, 10)
    module.eval()
    with torch.no_grad():
        expected = module(x)
        assert torch.allclose(trained(x), expected, atol=1e-6, rtol=1e-6)
    compiled = edgefx.compile(trained, backend="onnx", progress=False)
    assert torch.allclose(torch.as_tensor(compiled(x)), expected, atol=1e-4, rtol=1e-4)


def test_with_weights_refuses_a_foreign_module(couplings, pruned):
    with pytest.raises(InputError, match=r"made by program\.trainable"):
        couplings.with_weights(nn.Linear(2, 2))
    with pytest.raises(InputError, match="different Program"):
        couplings.with_weights(pruned.trainable())
