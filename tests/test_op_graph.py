"""Recorded operator graphs (the CPU's decode graphs): a replay computes what
the forward computes on the inputs of the moment."""

import gc

import pytest
import torch
from tokenmill import LLM, SamplingParams
from tokenmill.engine.decode_graphs import DecodeGraphs
from tokenmill.engine.op_graph import GraphCaptureError, OpGraph
from tokenmill.layers.quantization import pack_tokenmill

from tests.conftest import pin_cheap_rows


def test_replay_follows_new_inputs_through_views_copies_and_in_place_ops():
    x = torch.randn(4, 6, dtype=torch.float64)
    w = torch.randn(6, 6, dtype=torch.float64)

    def forward():
        h = x @ w
        a, b = h.split([2, 4], dim=-1)
        b = b.reshape(-1, 2)  # not viewable: a copy, which a replay must make again
        out = torch.empty_like(b)
        torch.mul(b, 2.0, out=out)
        out.add_(a.reshape(-1, 2).sum() * 0 + 1)
        return torch.cat([torch.tanh(out.view(4, 4)), a], dim=-1)

    graph = OpGraph()
    with torch.inference_mode():
        graph.capture(forward)
        for _ in range(3):
            x.copy_(torch.randn(4, 6, dtype=torch.float64))
            torch.testing.assert_close(graph.replay(), forward(), rtol=0, atol=0)


def test_a_graph_unloads_its_programs_when_it_goes():
    x, w = torch.randn(3, 8), torch.randn(8)
    h, out = torch.empty(3, 8), torch.empty(3, 4)

    def forward():
        torch.ops.tokenmill.rms_norm(h, x, w, 1e-6)
        torch.ops.tokenmill.silu_and_mul(out, h)
        return out * 1

    graph = OpGraph()
    graph.capture(forward)
    (program, bound, slots) = next(args for _, args, *_ in graph.calls)
    torch.ops.tokenmill.run_loaded_program(program, bound, slots)  # loaded
    del graph
    gc.collect()
    with pytest.raises(RuntimeError, match="no program"):
        torch.ops.tokenmill.run_loaded_program(program, bound, slots)


def test_reading_a_value_in_python_cannot_be_captured():
    x = torch.randn(3)
    with pytest.raises(GraphCaptureError, match="value"):
        OpGraph().capture(lambda: x * 2 if x.sum().item() > 0 else x * 3)


def test_a_forward_that_cannot_be_captured_runs_eagerly():
    class ReadsAValue(torch.nn.Module):
        def forward(self, input_ids, positions, meta):
            return input_ids.float()[:, None] * (2 if positions.sum().item() > 0 else 3)

    graphs = DecodeGraphs(ReadsAValue(), torch.device("cpu"), 4, 2)
    assert graphs.graphs == {}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decode_graphs_give_the_eager_tokens(tiny_model, arch):
    path = tiny_model(arch)
    prompts = [[5, 9, 2, 7], [3] * 11, [8, 1, 4], list(range(2, 40)), [6, 6]]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    eager = LLM(path, dtype="float32", kv_cache_memory="64MiB", enforce_eager=True)
    assert eager.engine.runner.graphs is None
    expected = eager.generate([{"prompt_token_ids": p} for p in prompts], greedy)
    # Without drafts a decode step has one row per sequence: the graph of its batch size.
    llm = LLM(path, dtype="float32", kv_cache_memory="64MiB", speculative_config=None)
    graphs = llm.engine.runner.graphs
    assert sorted(graphs.graphs) == list(range(1, 9))  # every size: CPUs compute padding
    # Up to two rows the layers' native ops run as one program beside the embedding (Qwen3's
    # q/k norms included: they read the heads of the fused QKV output in place); from three,
    # projections run in the BLAS between them.
    ops = [call[0] for call in graphs.graphs[2].calls]
    assert ops == [torch.ops.aten.embedding.default, torch.ops.tokenmill.run_loaded_program.default]
    replays = []
    for size, graph in graphs.graphs.items():
        graph.replay = (lambda f, s: lambda: replays.append(s) or f())(graph.replay, size)
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert replays and set(replays) == {5}, "decode steps did not replay the graph of their size"


def test_drafted_decode_steps_replay_graphs_and_give_the_eager_tokens(tiny_model):
    """With n-gram drafts (the CPU default) a decode step's rows are its sequences'
    tokens and their drafts; up to the largest graph the step replays the graph of that
    many rows, and greedy tokens stay those of eager steps without drafts."""
    path = tiny_model("llama")
    prompts = [[5, 9, 2, 7] * 6, [3] * 11, [8, 1, 4] * 5]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    eager = LLM(
        path, dtype="float32", kv_cache_memory="64MiB", enforce_eager=True, speculative_config=None
    )
    expected = eager.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    llm = LLM(path, dtype="float32", kv_cache_memory="64MiB")
    assert llm.engine.args.speculative_config == "auto"
    pin_cheap_rows(llm.llm_engine)
    replays = []
    for size, graph in llm.engine.runner.graphs.graphs.items():
        graph.replay = (lambda f, s: lambda: replays.append(s) or f())(graph.replay, size)
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert max(replays) > 3, "no step verified drafts in a graph"
    assert llm.engine.stats().draft_tokens > 0


def test_deferred_graphs_are_captured_one_at_a_time_and_give_the_same_tokens(tiny_model):
    from tokenmill.engine.llm_engine import LLMEngine

    path = tiny_model("llama")
    prompts = [{"prompt_token_ids": p} for p in ([5, 9, 2, 7], [3] * 11, [8, 1, 4])]
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = LLM(path, dtype="float32", kv_cache_memory="64MiB", enforce_eager=True).generate(
        prompts, greedy, use_tqdm=False
    )
    llm = LLM(path, dtype="float32", kv_cache_memory="64MiB")
    llm.llm_engine = LLMEngine(llm.llm_engine.args, defer_graphs=True)
    runner = llm.llm_engine.runner
    assert runner.graphs.graphs == {} and runner.graphs.pending
    got = llm.generate(prompts, greedy, use_tqdm=False)  # eager until captured
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    steps = 1
    while runner.finish_start_up_step():
        steps += 1
    assert steps == 9  # the KV cache's commit, then a graph per batch size
    assert sorted(runner.graphs.graphs) == list(range(1, 9))
    assert not runner.finish_start_up_step()
    got = llm.generate(prompts, greedy, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]


def test_graphs_captured_between_drafted_steps_give_the_same_tokens(tiny_model):
    """A deferred capture that runs right after a step with drafts (the server captures
    in idle turns, mid-request) must not run over that step's query layout or slots."""
    from tokenmill.engine.llm_engine import LLMEngine

    path = tiny_model("llama")
    prompt = {"prompt_token_ids": [5, 9, 2, 7] * 6}
    greedy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    plain = LLM(
        path, dtype="float32", kv_cache_memory="64MiB", enforce_eager=True, speculative_config=None
    )
    expected = plain.generate([prompt], greedy, use_tqdm=False)[0].outputs[0].token_ids
    # Suffix decoding drafts a request's second run from its first one's output.
    suffix = {"method": "suffix", "num_speculative_tokens": 3}
    args = LLM(path, dtype="float32", kv_cache_memory="64MiB", speculative_config=suffix)
    engine = LLMEngine(args.llm_engine.args, defer_graphs=True)
    pin_cheap_rows(engine)
    engine.add_request("first", prompt, greedy)
    while engine.has_unfinished_requests():
        engine.step()
    engine.add_request("r", prompt, greedy)
    captures, out = 0, None
    while engine.has_unfinished_requests():
        drafted = engine.stats().draft_tokens
        for o in engine.step():
            out = o
        if engine.stats().draft_tokens > drafted and engine.runner.finish_start_up_step():
            captures += 1
    assert captures >= 2, "no graph was captured right after a drafted step"
    assert out.finished and out.outputs[0].token_ids == expected


def test_a_program_runs_every_native_op_as_the_op_itself():
    """One recorded run of every op that a program knows, replayed on new inputs: each
    must decode its arguments as its own schema has them."""
    tm = torch.ops.tokenmill
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, generator=g)
    gate_up = torch.randn(2, 128, generator=g)
    w = torch.randn(64, generator=g)
    dense = torch.randn(48, 64, generator=g)
    bias = torch.randn(48, generator=g)
    dense_q = torch.randn(128, 64, generator=g)
    qw = pack_tokenmill(torch.randint(0, 16, (40, 64), generator=g, dtype=torch.uint8))
    scales, zeros = torch.rand(40, 1, generator=g) + 0.1, torch.randn(40, 1, generator=g)
    key_cache = torch.randn(4, 2, 16, 32, generator=g)
    value_cache = torch.randn_like(key_cache)
    cos_sin = torch.randn(64, 32, generator=g)
    positions = torch.tensor([3, 9], dtype=torch.int32)
    slots = torch.tensor([5, 40], dtype=torch.int32)
    tables = torch.tensor([[1, 0], [3, 2]], dtype=torch.int32)
    lens = torch.tensor([6, 30], dtype=torch.int32)
    starts = torch.tensor([0, 1, 2], dtype=torch.int32)

    def forward():
        h = torch.empty(2, 64)
        tm.rms_norm(h, x, w, 1e-5)
        res = torch.empty(2, 64)
        res.copy_(x)
        h2 = torch.empty(2, 64)
        h2.copy_(h)
        tm.fused_add_rms_norm(h2, res, w, 1e-6)
        gelu, silu = torch.empty(2, 64), torch.empty(2, 64)
        tm.gelu_and_mul(gelu, gate_up, True)
        tm.silu_and_mul(silu, gate_up)
        q = torch.empty(2, 128)
        tm.linear(q, gelu, dense_q, None)
        lin = torch.empty(2, 48)
        tm.linear(lin, h2, dense, bias)
        i4 = torch.empty(2, 40)
        tm.int4_linear(i4, h2, qw, scales, zeros, 64)
        deq = torch.empty(37, 64)
        tm.int4_dequantize(deq, qw, scales, zeros, 64, 3)
        tm.rotary_embedding(positions, q, h2, 32, cos_sin, False)
        tm.reshape_and_cache(h2, h, key_cache, value_cache, slots)
        out = torch.empty(2, 128)
        tm.paged_attention(out, q, key_cache, value_cache, tables, lens, starts, 0.2, 0, 0.0, None)
        return torch.cat([out, lin, i4, deq[:2], res, silu], dim=1)

    graph = OpGraph()
    caches = key_cache.clone(), value_cache.clone()
    graph.capture(forward)
    ops = [call[0] for call in graph.calls]
    assert tm.run_loaded_program.default in ops
    for _ in range(2):
        for t in (x, gate_up, w):
            t.copy_(torch.randn(t.shape, generator=g))
        key_cache.copy_(caches[0]), value_cache.copy_(caches[1])
        got = graph.replay().clone()
        key_cache.copy_(caches[0]), value_cache.copy_(caches[1])
        torch.testing.assert_close(got, forward(), rtol=0, atol=0)
