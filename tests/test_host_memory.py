"""CPU weights moved onto huge pages keep their values, dtypes and sharing."""

import pytest
import torch
from tokenmill.host_memory import huge_page_empty, move_to_huge_pages
from torch import nn


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 12)
        self.proj = nn.Linear(12, 7).to(torch.bfloat16)
        self.head = nn.Linear(12, 50, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("table", torch.arange(30, dtype=torch.int32).view(5, 6))


def test_moved_weights_keep_values_dtypes_and_sharing():
    model = Tied()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moved = move_to_huge_pages(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert model.head.weight is model.embed.weight  # still one parameter
    assert isinstance(model.proj.weight, nn.Parameter)
    # One arena: every tensor lies within the bytes moved, counted once for the tied pair.
    tensors = [model.embed.weight, model.proj.weight, model.proj.bias, model.table]
    starts = [t.data_ptr() for t in tensors]
    ends = [t.data_ptr() + t.numel() * t.element_size() for t in tensors]
    assert max(ends) - min(starts) <= moved
    assert moved >= sum(t.numel() * t.element_size() for t in tensors)
    x = torch.tensor([[3, 4]])
    logits = model.head(model.embed(x))
    torch.testing.assert_close(logits, before["embed.weight"][x] @ before["embed.weight"].t())


def test_huge_page_empty_is_a_writable_tensor_of_the_shape():
    t = huge_page_empty((3, 4, 5), torch.bfloat16)
    assert t.shape == (3, 4, 5) and t.dtype == torch.bfloat16 and t.is_contiguous()
    t.copy_(torch.randn(3, 4, 5))
    assert t.abs().sum() > 0


def test_the_cgroup_limit_bounds_the_memory_a_process_may_take(tmp_path, monkeypatch):
    from tokenmill import cpu_policy

    assert cpu_policy.cgroup_memory_headroom(str(tmp_path)) is None  # no cgroup files
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert cpu_policy.cgroup_memory_headroom(str(tmp_path)) is None
    (tmp_path / "memory.max").write_text(f"{2 << 30}\n")
    (tmp_path / "memory.current").write_text(f"{512 << 20}\n")
    assert cpu_policy.cgroup_memory_headroom(str(tmp_path)) == (2 << 30) - (512 << 20)
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{1 << 30}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{256 << 20}\n")
    assert cpu_policy.cgroup_memory_headroom(str(v1)) == (1 << 30) - (256 << 20)
    (v1 / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cpu_policy.cgroup_memory_headroom(str(v1)) is None
    # a pod's limit, not the host's free memory, sizes the default KV cache
    monkeypatch.setattr(cpu_policy, "cgroup_memory_headroom", lambda: 600 << 20)
    assert cpu_policy.available_memory_bytes() == 600 << 20
    assert cpu_policy.default_cpu_kv_budget() <= 300 << 20


def test_kv_memory_commits_in_the_background_without_touching_data():
    import os
    import platform

    from tokenmill.host_memory import commit_in_background

    major, minor = (int(x) for x in platform.release().split(".")[:2])
    if (major, minor) < (5, 14):
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14")

    def rss_kib():
        with open(f"/proc/{os.getpid()}/status") as f:
            return int(f.read().split("VmRSS:")[1].split()[0])

    t = huge_page_empty((64 << 20,), torch.uint8, huge=False)
    t[123] = 7  # a write before the commit survives it
    before = rss_kib()
    commit_in_background(t).join()
    assert rss_kib() - before > 60 << 10
    assert t[123] == 7 and int(t.count_nonzero()) == 1
