"""Text generation with a CoCa model: captions (empty prompt) and answers (a "question: ... answer:" prompt).

Shape legend: B images, P image tokens, W decoder width, T prompt + generated tokens, V vocabulary.

Prompts are BOS + the prompt's pieces (no EOS); decoding continues after them. Prompts of different token
lengths run as separate groups (positions are absolute, so rows of one call share a length), each with
the image tokens computed once. MoE routing is dropless in eval mode, so a token's logits never depend on
the other rows of a call: batched decoding equals one-by-one decoding.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch

from ..models.moe_blocks import collect_moe_outputs, eval_routing
from .decoding import GenerationConfig, Step, beam_candidates, decode

VQA_PROMPT = "question: {question} answer:"


def vqa_prompt(question: str) -> str:
    """The prompt VQA training text starts with and VQA decoding continues: "question: Q answer:"."""
    return VQA_PROMPT.format(question=question.strip())


def vqa_text(question: str, answer: str) -> str:
    """The training text of a question/answer pair: the prompt followed by the answer."""
    return f"{vqa_prompt(question)} {answer.strip()}"


def check_generative(model, where: str) -> None:
    """ValueError unless ``model`` can generate text (a CoCa model)."""
    model = getattr(model, "module", model)
    if not hasattr(model, "decode"):
        raise ValueError(f"{where} holds a {getattr(model.cfg, 'kind', type(model).__name__)!r} model, not a "
                         "captioning model: captions and VQA need model.kind='coca' "
                         "(e.g. configs/models/coca-tiny.json)")


def prompt_ids(tokenizer, prompt: str) -> List[int]:
    """BOS + the prompt's pieces (an empty prompt is BOS alone)."""
    return [tokenizer.bos_id] + (tokenizer.pieces([prompt])[0] if prompt.strip() else [])


def model_step(model, memory_BPW: torch.Tensor, tokenizer=None) -> Step:
    """The next-token log-probabilities of ``model`` for rows of ``memory_BPW`` (the rows' images). With a
    tokenizer, ids it cannot decode (past its vocabulary; the model's may be larger), padding and BOS are
    never generated."""
    banned_V = None
    if tokenizer is not None:
        V = model.cfg.text.vocab_size
        banned_V = torch.arange(V, device=memory_BPW.device) >= getattr(tokenizer, "vocab_size", V)
        banned_V[[tokenizer.pad_id, tokenizer.bos_id]] = True

    def step(tokens_NT: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
        logits_NV = model.decode(memory_BPW[rows_N.to(memory_BPW.device)], tokens_NT)[:, -1].float()
        if banned_V is not None:
            logits_NV = logits_NV.masked_fill(banned_V, float("-inf"))
        return logits_NV.log_softmax(-1)

    return step


@torch.no_grad()
def generate(model, tokenizer, images: torch.Tensor, prompts: Optional[Sequence[str]] = None,
             cfg: Optional[GenerationConfig] = None) -> List[str]:
    """Decoded continuations, one per image.

    Args:
        model: a CoCa model (or its DeepSpeed engine), on its device; it runs in eval mode with dropless
            routing (restored afterwards), so a token's logits never depend on the other tokens.
        tokenizer: the model's tokenizer (``pieces``, ``decode``, ``bos_id``, ``eos_id``).
        images: [B, 3, S, S] on the model's device and dtype.
        prompts: one prompt per image ("" or None: captioning).
        cfg: GenerationConfig (greedy, at most 30 tokens by default); ``max_new`` is capped so that prompt
            and continuation fit the model's context length.
    Returns:
        B strings: the generated text after each prompt, EOS removed.
    """
    model = getattr(model, "module", model)
    check_generative(model, "this model")
    with eval_routing(model, dropless=True):
        return _generate(model, tokenizer, images, prompts, cfg or GenerationConfig())


def _lockstep_lengths(groups: Dict[int, List[int]]) -> List[int]:
    """Under expert parallelism every rank decodes the same prompt-length groups in the same order: the
    lengths other ranks have and this one lacks (it decodes a placeholder for each, first)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return []
    everyone: List[Optional[List[int]]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, sorted(groups))
    return sorted({n for lengths in everyone for n in lengths} - set(groups))


def _fitted(cfg: GenerationConfig, room: int) -> GenerationConfig:
    """``cfg`` with at most ``room`` new tokens (what the context leaves after a prompt), the minimum length
    cut to leave the EOS room."""
    max_new = min(cfg.max_new, room)
    return dataclasses.replace(cfg, max_new=max_new, min_length=min(cfg.min_length, max_new - 1))


def _reranked(model, tokenizer, image_BD, memory_BPW, prompt_BT, prompts: List[str],
              cfg: GenerationConfig) -> List[str]:
    """Beam search, then per image the finished beam with the best beam score + ``cfg.rerank`` x cosine
    similarity between the image's embedding and the text tower's embedding of prompt + continuation. One
    text-tower call per group, on every rank (lockstep)."""
    from ..models.clip import text_to_device

    found = beam_candidates(model_step(model, memory_BPW, tokenizer), prompt_BT, tokenizer.eos_id, cfg.max_new,
                            cfg.beam_width, cfg.length_penalty, cfg.lockstep, cfg.repetition_penalty, cfg.min_length)
    texts = [[tokenizer.decode(torch.tensor([ids], dtype=torch.long))[0].strip() for _, ids in c] for c in found]
    flat = [(b, text) for b, candidates in enumerate(texts) for text in candidates]
    full = [" ".join(filter(None, [prompts[b].strip(), text])) for b, text in flat]
    text_ND = model.encode_text(text_to_device(model, tokenizer(full), image_BD.device)).float()
    owner_N = torch.tensor([b for b, _ in flat], device=image_BD.device)
    cosine_N = (text_ND * image_BD.float()[owner_N]).sum(-1).cpu().tolist()
    out, n = [], 0
    for b, candidates in enumerate(found):
        scores = [score + cfg.rerank * cosine_N[n + i] for i, (score, _) in enumerate(candidates)]
        out.append(texts[b][max(range(len(scores)), key=scores.__getitem__)])
        n += len(candidates)
    return out


def _generate(model, tokenizer, images, prompts, cfg: GenerationConfig) -> List[str]:
    prompts = list(prompts) if prompts is not None else [""] * images.shape[0]
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images; give one prompt per image")
    context = model.cfg.text.context_length
    device = images.device
    image_BD, memory_BPW = model.encode_image_tokens(images)
    groups: Dict[int, List[int]] = defaultdict(list)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    for b, prompt in enumerate(ids):
        if len(prompt) >= context:
            raise ValueError(f"prompt {prompts[b]!r} has {len(prompt)} tokens with BOS; the model's context is "
                             f"{context}, so it leaves no room to generate: shorten it")
        groups[len(prompt)].append(b)
    out: List[str] = [""] * len(prompts)
    for length in _lockstep_lengths(groups) if cfg.lockstep else []:  # lengths only other ranks decode
        dummy_cfg = _fitted(cfg, context - length)
        prompt_1T = torch.full((1, length), tokenizer.bos_id, dtype=torch.long, device=device)
        if cfg.rerank:
            _reranked(model, tokenizer, image_BD[:1], memory_BPW[:1], prompt_1T, [""], dummy_cfg)
        else:
            decode(model_step(model, memory_BPW[:1], tokenizer), prompt_1T, tokenizer.eos_id, dummy_cfg)
    for length, members in sorted(groups.items()):
        group_cfg = _fitted(cfg, context - length)
        prompt_BT = torch.tensor([ids[b] for b in members], dtype=torch.long, device=device)
        if cfg.rerank:
            texts = _reranked(model, tokenizer, image_BD[members], memory_BPW[members], prompt_BT,
                              [prompts[b] for b in members], group_cfg)
            for b, text in zip(members, texts):
                out[b] = text
            continue
        generated = decode(model_step(model, memory_BPW[members], tokenizer), prompt_BT, tokenizer.eos_id, group_cfg)
        for b, tokens in zip(members, generated):
            out[b] = tokenizer.decode(torch.tensor([tokens], dtype=torch.long))[0].strip()
    collect_moe_outputs(model, memory_BPW)  # drop what the decoding passes left in the MoE layers
    return out
