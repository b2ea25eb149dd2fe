"""Property tests of the native block manager and scheduler through the binding."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from tokenmill import _core


def make_scheduler(
    num_blocks=24, block_size=4, budget=32, max_model_len=64, max_num_seqs=8, prefix=True
):
    c = _core.SchedulerConfig()
    c.num_blocks, c.block_size, c.max_num_batched_tokens = num_blocks, block_size, budget
    c.max_model_len, c.max_num_seqs, c.enable_prefix_caching = max_model_len, max_num_seqs, prefix
    return _core.Scheduler(c)


def params(max_tokens, n=1, eos=-1):
    p = _core.RequestParams()
    p.max_tokens, p.n, p.eos_token_id = max_tokens, n, eos
    return p


def next_token(tokens):
    """A stand-in model: the next token depends only on the sequence so far."""
    return (sum(tokens[-3:]) * 31 + len(tokens)) % 97


class Driver:
    """Runs a scheduler with the stand-in model and records every sequence's tokens."""

    def __init__(self, sched):
        self.sched = sched
        self.tokens = {}  # seq id -> tokens
        self.owner = {}  # seq id -> request id
        self.finished = {}  # seq id -> tokens at finish

    def add(self, rid, prompt, p):
        sid = self.sched.add_request(rid, prompt, p)
        self.tokens[sid], self.owner[sid] = list(prompt), rid
        return sid

    def step(self):
        out = self.sched.schedule()
        sampled = []
        for sid, k in zip(out.seq_ids, out.num_samples, strict=True):
            base = self.tokens[int(sid)]
            sampled += [next_token(base) + j for j in range(int(k))]
        result = self.sched.update(out, np.array(sampled, dtype=np.int32))
        children = {}
        for e in result.of(_core.EventKind.FORKED):
            children.setdefault(e.parent, []).append(e.seq_id)
        i = 0
        for sid, k in zip(out.seq_ids, out.num_samples, strict=True):
            sid = int(sid)
            targets = [sid, *children.get(sid, [])]
            for j, t in enumerate(targets[: int(k)]):
                if t != sid:
                    self.tokens[t], self.owner[t] = list(self.tokens[sid]), self.owner[sid]
                    self.tokens[t].append(sampled[i + j])
            if int(k):
                self.tokens[sid].append(sampled[i])
            i += int(k)
        for f in result.of(_core.EventKind.FINISHED):
            self.finished[f.seq_id] = list(self.tokens[f.seq_id])
        return out

    def run(self, limit=2000):
        steps = 0
        while self.sched.has_unfinished() and steps < limit:
            self.step()
            self.sched.check_invariants()
            steps += 1
        assert not self.sched.has_unfinished(), "did not finish"


@st.composite
def workloads(draw):
    n = draw(st.integers(1, 8))
    return [
        (
            draw(st.lists(st.integers(0, 96), min_size=1, max_size=30)),
            draw(st.integers(1, 20)),
            draw(st.sampled_from([1, 1, 2, 3])),
        )
        for _ in range(n)
    ]


@given(work=workloads(), prefix=st.booleans())
@settings(
    max_examples=int(os.environ.get("TOKENMILL_EXAMPLES", 40)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_preemption_gives_the_same_tokens(work, prefix):
    work = [
        w for w in work if w[2] * -(-min(len(w[0]) + w[1], 64) // 4) <= 17
    ]  # the rest is refused
    results = []
    for blocks in (200, 17):  # plenty, then tight enough to preempt
        d = Driver(make_scheduler(num_blocks=blocks, prefix=prefix))
        for rid, (prompt, max_tokens, n) in enumerate(work):
            d.add(rid, prompt, params(max_tokens, n))
        d.run()
        assert d.sched.stats().num_free_blocks == blocks
        results.append(sorted(map(tuple, d.finished.values())))
    assert results[0] == results[1]


class SchedulerMachine(RuleBasedStateMachine):
    """Random interleavings of add, step, abort and finish keep every invariant."""

    @initialize(
        blocks=st.integers(16, 40), block_size=st.sampled_from([2, 4]), budget=st.integers(4, 48)
    )
    def setup(self, blocks, block_size, budget):
        self.d = Driver(
            make_scheduler(
                num_blocks=blocks, block_size=block_size, budget=budget, max_model_len=32
            )
        )
        self.block_size, self.num_blocks = block_size, blocks
        self.next_id = 0
        self.live = set()

    @rule(
        prompt=st.lists(st.integers(0, 96), min_size=1, max_size=24),
        max_tokens=st.integers(1, 8),
        n=st.integers(1, 3),
    )
    def add(self, prompt, max_tokens, n):
        bs, blocks = self.block_size, self.num_blocks
        fits = n * -(-min(len(prompt) + max_tokens, 32) // bs) <= blocks
        try:
            self.d.add(self.next_id, prompt, params(max_tokens, n))
        except ValueError:
            assert not fits, "a request that fits was refused"
            return
        assert fits, "a request that can never fit was accepted"
        self.live.add(self.next_id)
        self.next_id += 1

    @rule(data=st.data())
    def abort(self, data):
        if self.live:
            rid = data.draw(st.sampled_from(sorted(self.live)))
            self.d.sched.abort_request(rid)
            self.live.discard(rid)

    @rule(data=st.data())
    def finish_one_sequence(self, data):
        running = [s for s in self.d.tokens if self.d.sched.block_table(s)]
        if running:
            self.d.sched.finish_sequence(data.draw(st.sampled_from(running)), "stop")

    @rule()
    def step(self):
        self.d.step()

    @invariant()
    def consistent(self):
        if hasattr(self, "d"):
            self.d.sched.check_invariants()

    def teardown(self):
        if hasattr(self, "d"):
            for rid in range(self.next_id):
                self.d.sched.abort_request(rid)
            self.d.sched.check_invariants()
            st_ = self.d.sched.stats()
            assert st_.num_free_blocks == st_.num_blocks


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(
    max_examples=int(os.environ.get("TOKENMILL_EXAMPLES", 60)),
    stateful_step_count=40,
    deadline=None,
)


def test_prefix_hits_reuse_the_same_physical_blocks():
    d = Driver(make_scheduler(num_blocks=64, block_size=4))
    prompt = list(range(1, 18))
    a = d.add(0, prompt, params(10))
    d.step()
    b = d.add(1, prompt + [50, 51], params(10))
    out = d.step()
    table_a, table_b = d.sched.block_table(a), d.sched.block_table(b)
    assert table_b[:4] == table_a[:4]
    assert d.sched.stats().prefix_hits >= 4
    row = list(out.seq_ids).index(b)
    assert out.positions[out.query_start_loc[row]] == 16  # only the uncached tail is computed


def test_group_of_n_shares_prompt_blocks():
    d = Driver(make_scheduler(num_blocks=300, block_size=16, max_model_len=1024, budget=1024))
    d.add(0, list(range(512)), params(8, n=8))
    d.step()
    used_one = 32  # 512 tokens / 16
    used = 300 - d.sched.stats().num_free_blocks
    assert used == used_one  # forked children hold references, not copies
    d.step()
    used = 300 - d.sched.stats().num_free_blocks
    assert used <= 1.5 * used_one + 8


def test_bad_requests_are_value_errors_and_the_scheduler_keeps_going():
    d = Driver(make_scheduler())
    with pytest.raises(ValueError, match="max_model_len"):
        d.add(0, list(range(65)), params(4))
    with pytest.raises(ValueError, match="at least one token"):
        d.add(1, [], params(4))
    with pytest.raises(ValueError, match="n must be"):
        d.add(2, [1, 2], params(4, n=100))
    d.add(3, [1, 2, 3], params(4))
    d.run()
    assert len(d.finished) == 1
