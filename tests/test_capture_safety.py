"""The ``low_latency`` forward as CUDA-graph capture runs it, checked on the CPU.

Under capture (``epmoe.ops.capturing()``) nothing may be read on the host and
nothing copied to the device from Python values. Here capture is forced on, the
experts take the fixed-shape path they take on an accelerator
(``local_experts_forward_fixed``), and every Python-level call that would read a
tensor on the host (``item``, ``tolist``, ``bool(t)``, ``int(t)``, ``nonzero``,
boolean indexing, ``.cpu()``) or build one from Python values (``torch.tensor``)
raises. What a kernel does inside C++ cannot be seen from here (``torch.bincount``
reads its input's min and max on the host on CUDA), so such ops are listed by name.
The outputs must equal those of the same forward run eagerly.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from multiproc import run_ranks

import epmoe
import epmoe.ops
from epmoe.experts import ExpertWeights, gated_activation, local_experts_forward_fixed

H, F_, E, K = 32, 16, 8, 2  # hidden, intermediate, experts, top_k (32 fp32: 16-byte rows)
COUNTS = [7, 12]  # tokens per rank (EP=1 takes the first)


class HostRead(AssertionError):
    """A call that would read a tensor on the host, or copy Python values to the device."""


def _forbid(name: str):
    def refuse(*args, **kwargs):
        raise HostRead(f"{name} on the captured path")
    return refuse


class _NoBooleanIndexing(torch.overrides.TorchFunctionMode):
    """Boolean-mask indexing raises (its result's size is read on the host). A mode, not a
    patched ``Tensor.__getitem__``: setting that on the class gives torch.Tensor a sequence
    slot that stays after the patch is undone (torch.tensor then takes a 0-d tensor for a
    sequence)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.__getitem__:
            index = args[1]
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool and p.dim()
                   for p in parts):
                raise HostRead("boolean indexing on the captured path (its size is read on "
                               "the host)")
        return func(*args, **(kwargs or {}))


TENSOR_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                  "cpu", "numpy")
TORCH_FUNCTIONS = ("tensor", "as_tensor", "nonzero", "masked_select", "unique")
# Sync inside the kernel on CUDA, invisible from Python: forbidden by name.
SYNCING_OPS = ("bincount",)


@contextlib.contextmanager
def captured(monkeypatch: pytest.MonkeyPatch, ops: tuple[str, ...] = SYNCING_OPS):
    """Inside: ``capturing()`` is true everywhere in epmoe and host reads raise."""
    real = epmoe.ops.capturing
    with monkeypatch.context() as m:
        for mod in [mod for name, mod in sys.modules.items() if name.startswith("epmoe")]:
            if getattr(mod, "capturing", None) is real:
                m.setattr(mod, "capturing", lambda: True)
        for name in TENSOR_METHODS:
            m.setattr(torch.Tensor, name, _forbid(f"Tensor.{name}"))
        for name in TORCH_FUNCTIONS + ops:
            m.setattr(torch, name, _forbid(f"torch.{name}"))
        for name in ops:
            m.setattr(torch.Tensor, name, _forbid(f"Tensor.{name}"))
        inherited = [n for n in (*TENSOR_METHODS, *ops) if n not in vars(torch.Tensor)]
        try:
            with _NoBooleanIndexing():
                yield
        finally:
            m.undo()  # (puts inherited methods back as torch.Tensor's own attributes:
            for name in inherited:  # let them be inherited again)
                if name in vars(torch.Tensor):
                    delattr(torch.Tensor, name)


def _layer(state) -> epmoe.ExpertParallelMoE:
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=E, top_k=K,
                          all2all_backend="low_latency", max_tokens_per_rank=max(COUNTS))
    layer = epmoe.ExpertParallelMoE(cfg, state, seed=None)
    router, gate, up, down = epmoe.full_weights(cfg, seed=3)
    layer.load_full_weights(router, gate, up, down)
    return layer


def _fixed_experts(layer: epmoe.ExpertParallelMoE, monkeypatch: pytest.MonkeyPatch) -> None:
    """The experts as ``ExpertParallelMoE._compute`` runs them on an accelerator."""
    def compute(received):
        x_NH, local_ids_NK, w_NK = received
        return local_experts_forward_fixed(x_NH, local_ids_NK, w_NK, layer._experts(),
                                           layer._glu, layer.config.weigh_in_fp32), None
    monkeypatch.setattr(layer, "_compute", compute)


def _forwards(state, rank: int, ops: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """(counted eager, fixed eager, fixed captured) outputs of this rank's tokens."""
    with pytest.MonkeyPatch.context() as mp:
        layer = _layer(state)
        x_all = torch.randn(sum(COUNTS), H, generator=torch.Generator().manual_seed(5))
        start = sum(COUNTS[:rank])
        x = x_all[start : start + COUNTS[rank]]
        with torch.no_grad():
            counted = layer(x)
            _fixed_experts(layer, mp)
            fixed = layer(x)
            with captured(mp, ops):
                in_graph = layer(x)
    return counted, fixed, in_graph


def _check(counted, fixed, in_graph) -> None:
    assert torch.equal(in_graph, fixed)  # capture changes nothing but the host reads
    torch.testing.assert_close(fixed, counted)


def _ep2_worker(ops: tuple[str, ...]):
    state = epmoe.init_distributed(force_cpu=True, timeout_s=60)
    return _forwards(state, state.rank, ops)


def test_low_latency_captured_forward_reads_nothing_on_the_host():
    _check(*_forwards(epmoe.single_process_state(torch.device("cpu")), 0, ()))


def test_low_latency_captured_forward_ep2():
    """The packed exchange with its header rows, over gloo."""
    for outs in run_ranks(_ep2_worker, 2, ()):
        _check(*outs)


def _fixed_experts_call_bincount() -> bool:
    """Whether ``local_experts_forward_fixed`` still counts with ``torch.bincount``."""
    calls, real = [], torch.bincount
    cfg = epmoe.MoEConfig(hidden_size=H, intermediate_size=F_, num_experts=2)
    experts = ExpertWeights(torch.zeros(2, 2 * F_, H), torch.zeros(2, H, F_))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch, "bincount", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        local_experts_forward_fixed(torch.zeros(3, H), torch.tensor([[0, -1], [1, 0], [-1, -1]]),
                                    torch.ones(3, 2), experts, gated_activation(cfg))
    return bool(calls)


def test_low_latency_captured_forward_uses_no_syncing_op():
    """As above, with the ops that sync inside their CUDA kernel forbidden too."""
    if _fixed_experts_call_bincount():
        pytest.xfail("local_experts_forward_fixed (epmoe/experts.py) still counts with "
                     "torch.bincount, which reads its input's min and max on the host on CUDA")
    _check(*_forwards(epmoe.single_process_state(torch.device("cpu")), 0, SYNCING_OPS))


def test_capture_guard_catches_a_host_read(monkeypatch: pytest.MonkeyPatch):
    """The guard itself: each kind of host read raises inside it, and only there."""
    t = torch.arange(4)
    with captured(monkeypatch):
        assert epmoe.ops.capturing()
        for read in (lambda: t.sum().item(), lambda: t.tolist(), lambda: bool(t[0]),
                     lambda: int(t[1]), lambda: torch.tensor([1, 2]), lambda: t[t > 1],
                     lambda: t.nonzero(), lambda: torch.bincount(t)):
            with pytest.raises(HostRead):
                read()
    assert t.tolist() == [0, 1, 2, 3] and t[t > 1].tolist() == [2, 3]


def test_eager_forward_still_raises_its_error():
    """Eager, an error takes the header's other branch (filled in on the device); its
    problem and detail reaching the peers is checked in ``tests/test_safety.py``."""
    layer = _layer(epmoe.single_process_state(torch.device("cpu")))
    x = torch.randn(max(COUNTS) + 3, H)
    with pytest.raises(ValueError, match=f"{max(COUNTS) + 3} tokens on rank 0 exceed"):
        layer(x)
