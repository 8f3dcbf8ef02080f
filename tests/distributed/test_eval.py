"""``evaluate`` on 2 ranks equals 1 process exactly (fp32), with a randomly initialised tiny model: every
task, capacity mode, and a spec of one shard (one rank reads nothing). With ep_size=2 the ranks keep their
expert all-to-alls paired while one has no data, and agree with the ep_size=1 model."""

import pytest
import torch

from helpers.harness import run_ranks
from helpers.train import make_synth


def _model(ep_size):
    from moe_dist.models import create_model

    torch.manual_seed(0)  # the same weights on every rank
    full = create_model("moe-clip-tiny")
    if ep_size == 1:
        return full
    model = create_model("moe-clip-tiny", ep_size=ep_size)
    rank = torch.distributed.get_rank()
    reference = dict(full.named_parameters())
    with torch.no_grad():
        for name, param in model.named_parameters():
            source = reference[name]
            if param.shape != source.shape:  # stacked expert weights [E_local, ...] of this rank
                source = source[rank * param.shape[0]: (rank + 1) * param.shape[0]]
            param.copy_(source)
    return model


def _evaluate_all(rank, world_size, data_dir, ep_size):
    from moe_dist.evaluation import evaluate
    from moe_dist.text.tokenizer import get_tokenizer

    model = _model(ep_size)
    tokenizer = get_tokenizer(str(data_dir / "tok.model"), model.cfg.text.context_length)
    common = dict(batch_size=16, classes=str(data_dir / "classes.json"), rank=rank, world_size=world_size,
                  progress=False)
    runs = {"train": evaluate(model, tokenizer, str(data_dir / "train"), **common),
            "val_one_shard": evaluate(model, tokenizer, str(data_dir / "val"), **common)}
    if ep_size == 1:
        runs["train_capacity"] = evaluate(model, tokenizer, str(data_dir / "train"), tasks="zeroshot,loss",
                                          dropless=False, **common)
    return {name: (r.to_json(), r.scalars()) for name, r in runs.items()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("synth"), n=240)  # train: 6 shards, 219 samples; val: 1, 21


@pytest.fixture(scope="module")
def one_process(synth):
    return run_ranks(_evaluate_all, world_size=1, args=(synth, 1))[0]


@pytest.mark.world_size(2)
def test_two_ranks_equal_one_process_exactly(synth, one_process):
    ranks = run_ranks(_evaluate_all, world_size=2, args=(synth, 1))
    assert ranks[0] == ranks[1]  # every rank computes the same metrics
    for name, (report, scalars) in one_process.items():
        two_report, two_scalars = ranks[0][name]
        assert two_report["samples"]["ranks"] == 2
        two_report["samples"]["ranks"] = 1
        assert two_report == report, name  # exact: embeddings, losses and routing counts bit for bit
        assert two_scalars.keys() == scalars.keys()
    assert one_process["train"][0]["samples"]["evaluated"] == 219
    assert one_process["val_one_shard"][0]["samples"]["evaluated"] == 21
    assert "routing/dropped_fraction" in one_process["train_capacity"][1]


@pytest.mark.world_size(2)
def test_expert_parallel_eval_with_an_idle_rank(synth, one_process):
    ranks = run_ranks(_evaluate_all, world_size=2, args=(synth, 2))
    assert ranks[0] == ranks[1]
    for name in ("train", "val_one_shard"):  # val: rank 1 has no shard and runs dummy batches
        got, want = dict(ranks[0][name][1]), dict(one_process[name][1])
        assert (got.pop("samples/ranks"), want.pop("samples/ranks")) == (2, 1)
        assert got["samples/evaluated"] == want["samples/evaluated"]
        # experts on another rank see other token groupings: equal up to fp32 rounding, not bit for bit
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5), name
