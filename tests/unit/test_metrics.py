"""The trainer's metric reads: every device tensor of a logging step in one copy, values unchanged."""

import torch

from moe_dist.engine.metrics import read_scalars, stats_to_host


def test_read_scalars_reads_tensors_numbers_and_none_in_order():
    bf16 = torch.tensor(0.1, dtype=torch.bfloat16)
    values = {"loss": torch.tensor(1.5), "count": torch.tensor([2]), "lr": 3e-4, "norm": None, "scale": bf16,
              "skipped": 4}
    out = read_scalars(values)
    assert out == {"loss": 1.5, "count": 2.0, "lr": 3e-4, "norm": 0.0, "scale": float(bf16), "skipped": 4.0}
    assert list(out) == list(values) and all(type(v) is float for v in out.values())


def test_stats_on_the_host_are_returned_as_they_are():
    stats = {"layer0": {"tokens_per_expert": torch.tensor([3, 0, 5]), "router_entropy": torch.tensor(0.7)}}
    assert stats_to_host(stats) is stats
