"""What the MoE layer checks before it runs: the input of a forward, its routing, and that
every rank of the group built the layer from the same config.

The input checks only *find* a problem; the layer raises it after the peers were told,
at the first collective of the dispatch (``epmoe.errors``), so that every rank raises.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .collectives import gather_ints, gather_objects
from .config import MoEConfig
from .errors import InputError, Problem
from .health import guarded
from .ops import capturing
from .parallel_state import ParallelState

__all__ = ["check_finite", "check_full_weights", "check_input", "check_routing",
           "check_same_config"]


def check_input(x, config: MoEConfig, device: torch.device, where: str) -> InputError | None:
    """This rank's input problem, if any. ``where``: "layer 3 on rank 1"."""
    c = config
    if not isinstance(x, Tensor):
        return InputError(Problem.SHAPE, 0, f"{where}: x must be a torch.Tensor "
                          f"[T, {c.hidden_size}], got {type(x).__name__}")
    if x.dim() != 2 or x.shape[1] != c.hidden_size:
        return InputError(Problem.SHAPE, 0, f"{where} expects x of shape [T, {c.hidden_size}] "
                          f"(tokens, hidden_size), got {tuple(x.shape)}")
    if x.dtype != c.dtype:
        return InputError(Problem.DTYPE, 0, f"{where} expects x of dtype {c.dtype} "
                          f"(config.dtype), got {x.dtype}")
    if x.device != device:
        return InputError(Problem.DEVICE, 0, f"{where} expects x on {device} (this rank's "
                          f"device), got {x.device}")
    return None


def check_routing(routing, x_TH: Tensor, config: MoEConfig,
                  where: str) -> tuple[tuple[Tensor, Tensor] | None, InputError | None]:
    """The routing given to a forward: none with epmoe's own router; with
    ``router="given"``, weights ``[T, k]`` (floating) and expert ids ``[T, k]`` (integer,
    in ``0..E-1``) on x's device (``None`` stands for no routing of T = 0 tokens).
    Returns the routing to use and this rank's problem, if any."""
    c, T = config, x_TH.shape[0]
    if c.router == "epmoe":
        if routing is None:
            return None, None
        return None, InputError(Problem.ROUTING, 0, f"{where} routes its tokens itself "
                                "(MoEConfig.router='epmoe'): call it without routing, or "
                                "build it with router='given'")
    if routing is None and T == 0:
        return _no_routing(c, x_TH.device), None
    ok = isinstance(routing, tuple | list) and len(routing) == 2 and all(
        isinstance(t, Tensor) and t.shape == (T, c.top_k) and t.device == x_TH.device
        for t in routing)
    if ok:
        w, ids = routing
        ok = w.is_floating_point() and not ids.is_floating_point() and not ids.is_complex()
    if not ok:
        got = [(tuple(t.shape), t.dtype) if isinstance(t, Tensor) else type(t).__name__
               for t in routing] if isinstance(routing, tuple | list) else routing
        return None, InputError(Problem.ROUTING, 0, f"{where} (MoEConfig.router='given') "
                                f"needs routing=(weights [T, {c.top_k}] floating, expert ids "
                                f"[T, {c.top_k}] integer) on {x_TH.device} for its {T} tokens, "
                                f"got {got}")
    # NOTE: one host sync (the ids' range), free on the CPU; a bad id would index past the
    # placement tables instead of raising.
    if T and not capturing() and not bool(((ids >= 0) & (ids < c.num_experts)).all()):
        return None, InputError(Problem.ROUTING, 0, f"{where}: routing ids must be expert "
                                f"ids in 0..{c.num_experts - 1}, got {ids.min().item()}.."
                                f"{ids.max().item()}")
    return (w, ids.long()), None


def _no_routing(config: MoEConfig, device: torch.device) -> tuple[Tensor, Tensor]:
    """The routing of zero tokens (a rank with nothing to send joins the dispatch)."""
    return (torch.empty((0, config.top_k), dtype=torch.float32, device=device),
            torch.empty((0, config.top_k), dtype=torch.int64, device=device))


def check_finite(x_TH: Tensor, logits_TE: Tensor | None, weights_TK: Tensor,
                 where: str) -> InputError | None:
    """NaN or Inf in the tokens or their routing (config.nonfinite="raise"). A non-finite
    token makes all its logits non-finite, so the small [T, E] logits are checked, not the
    [T, H] tokens (which only the error message reads). With a given routing (no logits
    here) the tokens themselves are checked."""
    # NOTE: one host sync per chunk (free on the CPU); nonfinite="propagate" skips it.
    scores = torch.isfinite(logits_TE).all() if logits_TE is not None else \
        torch.isfinite(x_TH).all()
    if bool((scores & torch.isfinite(weights_TK).all()).item()):
        return None
    bad_T = ~torch.isfinite(x_TH).all(dim=1)
    hint = ("(MoEConfig.nonfinite='raise'; 'propagate' lets them through, each such token "
            "giving non-finite outputs of its own only)")
    if bad_T.any():
        idx = bad_T.nonzero().flatten().tolist()
        return InputError(Problem.NONFINITE_INPUT, len(idx), f"{where}: the input x has NaN "
                          f"or Inf in {len(idx)} of {x_TH.shape[0]} tokens (first: "
                          f"{idx[:5]}) {hint}")
    idx = (~torch.isfinite(weights_TK).all(dim=1)).nonzero().flatten().tolist()
    return InputError(Problem.NONFINITE_SCORES, len(idx), f"{where}: the router scores "
                      f"have NaN or Inf in {len(idx)} of {x_TH.shape[0]} tokens (first: "
                      f"{idx[:5]}) though the tokens are finite: check router_weight {hint}")


def check_same_config(config: MoEConfig, state: ParallelState, name: str) -> None:
    """Every rank of the EP group must build the layer from the same config: a hash
    over the group, and on a difference, the fields that differ on every rank."""
    s = state
    if s.ep_size == 1 or s.ep_group is None:
        return
    with guarded(s.heartbeat, f"the config check of {name}", s.ep_ranks):
        seen = gather_ints([config.fingerprint()], s.device, s.ep_group)
        if len({v[0] for v in seen}) == 1:
            return
        configs = gather_objects(config, s.ep_group)
    diff = {}
    for j, other in enumerate(configs):
        for field, (_, theirs) in configs[0].differences(other).items():
            diff.setdefault(field, {})[s.ep_ranks[j]] = theirs
    lines = []
    for field, vals in diff.items():
        every = {s.ep_ranks[0]: getattr(configs[0], field), **vals}
        lines.append(f"{field}: " + ", ".join(f"{v!r} on rank {r}" for r, v in every.items()))
    text = "; ".join(lines)
    raise ValueError(f"MoEConfig of {name} differs between the ranks of EP group "
                     f"{list(s.ep_ranks)}: {text}. Every rank must build each layer from "
                     "the same config (the same checkpoint, the same arguments).")


def check_full_weights(given: dict[str, object], want: dict[str, tuple[int, ...]],
                       dtypes: dict[str, torch.dtype], config: MoEConfig) -> None:
    """``load_full_weights``' arguments: exactly the names ``want`` (name -> full shape)
    lists, each a floating-point tensor of that shape (cast later to ``dtypes[name]``)."""
    if set(given) != set(want):
        raise ValueError(f"load_full_weights: this config takes {sorted(want)}; missing "
                         f"{sorted(set(want) - set(given))}, unexpected "
                         f"{sorted(set(given) - set(want))}")
    for name, t in given.items():
        if not isinstance(t, Tensor):
            raise ValueError(f"load_full_weights: {name} must be a torch.Tensor of shape "
                             f"{want[name]}, got {type(t).__name__}")
        if not t.is_floating_point() or t.is_meta:
            raise ValueError(f"load_full_weights: {name} must hold floating-point values "
                             f"(it is cast to {dtypes[name]}), got "
                             f"{'a meta tensor' if t.is_meta else t.dtype}")
        if tuple(t.shape) != want[name]:
            raise ValueError(f"load_full_weights: {name} has shape {tuple(t.shape)}, "
                             f"expected {want[name]} for {config}")
