"""Decoding strategies: beam search against an exhaustive search on a toy model, width 1 == greedy, top-p."""

import itertools
import math

import pytest
import torch

from moe_dist.generation import GenerationConfig, beam_search, decode
from moe_dist.generation.decoding import _top_p_sample

V, EOS, BOS = 4, 3, 2


def toy_step(seed: int, prompts: int, max_len: int = 8):
    """A fixed toy model: next-token log-probs depend on (prompt row, position, last token) via a random table."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(prompts, max_len + 2, V, V, generator=g, dtype=torch.float64).mul(2).log_softmax(-1)

    def step(tokens_NT, rows_N):
        T = tokens_NT.shape[1]
        return table[rows_N, T - 1, tokens_NT[:, -1]]

    return step, table


def brute_force(table, row: int, prompt_len: int, max_new: int, length_penalty: float, penalty: float = 1.0,
                min_length: int = 0):
    """Every sequence that ends with EOS within max_new tokens or runs max_new tokens without one. Each
    step's log-probabilities are constrained as the decoding docstring says, written out in floats: tokens
    already generated get logprob x penalty, EOS is impossible before min_length tokens, then the row is
    renormalised (log-sum-exp; a no-op without constraints)."""
    best = (-math.inf, None)
    for length in range(1, max_new + 1):
        for seq in itertools.product(range(V), repeat=length):
            if EOS in seq[:-1] or (length < max_new and seq[-1] != EOS):
                continue
            last, logprob = BOS, 0.0
            for i, token in enumerate(seq):
                row_lp = [float(x) for x in table[row, prompt_len + i - 1, last]]
                row_lp = [lp * penalty if t in seq[:i] else lp for t, lp in enumerate(row_lp)]
                if i < min_length:
                    row_lp[EOS] = -math.inf
                logprob += row_lp[token] - math.log(sum(math.exp(lp) for lp in row_lp))
                last = token
            score = logprob / length ** length_penalty
            if score > best[0]:
                best = (score, [t for t in seq if t != EOS])
    return best[1]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beam_equals_exhaustive_search(length_penalty):
    max_new, B = 4, 3
    step, table = toy_step(seed=int(length_penalty * 10), prompts=B)
    prompt = torch.full((B, 1), BOS)
    # a width that keeps every candidate (V ** max_new) enumerates every sequence
    got = beam_search(step, prompt, EOS, max_new, width=V ** max_new, length_penalty=length_penalty)
    assert got == [brute_force(table, b, 1, max_new, length_penalty) for b in range(B)]


@pytest.mark.parametrize("seed", range(5))
def test_width_one_is_greedy(seed):
    step, _ = toy_step(seed, prompts=4)
    prompt = torch.full((4, 1), BOS)
    greedy = decode(step, prompt, EOS, GenerationConfig(strategy="greedy", max_new=6))
    beam = decode(step, prompt, EOS, GenerationConfig(strategy="beam", beam_width=1, max_new=6))
    assert greedy == beam
    # by hand: greedy follows the argmax of the table from BOS
    step_fn, table = toy_step(seed, prompts=4)
    last, expected = BOS, []
    for pos in range(6):
        last = int(table[0, pos, last].argmax())
        if last == EOS:
            break
        expected.append(last)
    assert greedy[0] == expected


def test_max_new_one_and_lockstep_calls():
    calls = []
    step, _ = toy_step(7, prompts=2)

    def counting(tokens, rows):
        calls.append(tokens.shape[0])
        return step(tokens, rows)

    prompt = torch.full((2, 1), BOS)
    out = decode(counting, prompt, EOS, GenerationConfig(max_new=1))
    assert len(calls) == 1 and all(len(o) <= 1 for o in out)
    # lockstep (expert parallelism) runs every step even when every row has finished
    table_eos = torch.full((2, 10, V, V), -1e9, dtype=torch.float64)
    table_eos[..., EOS] = 0.0
    calls.clear()
    out = decode(lambda t, r: (calls.append(1), table_eos[r, t.shape[1] - 1, t[:, -1]])[1], prompt, EOS,
                 GenerationConfig(max_new=5, lockstep=True))
    assert out == [[], []] and len(calls) == 5
    for strategy in ("beam", "top_p"):
        calls.clear()
        decode(lambda t, r: (calls.append(1), table_eos[r, t.shape[1] - 1, t[:, -1]])[1], prompt, EOS,
               GenerationConfig(strategy=strategy, max_new=5, lockstep=True))
        assert len(calls) == 5


def test_top_p_keeps_the_smallest_nucleus():
    # probabilities 0.5, 0.3, 0.2: top_p 0.6 keeps {0, 1} (0.5 < 0.6, 0.8 >= 0.6), renormalised to 5/8, 3/8
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(4000, 3)
    draws = _top_p_sample(logits, 0.6, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=3).double() / 4000
    assert counts[2] == 0
    assert counts[0] == pytest.approx(5 / 8, abs=0.03)
    # a tiny top_p is greedy
    assert _top_p_sample(logits[:5], 1e-6, torch.Generator()).tolist() == [0] * 5


def test_bad_generation_config():
    with pytest.raises(ValueError, match="strategy"):
        GenerationConfig(strategy="nucleus")
    with pytest.raises(ValueError, match="max length"):
        GenerationConfig(max_new=0)


def test_repetition_penalty_and_min_length_hand_worked():
    from moe_dist.generation.decoding import constrain

    # probabilities (1/2, 1/4, 1/4), token 0 already generated, penalty 2: 2 log 1/2 = log 1/4, so all three
    # tokens have 1/4 before renormalising and 1/3 after
    lp = torch.tensor([[0.5, 0.25, 0.25]], dtype=torch.float64).log()
    torch.testing.assert_close(constrain(lp, [[0]], eos_id=2, repetition_penalty=2.0),
                               torch.full((1, 3), 1 / 3, dtype=torch.float64).log())
    # min_length 2 after one generated token: EOS (id 2) is out, the rest renormalise to (2/3, 1/3)
    torch.testing.assert_close(constrain(lp, [[1]], eos_id=2, min_length=2),
                               torch.tensor([[2 / 3, 1 / 3, 0.0]], dtype=torch.float64).log())
    assert constrain(lp, [[0]], eos_id=2) is lp  # neither option: untouched


@pytest.mark.parametrize("penalty,min_length", [(1.7, 0), (1.0, 2), (2.5, 3)])
def test_wide_beam_with_constraints_equals_exhaustive_search(penalty, min_length):
    max_new, B = 4, 3
    step, table = toy_step(seed=7, prompts=B)
    prompt = torch.full((B, 1), BOS)
    got = beam_search(step, prompt, EOS, max_new, width=V ** max_new, length_penalty=1.0,
                      repetition_penalty=penalty, min_length=min_length)
    assert got == [brute_force(table, b, 1, max_new, 1.0, penalty, min_length) for b in range(B)]


def test_greedy_respects_min_length_and_penalty():
    step, table = toy_step(seed=3, prompts=6)
    prompt = torch.full((6, 1), BOS)
    plain = decode(step, prompt, EOS, GenerationConfig(max_new=6))
    longer = decode(step, prompt, EOS, GenerationConfig(max_new=6, min_length=3))
    assert all(len(ids) >= 3 for ids in longer) and any(len(ids) < 3 for ids in plain)  # it binds on this table
    # a penalty so strong that a token once generated is never the argmax again while another is left
    distinct = decode(step, prompt, EOS, GenerationConfig(max_new=3, repetition_penalty=1e6))
    assert all(len(set(ids)) == len(ids) for ids in distinct)
    with pytest.raises(ValueError, match="repetition_penalty"):
        GenerationConfig(repetition_penalty=0.5)
    with pytest.raises(ValueError, match="min_length"):
        GenerationConfig(max_new=3, min_length=3)
