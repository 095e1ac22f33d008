"""Quantized experts: FP8 block-scaled and MXFP4 weights kept in their stored format.

Hand-worked dequantizations, bit equality with transformers' own dequantization,
the memory of a quantized stack, the quantized expert compute against the plain
loop, and tiny checkpoints in the published layouts that transformers loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from quant_checkpoints import dequantized_state, save_fp8_checkpoint, save_mxfp4_checkpoint
from safetensors.torch import load_file, save_file

from epmoe.config import MoEConfig
from epmoe.experts import ExpertWeights, gated_activation, local_experts_forward
from epmoe.experts_quant import quantized_experts_forward
from epmoe.quant import (
    FP8_DTYPE,
    QuantFormat,
    QuantizedExperts,
    dequant_fp8_blocks,
    dequant_mxfp4,
    is_quantized_module,
    quant_format_of,
    quantize_fp8_blocks,
    quantize_mxfp4,
)

FP8_16 = QuantFormat("fp8", (16, 16))
MXFP4 = QuantFormat("mxfp4", (1, 32))


# --------------------------------------------------------------------------- by hand


def test_mxfp4_by_hand():
    # byte 0x21: low nibble 1 -> +0.5 first, high nibble 2 -> +1.0 second; 0xF8: -0.0, -6.0;
    # 0x7A: -1.0, +6.0. Scale bytes 127 -> 2**0, 129 -> 2**2, 125 -> 2**-2.
    blocks = torch.zeros(3, 1, 16, dtype=torch.uint8)
    blocks[:, 0, 0] = torch.tensor([0x21, 0xF8, 0x7A])
    scales = torch.tensor([[127], [129], [125]], dtype=torch.uint8)
    out = dequant_mxfp4(blocks, scales, torch.float32)  # [3, 32]
    assert out.shape == (3, 32)
    assert out[:, :2].tolist() == [[0.5, 1.0], [-0.0, -24.0], [-0.25, 1.5]]
    assert out[:, 2:].eq(0).all()
    # every nibble: the e2m1 table
    every = torch.arange(16, dtype=torch.uint8) | (torch.arange(16, dtype=torch.uint8) << 4)
    table = dequant_mxfp4(every.view(1, 16), torch.tensor([127], dtype=torch.uint8),
                          torch.float32)[0::2]
    assert table.tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]


def test_fp8_block_by_hand():
    # A 3x3 weight in 2x2 blocks: scale grid 2x2, the last row and column blocks partial.
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]]).to(FP8_DTYPE)
    s = torch.tensor([[0.5, 2.0], [10.0, 0.25]])
    got = dequant_fp8_blocks(w, s, (2, 2), torch.float32)
    assert got.tolist() == [[0.5, 1.0, 6.0], [2.0, 2.5, 12.0], [70.0, 80.0, 2.25]]
    # e8m0 scale bytes mean 2 ** (byte - 127)
    e8 = torch.tensor([[126, 128], [127, 130]], dtype=torch.uint8)
    assert dequant_fp8_blocks(w, e8, (2, 2), torch.float32)[:, 2].tolist() == [6.0, 12.0, 72.0]


def test_quantize_roundtrip_close():
    torch.manual_seed(0)
    w = torch.randn(40, 50)
    q, s = quantize_fp8_blocks(w, (16, 16))
    assert q.dtype == FP8_DTYPE and s.shape == (3, 4)
    assert torch.allclose(dequant_fp8_blocks(q, s, (16, 16), torch.float32), w, rtol=0.07,
                          atol=1e-6)  # e4m3: 3 mantissa bits
    b, sc = quantize_mxfp4(w[:, :32])
    back = dequant_mxfp4(b, sc, torch.float32)
    amax = w[:, :32].abs().amax(1, keepdim=True)
    assert ((back - w[:, :32]).abs() <= amax / 3).all()  # half of e2m1's top step, 2 * 2**e


# --------------------------------------------------------------------------- transformers' bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_same_bits_as_transformers(dtype):
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    torch.manual_seed(1)
    for (R, C), block in [((64, 48), (16, 16)), ((256, 384), (128, 128))]:
        q, s = quantize_fp8_blocks(torch.randn(R, C), block)
        ours = dequant_fp8_blocks(q, s, block, dtype)
        assert torch.equal(ours, Fp8Dequantize(None)._dequantize_one(q, s, dtype))
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F].view(FP8_DTYPE).view(2, 127)  # every non-NaN e4m3
    s = torch.tensor([[0.37], [3e-5]])
    assert torch.equal(dequant_fp8_blocks(codes, s, (1, 127), dtype),
                       Fp8Dequantize(None)._dequantize_one(codes, s, dtype))
    # Partial blocks: transformers' load-time dequantization cannot (it derives the block
    # from R // grid rows); its backward-pass one can, and agrees in fp32 (one rounding).
    q, s = quantize_fp8_blocks(torch.randn(40, 50), (16, 16))
    assert torch.equal(dequant_fp8_blocks(q, s, (16, 16), torch.float32),
                       _dequantize_fp8_weight(q, s, [16, 16], torch.float32))
    with pytest.raises(ValueError, match="not divisible"):
        Fp8Dequantize(None)._dequantize_one(q, s, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_mxfp4_same_bits_as_transformers(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), dtype=torch.uint8, generator=gen)
    scales = torch.randint(0, 255, (3, 10, 4), dtype=torch.uint8, generator=gen)  # (255: NaN)
    # transformers returns [E, G*32, rows] (transposed for x @ W); ours keeps [E, rows, G*32]
    ref = convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)
    assert torch.equal(dequant_mxfp4(blocks, scales, dtype), ref)


# --------------------------------------------------------------------------- formats


def test_quant_format_of():
    fp8 = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
           "weight_block_size": [128, 128]}
    assert quant_format_of(type("C", (), {"quantization_config": fp8})()) == \
        QuantFormat("fp8", (128, 128))
    assert quant_format_of(type("C", (), {})()) is None
    from transformers import FineGrainedFP8Config, Mxfp4Config

    obj = type("C", (), {"quantization_config": FineGrainedFP8Config(
        weight_block_size=(16, 16), modules_to_not_convert=["model.layers.0"])})()
    assert quant_format_of(obj) == QuantFormat("fp8", (16, 16), ("model.layers.0",))
    assert quant_format_of(type("C", (), {"quantization_config": Mxfp4Config()})()).method \
        == "mxfp4"
    bad = [({"quant_method": "awq"}, "'awq'"), ({"quant_method": "compressed-tensors"},
           "'compressed-tensors'"), ({**fp8, "weight_block_size": None}, "per-tensor"),
           ({**fp8, "activation_scheme": "static"}, "'static'"),
           ({**fp8, "expert_dtype": "fp4"}, "FP4")]
    for qc, what in bad:
        with pytest.raises(ValueError, match=f"{what}.*supported: fp8 .*mxfp4"):
            quant_format_of(type("C", (), {"quantization_config": qc})())


def test_is_quantized_module():
    fmt = QuantFormat("mxfp4", (1, 32), ("model.layers.*.self_attn", "model.embed_tokens"))
    assert is_quantized_module("model.layers.3.mlp.experts", fmt)
    assert not is_quantized_module("model.layers.3.self_attn", fmt)
    assert not is_quantized_module("model.layers.3.self_attn.q_proj", fmt)
    assert not is_quantized_module("lm_head", FP8_16)
    fmt = QuantFormat("fp8", (128, 128), ("model.layers.1",))
    assert not is_quantized_module("model.layers.1.mlp.experts", fmt)
    assert is_quantized_module("model.layers.11.mlp.experts", fmt)  # a module boundary


# --------------------------------------------------------------------------- experts


def _fp8_experts(e, H, Fi, block=(16, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    qe = QuantizedExperts.empty(QuantFormat("fp8", block), e, H, Fi)
    for i in range(e):
        w = [torch.randn(*shape, generator=gen) * 0.2 for shape in ((Fi, H), (Fi, H), (H, Fi))]
        qe.load_fp8(i, *(quantize_fp8_blocks(t, block) for t in w))
    return qe, w


def _mxfp4_experts(e, H, Fi, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qe = QuantizedExperts.empty(MXFP4, e, H, Fi)
    for i in range(e):
        qe.load_mxfp4(i, quantize_mxfp4(torch.randn(2 * Fi, H, generator=gen) * 0.2),
                      quantize_mxfp4(torch.randn(H, Fi, generator=gen) * 0.2))
    return qe


def test_fp8_gate_up_grids_kept_apart():
    # F = 40 is not a multiple of the block (16): gate's last row block holds 8 rows, and
    # a grid over [2F, H] would put up's first 8 rows under gate's scale.
    qe, (wg, wu, wd) = _fp8_experts(2, 32, 40)
    w_gu, w_d = qe.expert(1, torch.float32)
    assert w_gu.shape == (80, 32) and w_d.shape == (32, 40)
    assert qe.gate_scale_inv.shape == (2, 3, 2) and qe.down_scale_inv.shape == (2, 2, 3)
    assert torch.equal(w_gu[:40], dequant_fp8_blocks(qe.gate_q[1], qe.gate_scale_inv[1],
                                                     (16, 16), torch.float32))
    assert torch.allclose(w_gu, torch.cat([wg, wu]), rtol=0.07, atol=1e-6)
    assert torch.allclose(w_d, wd, rtol=0.07, atol=1e-6)


def test_mxfp4_load_deinterleaves_gate_up():
    Fi, H = 32, 64
    gate, up = torch.randn(Fi, H), torch.randn(Fi, H)
    stored = torch.stack([gate, up], dim=1).reshape(2 * Fi, H)  # gpt-oss: rows alternate
    qe = QuantizedExperts.empty(MXFP4, 1, H, Fi)
    qe.load_mxfp4(0, quantize_mxfp4(stored), quantize_mxfp4(torch.randn(H, Fi)))
    w_gu, _ = qe.expert(0, torch.float32)
    assert torch.equal(w_gu[:Fi], dequant_mxfp4(*quantize_mxfp4(gate), torch.float32))
    assert torch.equal(w_gu[Fi:], dequant_mxfp4(*quantize_mxfp4(up), torch.float32))


def test_nbytes():
    e, H, Fi = 4, 256, 384  # bf16 stack: 2_359_296 bytes
    bf16 = 3 * e * H * Fi * 2
    qe, _ = _fp8_experts(e, H, Fi, block=(128, 128))
    scales = e * 4 * (2 * 3 * 2 + 2 * 3)  # gate, up [3, 2] and down [2, 3] grids, fp32
    assert qe.nbytes() == bf16 // 2 + scales == 1_179_936
    assert qe.nbytes() / bf16 == pytest.approx(0.5, abs=0.001)
    qm = _mxfp4_experts(e, H, Fi)
    assert qm.nbytes() == bf16 // 4 + 3 * e * H * Fi // 32 == 626_688  # one byte per 32
    assert qm.nbytes() / bf16 == pytest.approx(0.25 + 1 / 64)


def _config(activation):
    return MoEConfig(num_experts=6, hidden_size=64, intermediate_size=32,
                     activation=activation, swiglu_limit=7.0)


@pytest.mark.parametrize("method", ["fp8", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_compute_equals_plain_loop(method, dtype):
    e, H, Fi, N, k = 3, 64, 32, 40, 2
    qe = _fp8_experts(e, H, Fi)[0] if method == "fp8" else _mxfp4_experts(e, H, Fi)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, H, generator=gen).to(dtype)
    ids = torch.randint(-1, e, (N, k), generator=gen)
    ids[:, :] = torch.where(ids == 1, 0, ids)  # expert 1 receives nothing
    w = torch.rand(N, k, generator=gen)
    w_gu, w_d = qe.dequantized_stack(dtype)
    b_gu = torch.randn(e, 2 * Fi, generator=gen).to(dtype)
    b_d = torch.randn(e, H, generator=gen).to(dtype)
    calls = []
    expert = qe.expert
    qe.expert = lambda i, dt: calls.append(i) or expert(i, dt)
    for activation, biases in (("silu", None), ("clamped_swiglu", (b_gu, b_d))):
        glu = gated_activation(_config(activation))
        for fp32 in (False, True):
            plain = ExpertWeights(w_gu, w_d, *(biases or ()))
            ref, ref_counts = local_experts_forward(x, ids, w, plain, glu, "loop", fp32)
            got, counts = quantized_experts_forward(x, ids, w, qe, glu, fp32, biases=biases)
            assert counts == ref_counts and counts[1] == 0
            assert got.dtype == dtype and torch.equal(got, ref)
    assert set(calls) == {0, 2}  # the expert without rows was never dequantized
    inv, _ = quantized_experts_forward(x, ids, w, qe, glu, invariant=True)
    ref, _ = local_experts_forward(x, ids, w, ExpertWeights(w_gu, w_d), glu, "invariant")
    assert torch.equal(inv, ref)


def test_no_local_rows():
    qe = _mxfp4_experts(2, 32, 32)
    x = torch.randn(3, 32)
    out, counts = quantized_experts_forward(x, torch.full((3, 2), -1), torch.rand(3, 2), qe,
                                            gated_activation(_config("silu")))
    assert counts == [0, 0] and out.shape == (3, 32) and out.eq(0).all()


def test_bad_inputs_name_what_is_wrong():
    qe = QuantizedExperts.empty(FP8_16, 2, 32, 40)
    good = quantize_fp8_blocks(torch.randn(40, 32), (16, 16))
    down = quantize_fp8_blocks(torch.randn(32, 40), (16, 16))
    with pytest.raises(ValueError, match=r"gate.weight has shape \(32, 40\), expected \(40, 32\)"):
        qe.load_fp8(0, gate=down, up=good, down=down)
    with pytest.raises(ValueError, match=r"up.weight_scale_inv has shape \(2, 2\), expected"):
        qe.load_fp8(0, gate=good, up=(good[0], torch.ones(2, 2)), down=down)
    with pytest.raises(ValueError, match=r"down.weight has dtype torch.bfloat16, expected "
                                         r"torch.float8_e4m3fn"):
        qe.load_fp8(0, gate=good, up=good, down=(down[0].bfloat16(), down[1]))
    with pytest.raises(ValueError, match="these experts are fp8, not mxfp4"):
        qe.load_mxfp4(0, gate_up=good, down=down)
    with pytest.raises(ValueError, match="inter size a multiple of 32, got 40"):
        QuantizedExperts.empty(MXFP4, 2, 32, 40)
    qm = QuantizedExperts.empty(MXFP4, 1, 32, 32)
    gu = quantize_mxfp4(torch.randn(64, 32))
    with pytest.raises(ValueError, match=r"down_proj_scales has shape \(32, 2\), expected "
                                         r"\(32, 1\)"):
        qm.load_mxfp4(0, gate_up=gu, down=(gu[0][:32], torch.ones(32, 2, dtype=torch.uint8)))
    with pytest.raises(ValueError, match=r"scale_inv has shape \(2, 2\), expected \(3, 2\)"):
        dequant_fp8_blocks(good[0], torch.ones(2, 2), (16, 16), torch.float32)
    with pytest.raises(ValueError, match="must be uint8"):
        dequant_mxfp4(gu[0].float(), gu[1], torch.float32)
    with pytest.raises(ValueError, match=r"QuantFormat.method must be 'fp8' or 'mxfp4', got 'awq'"):
        QuantFormat("awq", (1, 1))


# --------------------------------------------------------------------------- checkpoints


def _plain_copy(path: Path, dtype: torch.dtype, dst: Path) -> Path:
    """The same model unquantized: the checkpoint's weights dequantized by epmoe.quant."""
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in dequantized_state(path, dtype).items()},
              str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


CHECKPOINTS = [("deepseek_v3", (8, 8)), ("qwen3_moe", (16, 16)), ("qwen3_moe", (128, 128)),
               ("gpt_oss", None)]


@pytest.mark.parametrize("family,block", CHECKPOINTS)
def test_transformers_loads_our_checkpoints(family, block, tmp_path):
    """transformers loads each tiny checkpoint on the CPU (dequantizing it to the model's
    dtype) with no missing or unexpected key, and its logits have the bits of the same
    model built from our dequantization of the same tensors."""
    from transformers import AutoModelForCausalLM

    path = (save_mxfp4_checkpoint(tmp_path / "q") if block is None
            else save_fp8_checkpoint(family, tmp_path / "q", block))
    stored = load_file(str(path / "model.safetensors"))
    if block is None:
        assert stored["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (6, 128, 2, 16)
        assert stored["model.layers.0.mlp.experts.down_proj_scales"].shape == (6, 64, 2)
        assert stored["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    else:
        e0 = "model.layers.1.mlp.experts.0.gate_proj.weight"
        assert stored[e0].dtype == FP8_DTYPE and f"{e0}_scale_inv" in stored
        assert stored["lm_head.weight"].dtype == torch.bfloat16
    ids = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))
    for dtype in (torch.bfloat16, torch.float32):
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype,
                                                           output_loading_info=True)
        assert not any(info.values()), info
        assert {p.dtype for n, p in model.named_parameters() if "experts" in n} == {dtype}
        ref = AutoModelForCausalLM.from_pretrained(
            _plain_copy(path, dtype, tmp_path / f"plain_{dtype}".replace("torch.", "")),
            dtype=dtype)
        with torch.no_grad():
            assert torch.equal(model(ids).logits, ref(ids).logits)
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("family,block", CHECKPOINTS[:2])
def test_fp8_writer_quantizes_what_transformers_converts(family, block, tmp_path):
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import FP8Experts, FP8Linear
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear as replace

    from epmoe.hf.tiny import tiny_config

    path = save_fp8_checkpoint(family, tmp_path / "q", block)
    quantized = {k.removesuffix(".weight_scale_inv") for k in
                 load_file(str(path / "model.safetensors")) if k.endswith("_scale_inv")}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(family))
    replace(model, ["lm_head"], FineGrainedFP8Config(weight_block_size=block), True)
    linear = {n for n, m in model.named_modules() if type(m) is FP8Linear}
    experts = {n for n, m in model.named_modules() if isinstance(m, FP8Experts)}
    assert {q for q in quantized if ".experts." not in q} == linear
    assert {q.rsplit(".", 2)[0] for q in quantized if ".experts." in q} == experts
    assert all(is_quantized_module(n, FP8_16)
               for n in linear | experts)
