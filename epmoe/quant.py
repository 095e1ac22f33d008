"""Quantized expert weights kept in their checkpoint's format: FP8 block-scaled and MXFP4.

Official checkpoints of the big MoE families are not bf16: DeepSeek-V3.x, Kimi K2
and MiniMax-M2 ship FP8 (e4m3) weights with one fp32 ``weight_scale_inv`` per
``[b0, b1]`` block (``quant_method "fp8"``), gpt-oss ships its experts as MXFP4
(``quant_method "mxfp4"``: e2m1 nibbles, one e8m0 exponent per 32 values).
:class:`QuantizedExperts` keeps a rank's experts in that format and dequantizes
one expert at a time, for the expert compute (``epmoe.experts_quant``).

The dequantizations repeat transformers 5.24's arithmetic bit for bit (what it
runs when it loads such a checkpoint on a CPU, where it always dequantizes):
``Fp8Dequantize._dequantize_one`` (fp8 -> fp32, times the fp32 scale, rounded once
to the target dtype) and ``convert_moe_packed_tensors`` (e2m1 table in the
target dtype, then ``ldexp`` by the exponent), by faster table lookups. Checked
in ``tests/test_quant.py``.

Shape legend:

    R, C = rows, columns of one weight (nn.Linear orientation: [out, in])
    b0, b1 = FP8 block size (rows, columns)    G = 32-value MXFP4 groups in a row
    e = local experts    H = hidden size       F = intermediate size per expert
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = [
    "E2M1_VALUES",
    "FP8_DTYPE",
    "MXFP4_GROUP",
    "QuantFormat",
    "QuantizedExperts",
    "dequant_fp8_blocks",
    "dequant_mxfp4",
    "fp8_scale_name",
    "is_quantized_module",
    "quant_format_of",
    "quantize_fp8_blocks",
    "quantize_mxfp4",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
MXFP4_GROUP = 32  # values per e8m0 scale (two per byte: 16 bytes a group)
# The 16 e2m1 values by nibble (bit 3 the sign): transformers' FP4_VALUES, the OCP MX table.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SUPPORTED = ("fp8 (block-scaled, activation_scheme 'dynamic')", "mxfp4")


# --------------------------------------------------------------------------- format


@dataclass(frozen=True)
class QuantFormat:
    """How a checkpoint's quantized weights are stored."""

    method: str  # "fp8" (e4m3 + fp32 scale per block) or "mxfp4" (e2m1 + e8m0 per 32 values)
    block: tuple[int, int]  # fp8: weight_block_size (rows, columns); mxfp4: (1, 32)
    not_converted: tuple[str, ...] = ()  # modules_to_not_convert: module names kept as stored

    def __post_init__(self) -> None:
        if self.method not in ("fp8", "mxfp4"):
            raise ValueError(f"QuantFormat.method must be 'fp8' or 'mxfp4', got {self.method!r}")
        if len(self.block) != 2 or min(self.block) < 1:
            raise ValueError(f"QuantFormat.block must be two positive ints, got {self.block!r}")
        if self.method == "mxfp4" and tuple(self.block) != (1, MXFP4_GROUP):
            raise ValueError(f"QuantFormat.block must be (1, {MXFP4_GROUP}) for mxfp4, "
                             f"got {self.block!r}")


def quant_format_of(hf_config) -> QuantFormat | None:
    """The format of a Hugging Face config's ``quantization_config`` (a dict or an object,
    on the config or its text config), or ``None`` for an unquantized checkpoint.

    Raises ``ValueError`` naming the method for what epmoe cannot keep quantized:
    other methods (awq, gptq, compressed-tensors, bitsandbytes...), fp8 without a
    ``weight_block_size`` (per-tensor scales), static activation scales, FP4 experts.
    """
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None and hasattr(hf_config, "get_text_config"):
        qc = getattr(hf_config.get_text_config(), "quantization_config", None)
    if qc is None:
        return None
    get = qc.get if isinstance(qc, dict) else (lambda k, d=None: getattr(qc, k, d))
    method = get("quant_method", None)
    method = str(getattr(method, "value", method)).lower()  # (transformers' str enum)
    skip = get("modules_to_not_convert", None) or get("ignored_layers", None) or ()
    if method == "mxfp4":
        return QuantFormat("mxfp4", (1, MXFP4_GROUP), tuple(skip))
    if method != "fp8":
        raise ValueError(f"quantization_config.quant_method {method!r} is not supported by "
                         f"epmoe (supported: {', '.join(SUPPORTED)})")
    block = get("weight_block_size", None)
    if block is None:
        raise ValueError("quant_method 'fp8' without weight_block_size (per-tensor scales) is "
                         f"not supported by epmoe (supported: {', '.join(SUPPORTED)})")
    scheme = str(get("activation_scheme", "dynamic")).lower()
    if scheme != "dynamic":
        raise ValueError(f"quant_method 'fp8' with activation_scheme {scheme!r} is not "
                         f"supported by epmoe (supported: {', '.join(SUPPORTED)})")
    if str(get("expert_dtype", "fp8")) != "fp8":
        raise ValueError(f"quant_method 'fp8' with expert_dtype {get('expert_dtype')!r} (FP4 "
                         f"experts) is not supported by epmoe (supported: {', '.join(SUPPORTED)})")
    return QuantFormat("fp8", (int(block[0]), int(block[1])), tuple(skip))


def is_quantized_module(module_name: str, fmt: QuantFormat) -> bool:
    """Whether transformers treats the module ``module_name`` (checkpoint naming, e.g.
    ``model.layers.3.self_attn.q_a_proj``) as quantized, as far as the config's skip list
    says: ``lm_head`` never is; a ``modules_to_not_convert`` entry matches from the start
    up to a module boundary, as a regex with that boundary, or as a suffix
    (``should_convert_module``). Which modules are linear at all comes from the model:
    for fp8 every ``nn.Linear`` but ``lm_head`` and every experts block, for mxfp4 only
    the experts; in a checkpoint, a quantized weight has a ``weight_scale_inv`` beside it
    (:func:`fp8_scale_name`) or ``_blocks``/``_scales`` names."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    skip = ("lm_head", *fmt.not_converted)
    return not any(re.match(rf"(?:{k}){boundary}", module_name) or module_name.endswith(k)
                   for k in skip)


def fp8_scale_name(weight_name: str) -> str:
    """An fp8 weight's block scales in a checkpoint: ``x.weight`` -> ``x.weight_scale_inv``."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"an fp8 weight's name ends in '.weight', got {weight_name!r}")
    return weight_name + "_scale_inv"


# --------------------------------------------------------------------------- fp8


def _scale_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


CHUNK = 1 << 18  # values dequantized at a time (dequant_fp8_blocks, dequant_mxfp4)


def dequant_fp8_blocks(w_RC: Tensor, scale_inv: Tensor, block: tuple[int, int],
                       dtype: torch.dtype, out: Tensor | None = None) -> Tensor:
    """``w * scale_inv`` per ``block``, in fp32, rounded once to ``dtype`` -> ``[R, C]``.

    ``w_RC`` float8_e4m3fn; ``scale_inv`` ``[ceil(R/b0), ceil(C/b1)]`` fp32 (or e8m0
    as uint8 / float8_e8m0fnu: ``2 ** (byte - 127)``); the last row and column blocks
    may be partial. transformers' ``Fp8Dequantize._dequantize_one`` computes the same
    bits where R and C are multiples of the block (it refuses or misreads the others:
    it derives the block from ``R // ceil(R/b0)``). ``out``: a contiguous ``[R, C]``
    tensor of ``dtype`` to write into.
    """
    R, C = w_RC.shape
    if scale_inv.shape != _scale_grid((R, C), block):
        raise ValueError(f"scale_inv has shape {tuple(scale_inv.shape)}, expected "
                         f"{_scale_grid((R, C), block)} for a {R}x{C} weight in {block} blocks")
    s = _scale_fp32(scale_inv)
    b0, b1 = block
    full, rem = divmod(C, b1)
    s_RC1 = s.repeat_interleave(b0, dim=0)[:R]  # [R, ceil(C/b1)]: rows expanded only
    # Each e4m3 value looked up as a `dtype` (exact: every e4m3 is a bf16, fp16 and fp32;
    # the lookup took 1.5 ms where fp8.to(bf16) took 8 ms, 2048x1024, one thread; an
    # int32 index: take() and indexing need int64, 2.5x slower). The in-place products
    # below multiply in fp32 (the promoted dtype) and round once into w: transformers'
    # bits, without an fp32 [R, C] temporary.
    table = _table(_fp8_values, dtype, w_RC.device)
    w = w_RC.new_empty((R, C), dtype=dtype) if out is None else out
    # In bands of whole block rows of about CHUNK values, so that the int32 codes and the
    # products stay in the cache: memory then sees one byte read and one value written per
    # weight (the whole matrix at once: 23.2 ms against 4.7, 4096x1024 to bf16, one thread).
    step = max(1, CHUNK // (C * b0)) * b0
    for r in range(0, R, step):
        band = w[r : r + step]
        codes = w_RC[r : r + step].reshape(-1).view(torch.uint8).int()
        torch.index_select(table, 0, codes, out=band.view(-1))
        band[:, : full * b1].unflatten(1, (full, b1)).mul_(s_RC1[r : r + step, :full, None])
        if rem:
            band[:, full * b1 :].mul_(s_RC1[r : r + step, full:])
    return w


def _scale_fp32(scale_inv: Tensor) -> Tensor:
    if scale_inv.dtype == torch.uint8:  # e8m0 bytes, as transformers reads them
        return (scale_inv.to(torch.float32) - 127.0).exp2()
    return scale_inv.to(torch.float32)


def quantize_fp8_blocks(w_RC: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """``w`` -> (float8_e4m3fn ``[R, C]``, fp32 ``scale_inv [ceil(R/b0), ceil(C/b1)]``),
    scaled so each block's largest magnitude maps to 448 (DeepSeek's recipe). For tests,
    checkpoint writers and benchmarks; partial last blocks allowed."""
    R, C = w_RC.shape
    nr, nc = _scale_grid((R, C), block)
    b0, b1 = block
    padded = w_RC.new_zeros((nr * b0, nc * b1), dtype=torch.float32)
    padded[:R, :C] = w_RC
    tiles = padded.view(nr, b0, nc, b1)
    amax = tiles.abs().amax(dim=(1, 3))  # [nr, nc]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.view(nr * b0, nc * b1)[:R, :C].contiguous(), scale_inv


# --------------------------------------------------------------------------- mxfp4


def dequant_mxfp4(blocks: Tensor, scales: Tensor, dtype: torch.dtype,
                  out: Tensor | None = None) -> Tensor:
    """MXFP4 -> ``[..., G*32]`` in ``dtype``: value ``2j`` of a group is the low nibble
    of byte ``j``, ``2j+1`` the high one, each an e2m1 value times ``2 ** (scale - 127)``.

    ``blocks`` uint8 ``[..., G, 16]``, ``scales`` uint8 ``[..., G]`` (e8m0). The same
    bits as transformers' ``convert_moe_packed_tensors`` (table in ``dtype``, then
    ``ldexp``), before its final transpose. ``out``: a contiguous ``[..., G*32]``
    tensor of ``dtype`` to write into.
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"mxfp4 blocks and scales must be uint8, got {blocks.dtype} and "
                         f"{scales.dtype}")
    if blocks.shape[-1] != MXFP4_GROUP // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"mxfp4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)}"
                         f" do not fit: expected blocks [..., G, 16] and scales [..., G]")
    # One lookup per byte gives both of its values (a [256] table of value pairs packed
    # in one wider int), then one product by 2**(scale - 127) in fp32: exact but for
    # overflow and underflow, which round as ldexp's product does (tested: same bits).
    # Under 4.4 ms against 21 ms for transformers' nibble by nibble (2048x1024, one thread).
    pairs = _table(_e2m1_pairs, dtype, blocks.device)
    lead, G = blocks.shape[:-2], blocks.shape[-2]
    rows_b = blocks.reshape(-1, G, MXFP4_GROUP // 2)  # [rows, G, 16]
    rows_s = scales.reshape(-1, G)
    res = torch.empty((*lead, G * MXFP4_GROUP), dtype=dtype, device=blocks.device) \
        if out is None else out
    out = res.view(rows_b.shape[0], G, MXFP4_GROUP)
    # In bands of about CHUNK values, so that the codes and products stay in the cache
    # (as dequant_fp8_blocks).
    step = max(1, CHUNK // (G * MXFP4_GROUP))
    for r in range(0, rows_b.shape[0], step):
        b_, s_ = rows_b[r : r + step], rows_s[r : r + step]
        band = out[r : r + step]
        torch.index_select(pairs, 0, b_.reshape(-1).int(),
                           out=band.view(-1).view(pairs.dtype))
        band.mul_(torch.exp2(s_.to(torch.float32).sub_(127.0)).unsqueeze(-1))  # [., G, 1]
    return res


@functools.cache
def _table(make, dtype: torch.dtype, device: torch.device) -> Tensor:
    return make(dtype).to(device)


def _fp8_values(dtype: torch.dtype) -> Tensor:
    """``[256]``: each e4m3fn byte's value in ``dtype`` (0x7F, 0xFF: NaN)."""
    return torch.arange(256, dtype=torch.uint8).view(FP8_DTYPE).to(dtype)


def _e2m1_pairs(dtype: torch.dtype) -> Tensor:
    """``[256]``: each byte's two e2m1 values (low nibble first) in ``dtype``, packed
    into one int twice as wide, so that a lookup and a view give both."""
    lut = torch.tensor(E2M1_VALUES, dtype=dtype)
    byte = torch.arange(256)
    pairs = torch.stack([lut[byte & 0x0F], lut[byte >> 4]], dim=1)  # [256, 2]
    return pairs.view({2: torch.int32, 4: torch.int64}[dtype.itemsize]).view(256)


def quantize_mxfp4(w_RC: Tensor) -> tuple[Tensor, Tensor]:
    """``w [..., C]`` (C a multiple of 32) -> (blocks uint8 ``[..., C/32, 16]``, scales
    uint8 ``[..., C/32]``): per 32 values the smallest exponent that needs no clamping,
    ``ceil(log2(amax / 6))`` (the OCP MX recipe, ``floor(log2(amax)) - 2``, clamps values
    above 6 times its scale), each value rounded to the nearest e2m1. For tests and
    benchmarks."""
    *lead, C = w_RC.shape
    if C % MXFP4_GROUP:
        raise ValueError(f"mxfp4 needs a last dimension that is a multiple of {MXFP4_GROUP}, "
                         f"got {C}")
    g = w_RC.float().reshape(*lead, C // MXFP4_GROUP, MXFP4_GROUP)
    amax = g.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6)), torch.zeros_like(amax))
    exp = exp.clamp(-127, 127)
    x = (g / torch.exp2(exp)).clamp(-6.0, 6.0)
    mags = torch.tensor(E2M1_VALUES[:8])
    code = (x.abs().unsqueeze(-1) - mags).abs().argmin(-1)  # nearest magnitude, 0..7
    code = code + 8 * (x < 0)
    nib = code.to(torch.uint8).view(*lead, C // MXFP4_GROUP, MXFP4_GROUP // 2, 2)
    blocks = nib[..., 0] | (nib[..., 1] << 4)
    return blocks.contiguous(), (exp.squeeze(-1) + 127).to(torch.uint8)


# --------------------------------------------------------------------------- experts


class QuantizedExperts(nn.Module):
    """This rank's ``e`` local experts, stacked, in the checkpoint's quantized format.

    fp8 (buffers): ``gate_q, up_q [e, F, H]``, ``down_q [e, H, F]`` float8_e4m3fn and
    their fp32 ``*_scale_inv`` grids ``[e, ceil(F/b0), ceil(H/b1)]`` and ``[e,
    ceil(H/b0), ceil(F/b1)]``. Gate and up keep their own grids, as on disk: when
    ``F % b0 != 0`` the two grids side by side are not one grid over ``[2F, H]``.
    mxfp4: ``gate_up_blocks [e, 2F, H/32, 16]``, ``gate_up_scales [e, 2F, H/32]``
    (gate rows then up rows: epmoe's order, not gpt-oss's interleaved one),
    ``down_blocks [e, H, F/32, 16]``, ``down_scales [e, H, F/32]``, uint8.

    Made empty (:meth:`empty`), then filled per local expert by the checkpoint loader
    (:meth:`load_fp8`, :meth:`load_mxfp4`). No autograd: frozen weights.
    """

    def __init__(self, fmt: QuantFormat, num_local: int, hidden: int, inter: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.fmt, self.num_local, self.hidden, self.inter = fmt, num_local, hidden, inter
        e, H, Fi = num_local, hidden, inter
        if fmt.method == "fp8":
            for name, (r, c) in (("gate", (Fi, H)), ("up", (Fi, H)), ("down", (H, Fi))):
                self.register_buffer(f"{name}_q", torch.zeros(e, r, c, dtype=FP8_DTYPE,
                                                              device=device))
                self.register_buffer(f"{name}_scale_inv", torch.ones(
                    e, *_scale_grid((r, c), fmt.block), device=device))
            return
        for n, what in ((H, "hidden"), (Fi, "inter")):
            if n % MXFP4_GROUP:
                raise ValueError(f"mxfp4 experts need {what} size a multiple of {MXFP4_GROUP}, "
                                 f"got {n}")
        for name, (r, c) in (("gate_up", (2 * Fi, H)), ("down", (H, Fi))):
            G = c // MXFP4_GROUP
            self.register_buffer(f"{name}_blocks", torch.zeros(
                e, r, G, MXFP4_GROUP // 2, dtype=torch.uint8, device=device))
            self.register_buffer(f"{name}_scales", torch.full((e, r, G), 127, dtype=torch.uint8,
                                                              device=device))

    @classmethod
    def empty(cls, fmt: QuantFormat, num_local: int, hidden: int, inter: int,
              device: torch.device | str | None = None) -> QuantizedExperts:
        """``num_local`` experts of zeros (scales 1), to fill with the ``load_*`` methods."""
        return cls(fmt, num_local, hidden, inter, device)

    def _need(self, method: str) -> None:
        if self.fmt.method != method:
            raise ValueError(f"these experts are {self.fmt.method}, not {method}")

    @torch.no_grad()
    def load_fp8(self, i: int, gate: tuple[Tensor, Tensor], up: tuple[Tensor, Tensor],
                 down: tuple[Tensor, Tensor]) -> None:
        """Local expert ``i`` from its checkpoint tensors, each ``(weight, weight_scale_inv)``:
        ``gate``/``up`` ``([F, H] fp8, [ceil(F/b0), ceil(H/b1)])``, ``down`` ``([H, F] fp8,
        [ceil(H/b0), ceil(F/b1)])``. Scales fp32, or e8m0 (uint8 / float8_e8m0fnu)."""
        self._need("fp8")
        for name, (w, s) in (("gate", gate), ("up", up), ("down", down)):
            q, sc = getattr(self, f"{name}_q")[i], getattr(self, f"{name}_scale_inv")[i]
            _check(f"{name}.weight", w, tuple(q.shape), FP8_DTYPE)
            _check(f"{name}.weight_scale_inv", s, tuple(sc.shape), None)
            q.copy_(w)
            sc.copy_(_scale_fp32(s.view(torch.uint8) if s.dtype != torch.float32
                                 and s.element_size() == 1 else s))

    @torch.no_grad()
    def load_mxfp4(self, i: int, gate_up: tuple[Tensor, Tensor],
                   down: tuple[Tensor, Tensor]) -> None:
        """Local expert ``i`` from gpt-oss's tensors, each ``(blocks, scales)`` uint8:
        ``gate_up`` ``([2F, H/32, 16], [2F, H/32])`` with gate and up rows interleaved
        (row ``2j`` gate j, ``2j+1`` up j: how gpt-oss stores them), ``down`` ``([H, F/32,
        16], [H, F/32])``. Rows are reordered to gate rows then up rows (exact: each row
        keeps its own scales)."""
        self._need("mxfp4")
        (gub, gus), (db, ds) = gate_up, down
        _check("gate_up_proj_blocks", gub, tuple(self.gate_up_blocks.shape[1:]), torch.uint8)
        _check("gate_up_proj_scales", gus, tuple(self.gate_up_scales.shape[1:]), torch.uint8)
        _check("down_proj_blocks", db, tuple(self.down_blocks.shape[1:]), torch.uint8)
        _check("down_proj_scales", ds, tuple(self.down_scales.shape[1:]), torch.uint8)
        Fi = self.inter
        for dst, src in ((self.gate_up_blocks[i], gub), (self.gate_up_scales[i], gus)):
            dst[:Fi].copy_(src[0::2])
            dst[Fi:].copy_(src[1::2])
        self.down_blocks[i].copy_(db)
        self.down_scales[i].copy_(ds)

    def expert(self, i: int, dtype: torch.dtype,
               out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Local expert ``i`` dequantized to ``dtype``: ``(w_gate_up [2F, H]`` (gate rows,
        then up rows), ``w_down [H, F])``. Costs two new tensors of that size, or writes
        into ``out`` (two contiguous tensors of those shapes and ``dtype``)."""
        Fi, H = self.inter, self.hidden
        w_gu, w_d = out if out is not None else (
            torch.empty((2 * Fi, H), dtype=dtype, device=self.down_scales.device
                        if self.fmt.method == "mxfp4" else self.down_q.device),
            torch.empty((H, Fi), dtype=dtype, device=self.down_scales.device
                        if self.fmt.method == "mxfp4" else self.down_q.device))
        if self.fmt.method == "fp8":
            b = self.fmt.block
            dequant_fp8_blocks(self.gate_q[i], self.gate_scale_inv[i], b, dtype, out=w_gu[:Fi])
            dequant_fp8_blocks(self.up_q[i], self.up_scale_inv[i], b, dtype, out=w_gu[Fi:])
            dequant_fp8_blocks(self.down_q[i], self.down_scale_inv[i], b, dtype, out=w_d)
            return w_gu, w_d
        dequant_mxfp4(self.gate_up_blocks[i], self.gate_up_scales[i], dtype, out=w_gu)
        dequant_mxfp4(self.down_blocks[i], self.down_scales[i], dtype, out=w_d)
        return w_gu, w_d

    def dequantized_stack(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Every local expert dequantized: ``(w_gate_up [e, 2F, H], w_down [e, H, F])``."""
        pairs = [self.expert(i, dtype) for i in range(self.num_local)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def nbytes(self) -> int:
        """Bytes of every buffer (weights and scales)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return (f"{self.fmt.method}, block={self.fmt.block}, e={self.num_local}, "
                f"H={self.hidden}, F={self.inter}")


def _check(name: str, t: Tensor, shape: tuple[int, ...], dtype: torch.dtype | None) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, expected {dtype}")
