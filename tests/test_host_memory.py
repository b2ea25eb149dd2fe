"""CPU weights moved onto huge pages keep their values, dtypes and sharing."""

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
