"""Tokenizer wrappers: BOS/EOS, truncation, padding mask, and plugging into the text tower."""

import pytest
import torch

from moe_dist.text import SentencePieceTokenizer, get_tokenizer, train_sentencepiece

COLORS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "triangle"]
CAPTIONS = [f"{n} small {c} {s}s left of a {c2} {s2}" for n in ("one", "two", "three") for c in COLORS
            for s in SHAPES for c2 in COLORS[:2] for s2 in SHAPES[:2]]


@pytest.fixture(scope="module")
def sp_model():
    return train_sentencepiece(CAPTIONS, vocab_size=80)


def test_sentencepiece_is_deterministic(sp_model):
    assert train_sentencepiece(CAPTIONS, vocab_size=80) == sp_model


def test_encode_bos_eos_padding_truncation(sp_model):
    tok = SentencePieceTokenizer(sp_model, context_length=8)
    tokens, pad = tok.encode(["red circle", CAPTIONS[-1]])
    assert tokens.dtype == torch.long and tokens.shape == (2, 8)
    pieces = tok.sp.encode("red circle")
    n = len(pieces) + 2
    assert tokens[0, :n].tolist() == [tok.bos_id] + pieces + [tok.eos_id]
    assert tokens[0, n:].eq(tok.pad_id).all() and pad[0].tolist() == [False] * n + [True] * (8 - n)
    # a long caption is cut so that EOS still ends it
    assert tokens[1, -1] == tok.eos_id and not pad[1].any()
    assert tok.decode(tokens[:1]) == ["red circle"]
    assert torch.equal(tok(["red circle"]), tokens[:1])  # open_clip-style call


def test_sentencepiece_plugs_into_text_tower(sp_model, tmp_path):
    from moe_dist.models import create_model

    path = tmp_path / "tok.model"
    path.write_bytes(sp_model)
    tok = get_tokenizer(f"sentencepiece:{path}", context_length=32)
    model = create_model("moe-clip-tiny")
    feats = model.encode_text(tok(CAPTIONS[:3]))
    assert feats.shape == (3, 64)


def test_openclip_bpe_by_name():
    tok = get_tokenizer("openclip-bpe", context_length=10)
    tokens, pad = tok.encode("a photo of a cat")
    assert tokens[0, 0] == 49406 and tokens[0].argmax() == 6 and tokens[0, 6] == 49407
    assert pad[0].tolist() == [False] * 7 + [True] * 3


def test_bad_tokenizer_inputs():
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="context_length=1"):
        get_tokenizer("openclip-bpe", context_length=1)
