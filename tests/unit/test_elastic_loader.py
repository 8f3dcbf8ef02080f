"""Elastic resume of the exact-mode stream (issue 14): a state taken mid-epoch at one layout (ranks x
workers) resumes at another, and the two parts together deliver every sample of the epoch exactly once.

Each loader here is one rank of the layout, run in this process (the loader needs no process group);
the 200 CSV captions are unique, so counting captions counts sample keys. A rank that runs out before
the common step count repeats its last samples (``padded``, always at its end): those are dropped
before counting.
"""

import pytest
import torch

from data_tools.shard import ShardOptions, shard
from helpers.data import make_csv
from moe_dist.data import LoaderConfig, ShardLoader, merge_states
from moe_dist.text import SentencePieceTokenizer, train_sentencepiece

N = 200
ALL = sorted(f"caption number {i}" for i in range(N))


@pytest.fixture(scope="module")
def tokenizer():
    return SentencePieceTokenizer(train_sentencepiece([f"caption number {i}" for i in range(300)], vocab_size=40),
                                  context_length=24)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic")
    shard(make_csv(root, N), str(root / "out"), ShardOptions(per_shard=25), progress=False)  # 8 shards of 25
    return str(root / "out")


def _loader(spec, tokenizer, rank, world, workers):
    cfg = LoaderConfig(spec=spec, batch_size=10, workers=workers, image_size=16, train_transform=False,
                       shuffle_buffer=20, seed=3)
    return ShardLoader(cfg, tokenizer, rank=rank, world_size=world)


def _delivered(loader, batches, tokenizer):
    rows = [c for b in batches for c in tokenizer.decode(b.tokens)]
    padded = loader.last_epoch_stats.get("padded", 0) if loader.last_epoch_stats else 0
    return rows[:len(rows) - padded]


def _first_part(spec, tokenizer, world, workers, steps):
    """Each rank of the first layout runs ``steps`` batches; returns (captions delivered, states)."""
    seen, states = [], []
    for rank in range(world):
        loader = _loader(spec, tokenizer, rank, world, workers)
        it = iter(loader)
        seen += [c for _ in range(steps) for c in tokenizer.decode(next(it).tokens)]
        states.append(loader.state_dict())
    return seen, states


def _second_part(spec, tokenizer, world, workers, state):
    """Each rank of the second layout resumes ``state`` and runs to the epoch's end."""
    seen = []
    for rank in range(world):
        loader = _loader(spec, tokenizer, rank, world, workers)
        loader.load_state_dict(state)
        assert loader.epoch == 0
        seen += _delivered(loader, list(loader), tokenizer)
        assert loader.epoch == 1  # the epoch ended; the next one is whole again
    return seen


@pytest.mark.parametrize("first, second, steps", [((2, 2), (1, 1), 4), ((1, 2), (2, 1), 7)],
                         ids=["2x2-to-1x1", "1x2-to-2x1"])
def test_elastic_resume_delivers_every_sample_once(first, second, steps, spec, tokenizer):
    head, states = _first_part(spec, tokenizer, *first, steps)
    assert len(head) == first[0] * steps * 10 and len(set(head)) == len(head)
    tail = _second_part(spec, tokenizer, *second, merge_states(states))
    assert sorted(head + tail) == ALL  # each sample of the epoch exactly once over both parts


def test_one_rank_state_of_a_larger_run_is_refused_at_another_layout(spec, tokenizer):
    _, states = _first_part(spec, tokenizer, 2, 1, 2)
    with pytest.raises(ValueError, match=r"holds only its part of the epoch: load moe_dist.data.merge_states"):
        _loader(spec, tokenizer, 0, 1, 1).load_state_dict(states[0])
    with pytest.raises(ValueError, match="one loader state per rank"):
        merge_states(states[:1])


def test_merged_state_at_the_same_layout_resumes_exactly(spec, tokenizer):
    """The merged (global) state still continues each rank's batch sequence exactly at its own layout."""
    full = [b.tokens for b in _loader(spec, tokenizer, 1, 2, 2)]
    _, states = _first_part(spec, tokenizer, 2, 2, 3)
    resumed = _loader(spec, tokenizer, 1, 2, 2)
    resumed.load_state_dict(merge_states(states))
    tail = [b.tokens for b in resumed]
    assert len(tail) == len(full) - 3 and all(torch.equal(a, b) for a, b in zip(tail, full[3:]))
