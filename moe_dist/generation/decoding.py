"""Decoding strategies over a next-token function: greedy, beam search with a length penalty, top-p sampling.

Shape legend: B prompts (a batch), N rows scored in one call (live sequences over the batch), T tokens so
far (prompt + generated), V vocabulary, W beam width.

A strategy sees the model only through ``step(tokens_NT, rows_N) -> logprobs_NV``: the log-probabilities
of the next token after each row, where ``rows_N`` says which prompt (image) each row belongs to. So the
same code runs a CoCa model (generation/captioning.py) or a fixed toy table (the tests' brute force).
Every strategy returns, per prompt, the generated ids without the prompt and without the EOS.

Beam search, for each prompt:
    1. the live beams start as the prompt alone, score 0;
    2. each step scores every live beam's V continuations (cumulative log-probability) and keeps the W
       best candidates over all of them; a kept candidate ending in EOS is finished and leaves the beam
       (so fewer than W stay live), the others continue;
    3. it stops when no beam is live or ``max_new`` tokens are generated (live beams then finish as they are);
    4. the answer is the finished hypothesis with the best ``logprob / generated_length ** length_penalty``
       (the EOS counts in the length).
Width 1 is greedy decoding exactly; a width that keeps every candidate (V ** max_new) enumerates every
sequence, i.e. an exhaustive search. ``lockstep`` (expert parallelism: every rank must run the model equally
often) runs all ``max_new`` steps, scoring one placeholder row when nothing is live.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Tuple

import torch

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
STRATEGIES = ("greedy", "beam", "top_p")


@dataclass
class GenerationConfig:
    """How to decode. ``max_new``: most generated tokens (EOS included); ``beam_width`` and
    ``length_penalty`` for beam; ``top_p``, ``temperature`` and ``seed`` for top_p sampling."""

    strategy: str = "greedy"
    max_new: int = 30
    beam_width: int = 4
    length_penalty: float = 1.0
    top_p: float = 0.9
    temperature: float = 1.0
    seed: int = 0
    lockstep: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"decoding strategy {self.strategy!r} is unknown; use one of {', '.join(STRATEGIES)}")
        if self.max_new < 1 or self.beam_width < 1:
            raise ValueError(f"max length {self.max_new} and beam width {self.beam_width} must be >= 1")
        if not 0.0 < self.top_p <= 1.0 or self.temperature <= 0:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1] and temperature={self.temperature} be > 0")


def decode(step: Step, prompt_BT: torch.Tensor, eos_id: int, cfg: GenerationConfig) -> List[List[int]]:
    """Generated ids per prompt (all prompts of one length, BOS first); see the module docstring."""
    if cfg.strategy == "beam":
        return beam_search(step, prompt_BT, eos_id, cfg.max_new, cfg.beam_width, cfg.length_penalty, cfg.lockstep)
    return _sample(step, prompt_BT, eos_id, cfg)


def _sample(step: Step, prompt_BT: torch.Tensor, eos_id: int, cfg: GenerationConfig) -> List[List[int]]:
    """Greedy (argmax) or top-p sampling, all prompts advancing together; a row stops at its EOS."""
    B = prompt_BT.shape[0]
    generator = torch.Generator().manual_seed(cfg.seed)
    tokens_BT = prompt_BT
    done_B = torch.zeros(B, dtype=torch.bool)
    out: List[List[int]] = [[] for _ in range(B)]
    for _ in range(cfg.max_new):
        live_N = (~done_B).nonzero().flatten()
        if not len(live_N) and not cfg.lockstep:
            break
        rows_N = live_N if len(live_N) else torch.zeros(1, dtype=torch.long)
        logprobs_NV = step(tokens_BT[rows_N.to(tokens_BT.device)], rows_N).float().cpu()
        if not len(live_N):
            continue
        if cfg.strategy == "greedy":
            next_N = logprobs_NV.argmax(-1)
        else:
            next_N = _top_p_sample(logprobs_NV / cfg.temperature, cfg.top_p, generator)
        column_B = torch.full((B, 1), eos_id, dtype=tokens_BT.dtype)
        column_B[live_N, 0] = next_N.to(tokens_BT.dtype)
        tokens_BT = torch.cat([tokens_BT, column_B.to(tokens_BT.device)], 1)
        for row, token in zip(live_N.tolist(), next_N.tolist()):
            if token == eos_id:
                done_B[row] = True
            else:
                out[row].append(token)
    return out


def _top_p_sample(logits_NV: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token per row from the smallest set of most likely tokens whose probability reaches top_p."""
    probs_NV = torch.softmax(logits_NV, -1)
    sorted_NV, order_NV = probs_NV.sort(-1, descending=True)
    mass_before_NV = sorted_NV.cumsum(-1) - sorted_NV
    sorted_NV = sorted_NV * (mass_before_NV < top_p)  # the most likely token always stays
    choice_N = torch.multinomial(sorted_NV / sorted_NV.sum(-1, keepdim=True), 1, generator=generator)
    return order_NV.gather(1, choice_N).flatten()


def beam_search(step: Step, prompt_BT: torch.Tensor, eos_id: int, max_new: int, width: int,
                length_penalty: float = 1.0, lockstep: bool = False) -> List[List[int]]:
    """Beam search per prompt (outline in the module docstring); all prompts' live beams share each step call."""
    B = prompt_BT.shape[0]
    device = prompt_BT.device
    # per prompt: live (generated ids, cumulative logprob) and finished (normalised score, generated ids)
    live: List[List[Tuple[List[int], float]]] = [[([], 0.0)] for _ in range(B)]
    finished: List[List[Tuple[float, List[int]]]] = [[] for _ in range(B)]

    def finish(b: int, ids: List[int], logprob: float) -> None:
        finished[b].append((logprob / max(1, len(ids)) ** length_penalty, ids))

    for t in range(max_new):
        rows = [(b, i) for b in range(B) for i in range(len(live[b]))]
        if not rows and not lockstep:
            break
        prompts_N = torch.tensor([b for b, _ in rows] or [0], dtype=torch.long)
        gen_N = [live[b][i][0] for b, i in rows] or [[]]
        tokens_NT = torch.cat([prompt_BT[prompts_N.to(device)], torch.tensor(gen_N, dtype=prompt_BT.dtype,
                                                                               device=device).view(len(gen_N), t)], 1)
        logprobs_NV = step(tokens_NT, prompts_N).double().cpu()
        if not rows:
            continue
        V = logprobs_NV.shape[1]
        for b in range(B):
            mine = [n for n, (bb, _) in enumerate(rows) if bb == b]
            if not mine:
                continue
            base_N = torch.tensor([live[b][rows[n][1]][1] for n in mine], dtype=torch.float64)
            scores = (base_N[:, None] + logprobs_NV[mine]).flatten()
            best = scores.topk(min(width, scores.numel())).indices.tolist()
            survivors = []
            for flat in best:
                beam, token = divmod(flat, V)
                ids, logprob = live[b][rows[mine[beam]][1]][0], float(scores[flat])
                if token == eos_id:
                    finish(b, ids + [token], logprob)
                else:
                    survivors.append((ids + [token], logprob))
            live[b] = survivors
    for b in range(B):
        for ids, logprob in live[b]:  # out of length: finish as they are
            finish(b, ids, logprob)
    out = []
    for b in range(B):
        score, ids = max(finished[b], key=lambda f: f[0])
        out.append([i for i in ids if i != eos_id])
    return out
