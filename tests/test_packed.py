"""``epmoe.packed``: prepacked bf16 weights give the plain model's logits bit for bit.

Single process, EP=1, tiny random checkpoints of every family. The claim rests on
oneDNN's packed product having ``F.linear``'s bits in bf16 on the CPU at hand, which
``test_packed_product_has_linear_bits`` checks first, wherever the suite runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import epmoe.experts  # noqa: E402
from epmoe.experts_packed import packed_linear  # noqa: E402
from epmoe.hf import from_pretrained, save_pretrained  # noqa: E402
from epmoe.hf.tiny import TINY_FAMILIES, save_tiny_checkpoint  # noqa: E402
from epmoe.packed import (  # noqa: E402
    PACKED_DTYPES,
    PackedError,
    PackedLinear,
    PackedMoE,
    can_pack,
    pack_for_inference,
    pack_weight,
)
from epmoe.parallel_state import single_process_state  # noqa: E402

STATE = single_process_state("cpu")
BF16_PACKS = can_pack(torch.zeros(1, 1, dtype=torch.bfloat16))
needs_bf16 = pytest.mark.skipif(not BF16_PACKS, reason="no oneDNN native bf16 on this CPU: "
                                "pack_for_inference leaves bf16 weights plain here")
# (batch, sequence): 1, 5, 40 and 600 tokens in a batch
SHAPES = [(1, 1), (1, 5), (2, 20), (2, 300)]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("packed")
    return {f: str(save_tiny_checkpoint(f, root / f, seed=3, tokenizer=False))
            for f in TINY_FAMILIES}


def _ids(batch: int, length: int) -> torch.Tensor:
    return (torch.arange(batch * length).view(batch, length) * 7 + 3) % 256


def _pair(path: str, dtype: str = "bfloat16", **moe_options):
    """The same checkpoint loaded twice, the second packed."""
    plain = from_pretrained(path, STATE, dtype=dtype, moe_options=moe_options)
    packed = from_pretrained(path, STATE, dtype=dtype, moe_options=moe_options)
    return plain, packed, pack_for_inference(packed)


@needs_bf16
def test_packed_product_has_linear_bits():
    """The premise, on this CPU: in bf16, packed == F.linear for any rows, with and without
    a fused bias (shapes of the tiny models and a large one)."""
    gen = torch.Generator().manual_seed(0)
    for N, K in [(96, 64), (64, 48), (259, 64), (1, 64), (1024, 512)]:
        w = torch.randn(N, K, generator=gen).bfloat16()
        b = torch.randn(N, generator=gen).bfloat16()
        w_p = pack_weight(w)
        for M in (1, 3, 16, 37, 300):
            x = torch.randn(M, K, generator=gen).bfloat16()
            assert torch.equal(packed_linear(x, w_p), F.linear(x, w)), (N, K, M)
            assert torch.equal(packed_linear(x, w_p, b), F.linear(x, w, b)), (N, K, M)


@needs_bf16
@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_logits_bit_for_bit(checkpoints, family):
    """Packed logits == plain logits in bf16, with the default expert path (per forward:
    grouped_mm for few rows per expert, the loop for many)."""
    plain, packed, report = _pair(checkpoints[family])
    assert report.linears > 0 and report.moe_layers == len(packed.epmoe.layers)
    assert all(isinstance(m, PackedMoE) for m in packed.epmoe.layers)
    assert report.skipped == [] and report.copied_bytes == 0
    with torch.no_grad():
        for shape in SHAPES:
            ids = _ids(*shape)
            assert torch.equal(plain(ids).logits, packed(ids).logits), shape


@needs_bf16
@pytest.mark.parametrize("options", [dict(expert_impl="loop"), dict(expert_impl="grouped_mm"),
                                     dict(batch_invariant=True), dict(auto_loop=True)], ids=str)
def test_every_expert_path(checkpoints, options, monkeypatch):
    """GPT-OSS has expert biases, and there the plain loop (bias fused into the product)
    and grouped_mm (bias added after) give other bits in bf16 (the families without
    biases: the same bits). The packed layer repeats whichever path the plain one takes,
    also when the default ("auto_rows") picks the loop (here for any rows)."""
    if options.pop("auto_loop", False):
        monkeypatch.setattr(epmoe.experts, "LOOP_MIN_ROWS", 1)
    plain, packed, _ = _pair(checkpoints["gpt_oss"], **options)
    with torch.no_grad():
        for shape in [(1, 1), (2, 20)]:
            ids = _ids(*shape)
            assert torch.equal(plain(ids).logits, packed(ids).logits), shape


@needs_bf16
def test_generate_and_tied_head(checkpoints, tmp_path):
    """Greedy tokens equal; a tied LM head is packed as a copy (the embedding keeps it)."""
    path = save_tiny_checkpoint("mixtral", tmp_path / "tied", seed=4, tokenizer=False,
                                tie_word_embeddings=True)
    plain, packed, report = _pair(str(path))
    assert isinstance(packed.lm_head, PackedLinear)
    assert report.copied_bytes == packed.config.vocab_size * packed.config.hidden_size * 2
    ids = _ids(2, 6)
    assert torch.equal(plain.generate(ids, max_new_tokens=4, do_sample=False),
                       packed.generate(ids, max_new_tokens=4, do_sample=False))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_other_dtypes_left_plain(checkpoints, dtype):
    """fp32 (packed bits differ) and fp16 (not packable here) come back unchanged."""
    assert torch.float32 not in PACKED_DTYPES
    model = from_pretrained(checkpoints["qwen2_moe"], STATE, dtype=dtype)
    ids = _ids(1, 5)
    with torch.no_grad():
        before = model(ids).logits
        report = pack_for_inference(model)
        assert torch.equal(before, model(ids).logits)
    assert report.bytes == 0 and report.linears == 0 and report.moe_layers == 0
    assert len(report.skipped) > 0
    assert not any(isinstance(m, (PackedLinear, PackedMoE)) for m in model.modules())
    model.state_dict()  # (nothing refused)


@needs_bf16
def test_refused(checkpoints, tmp_path):
    """Whatever needs the plain weights raises PackedError naming pack_for_inference."""
    _, model, _ = _pair(checkpoints["mixtral"])
    layer = model.epmoe.layers[0]
    E, H, Fi = layer.config.num_experts, layer.config.hidden_size, layer.config.intermediate_size
    refused = {
        "autograd": lambda: model(_ids(1, 3)),  # (grad mode, not no_grad)
        "train": lambda: model.train(),
        "state_dict": lambda: model.state_dict(),
        "load_state_dict": lambda: model.load_state_dict({}, strict=False),
        "save_pretrained": lambda: save_pretrained(model, tmp_path / "out", STATE),
        "rebalance": lambda: layer.rebalance(torch.ones(E)),
        "lockstep rebalance": lambda: model.epmoe.rebalance(),
        "load_full_weights": lambda: layer.load_full_weights(
            torch.zeros(E, H), torch.zeros(E, Fi, H), torch.zeros(E, Fi, H),
            torch.zeros(E, H, Fi)),
        "reset_parameters": lambda: layer.reset_parameters(0),
        "expert_tensors": lambda: layer.expert_tensors(),
        "w_down": lambda: getattr(layer, "w_down", None),  # (not an AttributeError)
        "linear weight": lambda: model.lm_head.weight,
    }
    for what, call in refused.items():
        with pytest.raises(PackedError, match="pack_for_inference"):
            call()
            pytest.fail(f"{what} was not refused")
    model.eval()  # (train() raised partway: eval() puts every module back) and it still runs
    with torch.inference_mode():
        model(_ids(1, 3))
    assert layer.expert_weight_bytes() == 2 * E * 3 * H * Fi
    with pytest.raises(PackedError, match="pack_for_inference"):  # (leaves it half converted)
        model.to(torch.float32)


def test_rebalancing_layer_refused_before_packing(checkpoints):
    model = from_pretrained(checkpoints["mixtral"], STATE, dtype="bfloat16",
                            moe_options=dict(load_window=4, rebalance_interval=2))
    with pytest.raises(ValueError, match="rebalance_interval"):
        pack_for_inference(model)
    assert not any(isinstance(m, (PackedLinear, PackedMoE)) for m in model.modules())
