"""The prepacked oneDNN linear computes what F.linear computes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagedllm.engine.kernels import cpu_isa
from pagedllm.engine.kernels.prepacked_linear import pack_linears, prepacked_linear_available


@pytest.mark.skipif(not (prepacked_linear_available() and cpu_isa.plan_for().onednn_bf16),
                    reason="oneDNN's bf16 prepacking needs this torch build and an AVX-512 (or AMX) tier")
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_packed_linear_matches_f_linear(rows):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 160, bias=True), nn.Linear(160, 48, bias=False)).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    expected = F.linear(F.linear(x, model[0].weight, model[0].bias), model[1].weight)
    assert pack_linears(model, batch_hint=64)
    torch.testing.assert_close(model(x), expected, rtol=1e-2, atol=1e-2)


def test_float32_models_are_left_alone():
    model = nn.Sequential(nn.Linear(8, 8))
    assert not pack_linears(model, batch_hint=64)
    assert isinstance(model[0], nn.Linear)
