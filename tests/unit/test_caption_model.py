"""CoCa-MoE in one process: three kinds of experts from the routing stats, padding never routed, decoding
equals the training forward, prompts and lengths at the edges, refusals."""

import pytest
import torch

from helpers.data import IdTokenizer
from moe_dist.models import build_loss, create_model
from moe_dist.generation import GenerationConfig, check_generative, generate
from moe_dist.models.moe_blocks import set_dropless

TEXT = {"tokenizer": "openclip-bpe", "vocab_size": 64, "context_length": 12}
DECODER = {"layers": 2, "moe": {"every": 1}, "cross_moe": {"every": 1}}


def _model(**moe):
    torch.manual_seed(0)
    return create_model("coca-tiny", overrides={"text": TEXT, "decoder": DECODER,
                                                "moe": {"num_experts": 4, "top_k": 1, "dropless": True, **moe}})


def _batch(B=3):
    g = torch.Generator().manual_seed(1)
    text = torch.randint(4, 64, (B, 12), generator=g)
    text[:, 0] = 2
    for row, eos in enumerate((11, 6, 3)[:B]):
        text[row, eos] = 3
        text[row, eos + 1:] = 0
    return torch.randn(B, 3, 32, 32, generator=g), text


@pytest.mark.parametrize("top_k", [1, 2])
def test_cross_modal_experts_get_only_decoder_tokens_and_padding_is_never_routed(top_k):
    # experts 0 image-only, 1 text-only, 2 cross-modal, 3 shared
    model = _model(top_k=top_k, modality_experts=[1, 1, 1])
    images, text = _batch()
    stats = model(images, text).moe.layer_stats
    real_text = 12 + 7 + 4  # BOS..EOS of each row; nothing after an EOS is routed
    real_decoder = 11 + 7 + 4  # positions 0..C-2 up to each EOS
    patches = 3 * (16 + 1)
    for layer, s in stats.items():
        cross, image, txt = s["routed_per_expert/cross"], s["routed_per_expert/image"], s["routed_per_expert/text"]
        if layer.startswith("decoder"):
            assert image.sum() == 0 and txt.sum() == 0
            assert cross[0] == 0 and cross[1] == 0  # never the image-only or text-only experts
            assert cross.sum() == top_k * real_decoder and int(s["num_tokens/cross"]) == real_decoder
        else:
            assert s["routed_per_expert"][2] == 0  # the cross-modal expert never sees encoder tokens
            assert cross.sum() == 0
        if layer.startswith("text"):
            assert int(s["num_tokens/text"]) == real_text and txt.sum() == top_k * real_text
        if layer.startswith("vision"):
            assert int(s["num_tokens/image"]) == patches
    assert set(stats) == {"vision.1", "text.1", "decoder.0", "decoder.1", "decoder_cross.0", "decoder_cross.1"}


def test_modality_experts_pair_means_three_groups_with_no_cross_reservation():
    # a pair on a coca model: decoder tokens use only the shared experts; too few for top_k is refused
    model = _model(modality_experts=[1, 1])
    stats = model(*_batch()).moe.layer_stats["decoder.0"]
    assert stats["routed_per_expert/cross"][:2].sum() == 0
    with pytest.raises(ValueError, match="modality_experts"):
        _model(modality_experts=[2, 2], top_k=1)


def test_decode_equals_the_training_forward_and_the_loss_parts():
    model = _model(modality_experts=[1, 1, 1]).eval()
    set_dropless(model)
    images, text = _batch()
    with torch.no_grad():
        out = model(images, text)
        _, memory = model.encode_image_tokens(images)
        for length in (1, 5, 11):
            torch.testing.assert_close(model.decode(memory, text[:, :length]), out.logits[:, :length],
                                       rtol=1e-5, atol=1e-5)
    parts = build_loss(model.cfg)(out).parts
    # captioning loss by hand: mean cross-entropy over the labels that are not padding (EOS included)
    labels = text[:, 1:]
    logp = out.logits.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    assert parts["caption"] == pytest.approx(float(-logp[labels != 0].mean()), rel=1e-5)
    assert {"contrastive", "caption", "load_balance"} <= set(parts)


def test_loss_after_scores_only_what_follows_the_marker():
    """decoder.loss_after: label positions up to the end of the marker's last occurrence are not scored
    (hand-worked rows: the marker twice, at the start, absent); the loss is the cross-entropy of the rest."""
    from moe_dist.models.coca import answer_labels

    labels = torch.tensor([[7, 8, 9, 5, 7, 8, 6, 3, 0],     # marker (7, 8) at 0 and 4: score 6 and EOS
                           [7, 8, 3, 0, 0, 0, 0, 0, 0],     # marker first: score the EOS
                           [5, 6, 7, 9, 8, 3, 0, 0, 0]])    # no marker: every label
    assert answer_labels(labels, [7, 8], 0).tolist() == [[0, 0, 0, 0, 0, 0, 6, 3, 0], [0, 0, 3, 0, 0, 0, 0, 0, 0],
                                                         [5, 6, 7, 9, 8, 3, 0, 0, 0]]
    model = _model()
    images, text = _batch()
    text[0, 2:4] = torch.tensor([40, 41])  # row 0 holds the marker: labels 1, 2 are 40, 41; scored from 3 on
    with torch.no_grad():
        out = model(images, text)
    model.cfg.decoder.loss_after = "40 41"
    parts = build_loss(model.cfg, tokenizer=IdTokenizer(TEXT["context_length"]))(out).parts
    labels = text[:, 1:].clone()
    labels[0, :3] = 0
    logp = out.logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    assert parts["caption"] == pytest.approx(float(-logp[labels != 0].mean()), rel=1e-5)
    with pytest.raises(ValueError, match="needs the run's tokenizer"):
        build_loss(model.cfg)


def test_generation_edges():
    model = _model(modality_experts=[1, 1, 1])
    images, _ = _batch()
    tok = IdTokenizer(TEXT["context_length"])
    one = generate(model, tok, images, None, GenerationConfig(max_new=1))
    assert all(len(t.split()) <= 1 for t in one)
    # an empty prompt is captioning; prompts of different lengths decode in groups, each as if alone
    mixed = generate(model, tok, images, ["", "5 6", "7"], GenerationConfig(max_new=3))
    alone = [generate(model, tok, images[i:i + 1], [p], GenerationConfig(max_new=3))[0]
             for i, p in enumerate(["", "5 6", "7"])]
    assert mixed == alone
    # a prompt that fills the context leaves nothing to generate
    with pytest.raises(ValueError, match="shorten it"):
        generate(model, tok, images[:1], [" ".join(["5"] * 11)])
    beam = generate(model, tok, images, None, GenerationConfig(strategy="beam", beam_width=1, max_new=3))
    assert beam == generate(model, tok, images, None, GenerationConfig(max_new=3))


def test_a_contrastive_model_is_refused():
    clip = create_model("moe-clip-tiny", text={"tokenizer": "openclip-bpe"})
    with pytest.raises(ValueError, match="not a captioning model"):
        check_generative(clip, "ckpt")
    with pytest.raises(ValueError, match="decoder.layers"):
        create_model("coca-tiny", text=TEXT, decoder={"layers": 0})


def test_rerank_picks_the_finished_beam_the_towers_match_best():
    from moe_dist.generation.captioning import model_step
    from moe_dist.generation.decoding import beam_candidates

    model = _model(modality_experts=[1, 1, 1])
    images, _ = _batch()
    tok = IdTokenizer(TEXT["context_length"])
    cfg = dict(strategy="beam", beam_width=4, max_new=3)
    plain = generate(model, tok, images, None, GenerationConfig(**cfg))
    assert generate(model, tok, images, None, GenerationConfig(**cfg, rerank=0.0)) == plain
    with torch.no_grad():  # by hand: every finished beam, its text embedding against the image's
        image_BD, memory = model.eval().encode_image_tokens(images)
        found = beam_candidates(model_step(model, memory, tok), torch.full((3, 1), 2), 3, 3, 4)
        want, choice_changed = [], False
        for b, candidates in enumerate(found):
            texts = [tok.decode(torch.tensor([ids]))[0] for _, ids in candidates]
            cosine = (model.encode_text(tok(texts)) @ image_BD[b]).tolist()
            want.append(texts[max(range(len(texts)), key=cosine.__getitem__)])
            choice_changed |= want[-1] != plain[b]
    # a weight that dwarfs the beam scores: the most similar caption wins
    assert generate(model, tok, images, None, GenerationConfig(**cfg, rerank=1e6)) == want
    assert choice_changed, "the similarity never changed a choice here: the test would not tell"
    with pytest.raises(ValueError, match="only with the beam strategy"):
        GenerationConfig(rerank=1.0)
