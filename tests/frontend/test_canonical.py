"""Canonical forms applied at capture: attention over more than 4 dims becomes 4-D."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import edgefx
from edgefx.frontend import capture
from edgefx.passes.rewrite import module_path

SDPA = torch.ops.aten.scaled_dot_product_attention.default


class WindowAttention(nn.Module):
    """Twins-style attention on (batch, windows, heads, tokens, dim), optionally masked."""

    def __init__(self, mask: str | None = None) -> None:
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        # a mask that broadcasts over batch and heads: (windows, 1, tokens, tokens)
        self.bias = nn.Parameter(torch.randn(3, 1, 16, 16)) if mask else None
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, n, c = x.shape
        qkv = self.qkv(x).reshape(b, g, n, 3, 4, 8).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv.unbind(0)
        attend = nn.functional.scaled_dot_product_attention
        if self.mask == "keyword":
            y = attend(q, k, v, attn_mask=self.bias)
        elif self.mask == "positional":
            y = attend(q, k, v, self.bias)
        else:
            y = attend(q, k, v, scale=0.5)
        return y.transpose(2, 3).reshape(b, g, n, c)


@pytest.mark.parametrize("mask", [None, "keyword", "positional"])
def test_attention_over_five_dims_becomes_4d_and_stays_exact(mask):
    torch.manual_seed(0)
    model = WindowAttention(mask).eval()
    program = capture(model, (torch.randn(1, 3, 16, 32),))
    attention = [n for n in program.graph_module.graph.nodes if n.target is SDPA]
    assert len(attention) == 1
    assert attention[0].meta["val"].dim() == 4
    if mask is None:
        assert attention[0].kwargs.get("scale") == 0.5
    x = torch.randn(5, 3, 16, 32)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(program(x), expected, rtol=1e-5, atol=1e-5)


def test_flattened_attention_keeps_its_source_module():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = WindowAttention()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x)

    program = capture(Block().eval(), (torch.randn(1, 3, 16, 32),))
    (attention,) = [n for n in program.graph_module.graph.nodes if n.target is SDPA]
    assert module_path(attention) == "attn"


def test_five_dim_attention_compiles_to_onnx_with_dynamic_batch():
    torch.manual_seed(0)
    model = WindowAttention("keyword").eval()
    compiled = edgefx.compile(model, (torch.randn(1, 3, 16, 32),), backend="onnx", progress=False)
    x = torch.randn(4, 3, 16, 32)
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)


def test_four_dim_attention_is_left_alone():
    class Plain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(x, x, x)

    program = capture(Plain(), (torch.randn(1, 2, 5, 8),))
    ops = [n.target for n in program.graph_module.graph.nodes if n.op == "call_function"]
    assert ops == [SDPA]
