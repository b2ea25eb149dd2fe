"""Recorded operator graphs (the CPU's decode graphs): a replay computes what
the forward computes on the inputs of the moment."""

import pytest
import torch
from tokenmill import LLM, SamplingParams
from tokenmill.engine.decode_graphs import DecodeGraphs
from tokenmill.engine.op_graph import GraphCaptureError, OpGraph


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
    llm = LLM(path, dtype="float32", kv_cache_memory="64MiB")
    graphs = llm.engine.runner.graphs
    assert sorted(graphs.graphs) == [1, 2, 4, 8]
    # The layers' native ops run as programs; Llama's as one, beside the embedding.
    ops = [call[0] for call in graphs.graphs[8].calls]
    assert torch.ops.tokenmill.run_program.default in ops
    if arch == "llama":
        assert ops == [torch.ops.aten.embedding.default, torch.ops.tokenmill.run_program.default]
    replays = []
    for size, graph in graphs.graphs.items():
        graph.replay = (lambda f, s: lambda: replays.append(s) or f())(graph.replay, size)
    got = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in expected]
    assert replays and set(replays) == {8}, "decode steps did not replay the graph of their size"
