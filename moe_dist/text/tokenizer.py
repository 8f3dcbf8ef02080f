"""Tokenizers that plug into the models the way open_clip's do.

Both are callables ``tokenizer(texts, context_length=None) -> LongTensor [B, C]`` and also offer
``encode(texts) -> (tokens [B, C], padding_mask [B, C])`` with True marking padding. Each sequence is
BOS + pieces + EOS, truncated so EOS always fits, then padded with the pad id.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch

# ids our sentencepiece models reserve (train_sentencepiece sets them)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class _Tokenizer:
    pad_id: int
    bos_id: int
    eos_id: int

    def __init__(self, context_length: int):
        if context_length < 2:
            raise ValueError(f"context_length={context_length} must be >= 2 (room for BOS and EOS)")
        self.context_length = context_length

    def pieces(self, texts: List[str]) -> List[List[int]]:
        raise NotImplementedError

    def encode(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        C = context_length or self.context_length
        tokens = torch.full((len(texts), C), self.pad_id, dtype=torch.long)
        lengths = torch.empty(len(texts), dtype=torch.long)
        for i, ids in enumerate(self.pieces(texts)):
            seq = [self.bos_id] + ids[: C - 2] + [self.eos_id]
            tokens[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            lengths[i] = len(seq)
        padding_mask = torch.arange(C)[None, :] >= lengths[:, None]
        return tokens, padding_mask

    def __call__(self, texts, context_length: Optional[int] = None) -> torch.Tensor:
        return self.encode(texts, context_length)[0]


class SentencePieceTokenizer(_Tokenizer):
    """A trained sentencepiece model with pad/bos/eos ids defined (see ``train_sentencepiece``)."""

    def __init__(self, model: Union[str, bytes], context_length: int = 77):
        import sentencepiece as spm

        super().__init__(context_length)
        if isinstance(model, bytes):
            self.sp = spm.SentencePieceProcessor(model_proto=model)
        else:
            self.sp = spm.SentencePieceProcessor(model_file=str(model))
        self.pad_id, self.bos_id, self.eos_id = self.sp.pad_id(), self.sp.bos_id(), self.sp.eos_id()
        if min(self.pad_id, self.bos_id, self.eos_id) < 0:
            raise ValueError(f"sentencepiece model {model if isinstance(model, str) else '<bytes>'} lacks a pad, "
                             "BOS or EOS id; train it with moe-dist-data tokenizer (pad=0, unk=1, bos=2, eos=3)")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def pieces(self, texts):
        if len(texts) == 1:  # the batch API starts a thread pool per call: 5x slower for one caption
            return [self.sp.encode(texts[0])]
        return self.sp.encode(texts)

    def decode(self, tokens: torch.Tensor) -> List[str]:
        out = []
        for row in tokens.tolist():
            out.append(self.sp.decode([t for t in row if t not in (self.pad_id, self.bos_id, self.eos_id)]))
        return out


class OpenClipBPETokenizer(_Tokenizer):
    """open_clip's default CLIP BPE (its vocabulary ships with open_clip; nothing is downloaded)."""

    def __init__(self, context_length: int = 77):
        from open_clip.tokenizer import SimpleTokenizer

        super().__init__(context_length)
        self.bpe = SimpleTokenizer(context_length=context_length)
        self.pad_id, self.bos_id, self.eos_id = 0, self.bpe.sot_token_id, self.bpe.eot_token_id
        self.vocab_size = len(self.bpe.encoder)

    def pieces(self, texts):
        return [self.bpe.encode(t) for t in texts]


MAX_TOKENIZER_BYTES = 64 << 20  # a sentencepiece model of a 256k vocabulary is ~5 MB


def sentencepiece_path(name: str) -> str:
    """The .model path a tokenizer name refers to, "" for "openclip-bpe"; ValueError for any other form.

    Accepted: "openclip-bpe", "sentencepiece:<path to .model>", or a bare path ending in .model (relative
    paths are taken from the current directory)."""
    if name == "openclip-bpe":
        return ""
    path = name.split(":", 1)[1] if name.startswith("sentencepiece:") else name
    if not path.endswith(".model"):
        raise ValueError(f"unknown tokenizer {name!r}; use 'openclip-bpe' or 'sentencepiece:<path to .model>'")
    return path


def get_tokenizer(name: str, context_length: int = 77) -> _Tokenizer:
    """The tokenizer ``name`` refers to (see ``sentencepiece_path`` for the accepted forms)."""
    path = sentencepiece_path(name)
    if not path:
        return OpenClipBPETokenizer(context_length)
    if not os.path.isfile(path):
        raise ValueError(f"sentencepiece model {path!r} does not exist; train one with 'moe-dist-data tokenizer "
                         f"SPEC --out {path}' (launch/quickstart.sh makes the synth one) or set data.tokenizer")
    return SentencePieceTokenizer(path, context_length)


def train_sentencepiece(sentences: Iterable[str], vocab_size: int = 1000, model_type: str = "unigram",
                        max_sentences: int = 0, seed: int = 0) -> bytes:
    """Train a sentencepiece model in-process and return its serialized bytes.

    Deterministic for a given input, vocab size and type: one training thread, and when
    ``max_sentences`` subsamples, sentencepiece's sampler is seeded with ``seed``.
    """
    import sentencepiece as spm

    spm.set_random_generator_seed(seed)
    if model_type not in ("unigram", "bpe", "char", "word"):
        raise ValueError(f"model_type={model_type!r}; use unigram, bpe, char or word")
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)), model_writer=buffer, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        hard_vocab_limit=False, input_sentence_size=max_sentences, shuffle_input_sentence=True,
        num_threads=1, minloglevel=2)
    return buffer.getvalue()
