"""MoEConfig validation: every bad value names its field and what is allowed."""

import dataclasses

import pytest
import torch

from epmoe import MoEConfig, parse_dtype

BASE = dict(hidden_size=16, intermediate_size=32, num_experts=8)


def test_defaults_and_dtype_names():
    c = MoEConfig(**BASE)
    assert (c.top_k, c.scoring, c.renormalize, c.activation, c.placement) == (
        2, "softmax", True, "silu", "linear")
    assert c.dtype is torch.float32
    for name, dt in [("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
                     ("torch.float16", torch.float16), ("fp32", torch.float32)]:
        assert MoEConfig(**BASE, dtype=name).dtype is dt
    assert parse_dtype(torch.bfloat16) is torch.bfloat16


def test_frozen_and_replace_revalidates():
    c = MoEConfig(**BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.top_k = 3
    assert c.replace(top_k=3).top_k == 3 and c.top_k == 2
    with pytest.raises(ValueError, match="top_k"):
        c.replace(top_k=9)


@pytest.mark.parametrize("field,value,match", [
    ("hidden_size", 0, r"hidden_size must be a positive int"),
    ("intermediate_size", -4, r"intermediate_size must be a positive int"),
    ("num_experts", 2.0, r"num_experts must be a positive int"),
    ("top_k", True, r"top_k must be a positive int"),
    ("top_k", 9, r"top_k=9 must be <= num_experts=8 \(allowed: 1..8\)"),
    ("scoring", "relu", r"scoring must be one of \['softmax', 'sigmoid'\]"),
    ("activation", "relu",
     r"activation must be one of \['silu', 'gelu', 'clamped_swiglu', 'custom'\]"),
    ("router", "hf", r"router must be one of \['epmoe', 'given'\]"),
    ("n_group", 3, r"n_group=3 must divide num_experts=8; allowed: \[1, 2, 4, 8\]"),
    ("group_scoring", "mean", r"group_scoring must be one of \['top2_sum', 'max'\]"),
    ("routed_scaling_factor", 0, r"routed_scaling_factor must be a number > 0"),
    ("shared_intermediate_size", -1, r"shared_intermediate_size must be an int >= 0"),
    ("shared_expert_gate", True, r"shared_expert_gate=True needs a shared expert"),
    ("router_fp32", "yes", r"router_fp32 must be a bool"),
    ("placement", "random", r"placement must be one of \['linear', 'round_robin'\]"),
    ("renormalize", 1, r"renormalize must be a bool"),
    ("dtype", "int8", r"dtype must be one of torch.float32, torch.bfloat16, torch.float16"),
    ("dtype", torch.float64, r"MoEConfig.dtype must be one of"),
    ("nonfinite", "ignore", r"nonfinite must be one of \['raise', 'propagate'\]"),
    ("max_chunk_tokens", 0, r"max_chunk_tokens must be a positive int, got 0"),
    ("max_chunk_tokens", 1.5, r"max_chunk_tokens must be a positive int"),
    ("load_window", -1, r"load_window must be an int >= 0 \(0: no load statistics\)"),
])
def test_invalid_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**BASE, field: value})


def test_group_limits():
    ok = MoEConfig(**{**BASE, "n_group": 4, "topk_group": 2, "top_k": 4})
    assert ok.router_dtype is torch.float32
    with pytest.raises(ValueError, match=r"topk_group=5 must be <= n_group=4"):
        ok.replace(topk_group=5)
    with pytest.raises(ValueError, match=r"top_k=5 must be <= topk_group \* \(num_experts // "
                                         r"n_group\) = 4"):
        ok.replace(top_k=5)
    with pytest.raises(ValueError, match=r"'top2_sum' needs >= 2 experts per group"):
        ok.replace(n_group=8, topk_group=2, top_k=2)
    assert MoEConfig(**BASE, dtype="bf16", router_fp32=True).router_dtype is torch.float32


def test_num_experts_against_ep_size():
    c = MoEConfig(**{**BASE, "num_experts": 3, "top_k": 1})
    c.check_ep_size(3)
    with pytest.raises(ValueError, match=r"num_experts=3 must be >= ep_size=4"):
        c.check_ep_size(4)


def test_fingerprint_tells_configs_apart_and_names_the_differences():
    a, b = MoEConfig(**BASE), MoEConfig(**BASE, top_k=3, dtype="bf16")
    assert a.fingerprint() == MoEConfig(**BASE).fingerprint() != b.fingerprint()
    assert 0 <= a.fingerprint() < 2**63
    assert a.differences(b) == {"top_k": (2, 3), "dtype": (torch.float32, torch.bfloat16)}
