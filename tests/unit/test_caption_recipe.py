"""CoCa recipe options (issue 28): label smoothing against its formula in fp64, the attentional pooler and
another decoder width in a working model, the decoder's own learning rate, the caption eval's decoding
and pool settings, and each option's refusal."""

import pytest
import torch

from moe_dist.config import merge
from moe_dist.models import create_model, load_model_config

TEXT = {"tokenizer": "openclip-bpe", "vocab_size": 64}


def coca(**decoder):
    torch.manual_seed(0)
    return create_model("coca-tiny", overrides={"text": TEXT, "decoder": decoder})


def batch(model, B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = model.cfg.text.context_length
    text = torch.randint(4, 64, (B, C), generator=g)
    text[:, 0] = 1
    text[0, 6], text[0, 7:] = 3, 0  # one caption ends early: EOS then padding
    return torch.randn(B, 3, 32, 32, generator=g), text


def test_label_smoothing_matches_its_formula_in_fp64():
    from moe_dist.models import build_loss

    model = coca(label_smoothing=0.1).double()
    images, text = batch(model)
    out = model(images.double(), text)
    loss = build_loss(model.cfg)(out)
    # (1 - e) x NLL(target) + e x mean over the vocabulary of -log p, averaged over the scored positions
    logp = out.logits.double().log_softmax(-1)
    scored = out.labels != model.cfg.text.pad_id
    nll = -logp.gather(-1, out.labels[..., None])[..., 0]
    want = (0.9 * nll - 0.1 * logp.mean(-1))[scored].mean()
    # the loss takes the cross-entropy in fp32 whatever the model's dtype: fp32 rounding against fp64
    torch.testing.assert_close(loss.parts["caption"].double(), want, rtol=1e-6, atol=1e-6)
    plain = build_loss(load_model_config("coca-tiny", {"text": TEXT}))(out).parts["caption"]
    torch.testing.assert_close(plain.double(), nll[scored].mean(), rtol=1e-6, atol=1e-6)
    assert abs(float(plain) - float(loss.parts["caption"])) > 1e-3  # smoothing changes the number


def test_pooler_and_decoder_width_build_train_and_decode():
    from open_clip.transformer import AttentionalPooler

    from moe_dist.generation import GenerationConfig, decode
    from moe_dist.generation.captioning import model_step
    from moe_dist.models.moe_blocks import moe_mlps
    from moe_dist.models.params import forward_flops

    model = coca(image_tokens="pooler", pooler_queries=5, width=96, heads=4)
    assert isinstance(model.image_to_decoder, AttentionalPooler)
    images, text = batch(model)
    _, memory = model.encode_image_tokens(images)
    assert memory.shape == (3, 5, 96)  # 5 queries at the decoder width, not 16 patches at the text width
    decoder_moe = [m for m in moe_mlps(model) if m.layer_name.startswith("decoder")]
    assert decoder_moe and all(m.moe.config.hidden_size == 96 for m in decoder_moe)
    out = model(images, text)
    out.logits.float().logsumexp(-1).mean().backward()
    assert model.image_to_decoder.query.grad.abs().sum() > 0 and model.text_to_decoder.weight.grad.abs().sum() > 0
    # the decoder reads the image: other images, other next-token logits
    assert not torch.allclose(model(images.flip(0), text).logits, out.logits)
    with torch.no_grad():  # greedy decoding from BOS reads the pooled, wider memory
        ids = decode(model_step(model.eval(), memory), torch.ones(3, 1, dtype=torch.long), 3, GenerationConfig(max_new=3))
    assert len(ids) == 3 and all(len(i) <= 3 for i in ids)
    # FLOPs: the pooler's 5 queries replace 16 patch tokens in every cross-attention block
    cfg = model.cfg
    patches = load_model_config("coca-tiny", {"text": TEXT, "decoder": {"width": 96, "heads": 4}})
    D, Dv, P, Q, L = 96, 64, 16, 5, cfg.text.context_length - 1
    pooler = 2 * 2 * Q * D * D + 2 * 2 * P * Dv * D + 2 * 2 * Q * P * D - 2 * P * Dv * D
    cross = cfg.decoder.layers * (2 * 2 * (Q - P) * D * D + 2 * 2 * L * (Q - P) * D)
    assert forward_flops(cfg)["decoder"] - forward_flops(patches)["decoder"] == pooler + cross


def test_decoder_learning_rate_scale_gets_its_own_groups():
    from moe_dist.engine.config import load_run_config
    from moe_dist.engine.optim import DECODER_PREFIXES, build_optimizer, build_schedule, param_groups

    model = coca(lr_scale=3.0)
    cfg = load_run_config(None, ["zero_stage=0", "data.train=x", "optimizer.lr=1e-3", "schedule.warmup_steps=4"])
    optimizer = build_optimizer(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        on_decoder = {names[id(p)].startswith(DECODER_PREFIXES) for p in group["params"]}
        assert on_decoder == {group.get("lr_scale", 1.0) == 3.0}  # each group wholly decoder or wholly not
    schedule = build_schedule(optimizer, cfg)  # warm-up step 1 of 4: a quarter of each group's own rate
    assert sorted({round(g["lr"], 12) for g in optimizer.param_groups}) == [2.5e-4, 7.5e-4]
    optimizer.step()  # no gradients: nothing moves
    schedule.step()
    assert sorted({round(g["lr"], 12) for g in optimizer.param_groups}) == [5e-4, 1.5e-3]
    assert len(param_groups(coca(lr_scale=1.0), 0.1)) == 4 < len(param_groups(model, 0.1))  # scale 1: the usual groups


@pytest.mark.parametrize("decoder,match", [
    ({"label_smoothing": 1.0}, r"model.decoder.label_smoothing=1.0 must lie in \[0, 1\)"),
    ({"image_tokens": "cls"}, "model.decoder.image_tokens='cls' is unknown; use one of patches, pooler"),
    ({"pooler_queries": 0}, "model.decoder.pooler_queries=0 must be > 0"),
    ({"lr_scale": 0}, "model.decoder.lr_scale=0 must be > 0"),
    ({"width": 90}, "model.decoder.heads=4 must divide the decoder width 90"),
])
def test_recipe_options_refuse_bad_values(decoder, match):
    with pytest.raises(ValueError, match=match):
        load_model_config("coca-tiny", merge({"text": TEXT}, {"decoder": decoder}))


@pytest.mark.parametrize("setting,match", [
    ("eval.decoding.strategy=top_p", "eval.decoding.strategy='top_p' is unknown; use greedy or beam"),
    ("eval.decoding.min_length=30", r"eval.decoding: min_length=30 must lie in \[0, max length 30\)"),
    ("eval.decoding.repetition_penalty=0.9", "eval.decoding: repetition_penalty=0.9 must be >= 1"),
    ("eval.caption_pool_size=0", "eval.caption_pool_size=0 must be >= 1"),
])
def test_caption_eval_settings_refuse_bad_values(setting, match):
    from moe_dist.engine.config import load_run_config

    with pytest.raises(ValueError, match=match):
        load_run_config(None, ["data.train=x", setting])


def test_resume_refuses_another_decoder_learning_rate_scale(tmp_path):
    """The optimizer groups follow lr_scale: a checkpoint resumes only under the scale it was saved with
    (a model_config.json from before the option means 1)."""
    import dataclasses
    import json

    from moe_dist.engine.checkpoint import check_same_model

    saved = dataclasses.asdict(load_model_config("coca-tiny", {"text": TEXT}))
    del saved["decoder"]["lr_scale"]  # written before the option existed
    (tmp_path / "model_config.json").write_text(json.dumps(saved))
    check_same_model(str(tmp_path), load_model_config("coca-tiny", {"text": TEXT, "decoder": {"lr_scale": 1.0}}))
    with pytest.raises(ValueError, match=r"model.decoder.lr_scale=1, this run's config gives 3.*"
                                         r"--set model.overrides.decoder.lr_scale=1"):
        check_same_model(str(tmp_path), load_model_config("coca-tiny", {"text": TEXT, "decoder": {"lr_scale": 3}}))
