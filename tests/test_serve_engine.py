"""The serving engine without HTTP: scheduler and sampling by hand, the engine against
transformers' greedy ``generate`` of each prompt alone, and the ranks kept in step.

Single process: the scheduler's decisions on hand-made queues, top-k/top-p and
seeds, and for several families (GQA, sliding windows with sinks, MLA) every
request of a continuously batched, chunk-prefilled run equal to transformers'
greedy tokens of that prompt alone. Two and three ranks: requests assigned
by least load through :func:`epmoe.serve.sync.serve_loop`, all equal to
their references, with zero steps on ranks that run out of work.
"""

from __future__ import annotations

import asyncio
import functools
import threading

import pytest
import torch
from multiproc import run_ranks

transformers = pytest.importorskip("transformers")

import epmoe  # noqa: E402
from epmoe.hf import from_pretrained  # noqa: E402
from epmoe.hf.tiny import save_tiny_checkpoint  # noqa: E402
from epmoe.serve.config import EngineConfig  # noqa: E402
from epmoe.serve.engine import Engine  # noqa: E402
from epmoe.serve.kv_cache import BlockAllocator  # noqa: E402
from epmoe.serve.sampling import _filtered_probs, make_generator, sample  # noqa: E402
from epmoe.serve.scheduler import Scheduler  # noqa: E402
from epmoe.serve.types import Request, SamplingParams  # noqa: E402

EOS = 257  # the tiny checkpoints' byte tokenizer


def _req(rid: str, n_prompt: int, max_tokens: int = 4, **kw) -> Request:
    return Request(rid, tuple(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, **kw))


# ----------------------------------------------------------------- scheduler, by hand


def test_scheduler_decodes_first_then_chunks_prompts_within_the_budget():
    s = Scheduler(BlockAllocator(10), block_size=4, max_num_seqs=3, max_num_batched_tokens=8)
    a, b, c, d = (s.add(_req(x, n)) for x, n in (("a", 5), ("b", 6), ("c", 2), ("d", 1)))
    plan = s.schedule()  # a: 5 tokens, b: the 3 left of the budget; c waits (budget spent)
    assert [(q.request.request_id, n) for q, n in plan] == [("a", 5), ("b", 3)]
    assert a.blocks == [0, 1] and b.blocks == [2, 3, 4]  # 5+4-1=8 tokens: 2 blocks; 9: 3
    for q, n in plan:
        q.num_computed += n
    a.tokens.append(100)  # a caught up and got a token: it decodes first now
    plan = s.schedule()
    assert [(q.request.request_id, n) for q, n in plan] == [("a", 1), ("b", 3), ("c", 2)]
    assert len(s.running) == 3 and [q.request.request_id for q in s.waiting] == ["d"]
    for q, n in plan:
        q.num_computed += n
    s.remove(a)  # finished: its blocks free, and d (max_num_seqs was full) gets in
    assert s.allocator.free == 10 - 3 - 2
    plan = s.schedule()
    assert [(q.request.request_id, n) for q, n in plan] == [("d", 1)]


def test_scheduler_waits_for_blocks_first_come_first_served():
    s = Scheduler(BlockAllocator(4), block_size=4, max_num_seqs=8, max_num_batched_tokens=64)
    big, small = s.add(_req("big", 9, 8)), s.add(_req("small", 1))
    s.add(_req("next", 12, 5))  # 16 tokens: 4 blocks, never fits beside "big" (4 blocks)
    assert s.fits_ever(_req("x", 12, 5)) and not s.fits_ever(_req("x", 12, 6))
    plan = s.schedule()
    assert [q.request.request_id for q, _ in plan] == ["big"]  # then "small" must not overtake
    assert [q.request.request_id for q in s.waiting] == ["small", "next"]
    s.remove(big)
    assert {q.request.request_id for q, _ in s.schedule()} == {"small"}
    assert small.blocks and s.allocator.free == 3


# ----------------------------------------------------------------- sampling


def test_top_k_and_top_p_keep_exactly_the_intended_tokens():
    logits = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))
    p = _filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([5 / 7, 2 / 7, 0, 0, 0]))
    p = _filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.8))  # 0.5+0.2 < 0.8
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    p = _filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert torch.allclose(p, torch.tensor([1.0, 0, 0, 0, 0]))


def test_seeded_sampling_is_the_same_in_any_batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    seeded = SamplingParams(temperature=0.9, seed=7)
    alone = [sample(logits[1:2], [seeded], [make_generator(seeded, torch.device("cpu"))])[0]
             for _ in range(1)]
    gens = [None, make_generator(seeded, torch.device("cpu")), None]
    batch = sample(logits, [SamplingParams(temperature=0), seeded, SamplingParams(top_k=1)],
                   gens)
    assert batch[1] == alone[0] and batch[0] == int(logits[0].argmax())
    assert batch[2] == int(logits[2].argmax())
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="max_tokens must be an integer >= 1"):
        SamplingParams(max_tokens=0)


# ----------------------------------------------------------------- engine vs transformers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("serve")
    return {f: str(save_tiny_checkpoint(f, root / f, seed=3))
            for f in ("qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral")}


def prompts(n: int) -> list[tuple[list[int], int]]:
    """``n`` prompts of different lengths (some longer than a step's budget below)."""
    return [([(i * 7 + j * 3 + 1) % 256 for j in range(3 + (5 * i) % 23)], 3 + (i * 5) % 9)
            for i in range(n)]


@functools.cache
def reference(path: str, ids: tuple[int, ...], n: int) -> list[int]:
    """transformers' greedy tokens of one prompt alone, fp32 (EOS ignored, as the requests)."""
    hf = _hf(path)
    x = torch.tensor([ids])
    return hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                       max_new_tokens=n)[0, len(ids):].tolist()


@functools.cache
def _hf(path: str):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    return hf


def run_engine(engine: Engine, requests: list[Request]) -> dict[str, list[int]]:
    got = {r.request_id: [] for r in requests}
    for r in requests:
        assert engine.add(r) is None
    while engine.has_work:
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    return got


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral"])
def test_continuous_batching_equals_each_prompt_alone(tiny, family):
    model = from_pretrained(tiny[family], epmoe.single_process_state("cpu"), dtype="float32")
    engine = Engine(model, EngineConfig(max_model_len=64, max_num_seqs=5,
                                        max_num_batched_tokens=24), (EOS,), torch.device("cpu"))
    ps = prompts(9)
    requests = [Request(str(i), tuple(ids), SamplingParams(max_tokens=n, temperature=0,
                                                            ignore_eos=True))
                for i, (ids, n) in enumerate(ps)]
    got = run_engine(engine, requests)
    for i, (ids, n) in enumerate(ps):
        assert got[str(i)] == reference(tiny[family], tuple(ids), n), i
    assert engine.scheduler.allocator.free == engine.cache.num_blocks  # all blocks back


def test_eos_stop_tokens_abort_and_context_limit(tiny):
    model = from_pretrained(tiny["qwen3_moe"], epmoe.single_process_state("cpu"),
                            dtype="float32")
    ids = list(b"The quick brown fox")  # greedy: 32, 245, 130, 151, 151, ...
    ref = reference(tiny["qwen3_moe"], tuple(ids), 8)
    first = [j for j in range(1, 8) if ref[j] not in ref[:j]]  # tokens seen first at step j
    e, t = first[0], first[1]
    engine = Engine(model, EngineConfig(max_model_len=32), (ref[e],), torch.device("cpu"))
    outs = []
    engine.add(Request("eos", tuple(ids), SamplingParams(max_tokens=8, temperature=0)))
    engine.add(Request("tok", tuple(ids), SamplingParams(max_tokens=8, temperature=0,
                                                          ignore_eos=True,
                                                          stop_token_ids=(ref[t],))))
    engine.add(Request("cut", tuple(ids), SamplingParams(max_tokens=8, temperature=0)))
    engine.step()
    outs.append(engine.abort("cut"))
    while engine.has_work:
        outs.extend(engine.step())
    last = {o.request_id: o for o in outs if o.finished}
    assert last["eos"].finish_reason == "stop" and last["eos"].new_token_ids == (ref[e],)
    assert last["tok"].finish_reason == "stop" and last["tok"].new_token_ids == (ref[t],)
    assert sum(len(o.new_token_ids) for o in outs if o.request_id == "tok") == t
    assert last["cut"].finish_reason == "abort"
    assert engine.abort("cut") is None  # once
    too_long = engine.add(Request("long", tuple(range(30)), SamplingParams(max_tokens=3)))
    assert too_long.finish_reason == "error" and "exceeds the context (32)" in too_long.error


# ----------------------------------------------------------------- ranks in step


def _serve_worker(path: str, n: int) -> dict:
    from epmoe.serve.client import EngineClient
    from epmoe.serve.sync import serve_loop

    state = epmoe.init_distributed(force_cpu=True, timeout_s=30)
    model = from_pretrained(path, state, dtype="float32")
    engine = Engine(model, EngineConfig(max_model_len=64, max_num_seqs=4,
                                        max_num_batched_tokens=16, idle_wait_s=0.2), (EOS,),
                    state.device)
    if state.rank != 0:
        serve_loop(engine, state)
        return dict(zero_steps=model.epmoe.dummy_steps, steps=engine.steps)
    client, stop = EngineClient(max_pending=64), threading.Event()
    thread = threading.Thread(target=serve_loop, args=(engine, state, client, stop))
    thread.start()

    async def one(i: int, ids: list[int], k: int) -> list[int]:
        await asyncio.sleep(0.01 * i)  # arrivals spread over the steps
        toks = []
        params = SamplingParams(max_tokens=k, temperature=0, ignore_eos=True)
        async for out in client.generate(Request(str(i), tuple(ids), params)):
            toks.extend(out.new_token_ids)
        return toks

    async def everything():
        return await asyncio.gather(*(one(i, ids, k) for i, (ids, k) in enumerate(prompts(n))))

    try:
        got = asyncio.run(everything())
    finally:
        stop.set()
        thread.join(timeout=30)
    return dict(got=got, stats=client.stats, steps=engine.steps,
                zero_steps=model.epmoe.dummy_steps)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_serve_their_requests_in_step(tiny, world):
    path = tiny["qwen3_moe"]
    out = run_ranks(_serve_worker, world, path, 10, deadline_s=150)
    for i, (ids, k) in enumerate(prompts(10)):
        assert out[0]["got"][i] == reference(path, tuple(ids), k), i
    stats = out[0]["stats"]
    assert sum(map(sum, stats.tokens_per_expert)) > 0 and len(stats.balancedness) == 3
    assert stats.dispatch_bytes > 0 and 0 < min(stats.balancedness) <= 1
    assert len(stats.running) == world and all(r == 0 for r in stats.running)
    assert len({o["steps"] for o in out}) == 1  # every rank took every step
    assert sum(o["zero_steps"] for o in out) > 0  # someone ran out of work first


def _gather_worker() -> list:
    import torch.distributed as dist

    from epmoe.serve.sync import gather_small

    state = epmoe.init_distributed(force_cpu=True, timeout_s=30)
    small = gather_small(("r", state.rank), state.device, dist.group.WORLD)
    big = gather_small(list(range(3000 * state.rank)), state.device, dist.group.WORLD, cap=64)
    return [small, [len(b) for b in big]]


def test_gather_small_in_one_round_or_two():
    out = run_ranks(_gather_worker, 2, deadline_s=60)
    assert out[0] == out[1] == [[("r", 0), ("r", 1)], [0, 3000]]


def test_a_step_that_only_reads_part_of_a_prompt(tiny):
    """A prompt longer than the step's budget on an otherwise idle engine: the first steps
    sample nothing (no logits rows at all), and the tokens still equal the reference."""
    model = from_pretrained(tiny["qwen3_moe"], epmoe.single_process_state("cpu"),
                            dtype="float32")
    engine = Engine(model, EngineConfig(max_model_len=64, max_num_seqs=2,
                                        max_num_batched_tokens=8), (EOS,), torch.device("cpu"))
    ids = [(j * 13 + 5) % 256 for j in range(30)]
    got = run_engine(engine, [Request("long", tuple(ids), SamplingParams(
        max_tokens=4, temperature=0, ignore_eos=True))])
    assert got["long"] == reference(tiny["qwen3_moe"], tuple(ids), 4)
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(4\) must be >= max_num_seqs"):
        EngineConfig(max_model_len=64, max_num_seqs=8, max_num_batched_tokens=4)


def test_batched_filtering_equals_each_row_alone():
    torch.manual_seed(1)
    logits = torch.randn(5, 40)
    logits[3, :4] = 2.0  # ties at the k-th score
    params = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(top_p=0.6),
              SamplingParams(temperature=1.3, top_k=10, top_p=0.9),
              SamplingParams(top_k=3), SamplingParams(top_k=-1, top_p=1.0)]
    from epmoe.serve.sampling import _filtered_probs_batch

    batch = _filtered_probs_batch(logits, params)
    for i, p in enumerate(params):
        assert torch.allclose(batch[i], _filtered_probs(logits[i], p), atol=1e-6), i
    drawn = sample(logits, params, [None] * 5)
    assert all(batch[i, t] > 0 for i, t in enumerate(drawn))  # only kept tokens are drawn
