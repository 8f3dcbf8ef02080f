"""MoE-CLIP and LIMoE: shapes, dtypes, routing rules, learning, upcycling, bad configs."""

import pytest
import torch

from moe_dist.models import create_model, load_model_config
from moe_dist.models.loss import ContrastiveLoss
from moe_dist.models.moe_blocks import MoEMLP

MODELS = ["moe-clip-tiny", "limoe-tiny"]


def _batch(cfg, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    C = cfg.text.context_length
    lengths = torch.randint(3, C, (n,), generator=gen)
    text = torch.randint(4, cfg.text.vocab_size, (n, C), generator=gen)
    positions = torch.arange(C)[None, :]
    text[:, 0] = 2  # BOS
    text = torch.where(positions == lengths[:, None], cfg.text.eos_id, text)
    text = torch.where(positions > lengths[:, None], cfg.text.pad_id, text)
    return images, text, positions > lengths[:, None]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_forward_backward_shapes(name, bf16):
    torch.manual_seed(0)
    model = create_model(name)
    cfg = model.cfg
    images, text, _ = _batch(cfg)
    loss_fn = ContrastiveLoss(cfg.loss)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(images, text)
        result = loss_fn(out)
        loss, parts = result.total, result.parts
    loss.backward()
    for feats in (out.image_features, out.text_features):
        assert feats.shape == (4, cfg.embed_dim)
        assert torch.allclose(feats.float().norm(dim=-1), torch.ones(4), atol=1e-2 if bf16 else 1e-5)
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert set(parts) >= {"contrastive", "load_balance", "z_loss", "entropy_local", "entropy_global"}
    assert len(out.moe.layer_stats) == len(list(m for m in model.modules() if isinstance(m, MoEMLP)))
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" not in n and "router" not in n
               and "logit_bias" not in n)


def test_padding_text_tokens_are_not_routed():
    torch.manual_seed(0)
    model = create_model("moe-clip-tiny")
    images, text, padding = _batch(model.cfg, n=6)
    out = model(images, text)
    real_text_tokens = int((~padding).sum())
    for layer, stats in out.moe.layer_stats.items():
        if layer.startswith("text"):
            assert int(stats["num_tokens"]) == real_text_tokens
            assert int(stats["routed_per_expert"].sum()) == real_text_tokens  # k=1
            assert int(stats["num_tokens/image"]) == 0
        else:
            assert int(stats["num_tokens"]) == 6 * (1 + (32 // 8) ** 2)
    # padding content does not change the text embedding
    text2 = torch.where(padding, torch.randint(4, 1000, text.shape), text)
    model.eval()
    assert torch.allclose(model.encode_text(text), model.encode_text(text2), atol=1e-6)


def test_text_trimmed_after_last_eos_is_exact(monkeypatch):
    """The text tower runs only up to the batch's last EOS; features, MoE statistics, aux losses and
    every gradient equal open_clip's own forward over the full context (fp64)."""
    import moe_dist.models.clip as clip

    torch.manual_seed(0)
    model = create_model("moe-clip-tiny", moe={"capacity_factor": 1.0}).double()
    images, text, padding = _batch(model.cfg, n=6)
    text[:, 20:] = model.cfg.text.pad_id  # every caption ends before position 20
    text = torch.where((torch.arange(32) == 19) & ~padding[:, 19:20], model.cfg.text.eos_id, text)
    lengths = []
    model.text.transformer.register_forward_hook(lambda module, args, out: lengths.append(args[0].shape[1]))

    def run():
        model.zero_grad()
        out = model(images.double(), text)
        loss = ContrastiveLoss(model.cfg.loss)(out).total
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, loss, grads

    out, loss, grads = run()
    monkeypatch.setattr(clip, "trim_after_eos", lambda text, tower, cfg: text)
    monkeypatch.setattr(clip, "run_text_tower", lambda tower, text, cfg: tower(text))  # open_clip's forward
    ref_out, ref_loss, ref_grads = run()
    assert lengths == [20, 32]
    assert torch.allclose(out.text_features, ref_out.text_features, atol=1e-12)
    assert torch.allclose(loss, ref_loss, atol=1e-12)
    for layer, stats in ref_out.moe.layer_stats.items():
        for key, value in stats.items():
            assert torch.allclose(out.moe.layer_stats[layer][key].double(), value.double(), atol=1e-12), (layer, key)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert torch.allclose(grads[name], grad, atol=1e-12), name


def test_text_moe_in_block_0_runs_full_length_captions():
    """open_clip's TextTransformer reads its dtype from block 0's dense MLP; with an MoE block 0 our
    forward serves every length, a caption filling the whole context included."""
    torch.manual_seed(0)
    model = create_model("moe-clip-tiny", overrides={"text": {"moe": {"blocks": [0]}}})
    images, text, _ = _batch(model.cfg, n=3)
    text[0, -1] = model.cfg.text.eos_id  # a caption using every position: nothing to trim
    text[0, :-1] = torch.randint(4, 1000, (31,))
    out = model(images, text)
    assert out.text_features.shape == (3, model.cfg.embed_dim) and "text.0" in out.moe.layer_stats


def test_limoe_modality_experts_and_shared_routing():
    torch.manual_seed(0)
    model = create_model("limoe-tiny", moe={"modality_experts": [1, 1], "top_k": 1})
    images, text, padding = _batch(model.cfg, n=5)
    out = model(images, text)
    for stats in out.moe.layer_stats.values():
        assert int(stats["tokens_per_expert/image"][1]) == 0, "a text-only expert got image tokens"
        assert int(stats["tokens_per_expert/text"][0]) == 0, "an image-only expert got text tokens"
        assert int(stats["num_tokens/text"]) == int((~padding).sum())
        assert int(stats["num_tokens/image"]) == 5 * 17
    assert float(out.moe.losses["entropy_local"]) > 0


@pytest.mark.parametrize("name", MODELS)
def test_tiny_model_overfits_a_fixed_batch(name):
    torch.manual_seed(0)
    model = create_model(name)
    images, text, _ = _batch(model.cfg, n=32, seed=1)
    loss_fn = ContrastiveLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for step in range(60):
        result = loss_fn(model(images, text))
        loss, parts = result.total, result.parts
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(parts["contrastive"])
        if float(parts["contrastive"]) <= 0.2 * first:
            break
    assert float(parts["contrastive"]) <= 0.2 * first, (first, float(parts["contrastive"]), step)


def test_forced_balanced_routing_gives_every_expert_gradient():
    torch.manual_seed(0)
    model = create_model("moe-clip-tiny", moe={"force_balanced": True})
    images, text, _ = _batch(model.cfg, n=8)
    loss = ContrastiveLoss()(model(images, text)).total
    loss.backward()
    for mlp in (m for m in model.modules() if isinstance(m, MoEMLP)):
        grad = mlp.moe.experts.w1.grad
        assert all(float(grad[e].abs().sum()) > 0 for e in range(grad.shape[0]))


def test_upcycling_from_dense_open_clip_is_exact(tmp_path):
    import open_clip

    torch.manual_seed(0)
    vision = dict(image_size=32, patch_size=8, width=64, layers=4, heads=4)
    text = dict(vocab_size=1024, context_length=16, width=64, layers=2, heads=4)
    dense = open_clip.CLIP(embed_dim=32, vision_cfg={**{k: v for k, v in vision.items() if k != "heads"},
                                                     "head_width": 16}, text_cfg=text)
    path = tmp_path / "dense.pt"
    torch.save(dense.state_dict(), path)

    from moe_dist.models.upcycle import upcycle

    moe = create_model("moe-clip-tiny", embed_dim=32,
                       vision={**vision, "moe": {"every": 2}},
                       text={**text, "pool_type": "argmax", "eos_id": 1023, "moe": {"last": 1}},
                       moe={"num_experts": 4, "top_k": 1, "renormalize": True, "dropless": True})
    report = upcycle(moe, str(path))
    assert len(report["experts"]) == 3
    dense.eval(), moe.eval()
    images = torch.randn(3, 3, 32, 32)
    tokens = torch.randint(1, 1000, (3, 16))
    tokens[:, 10] = 1023  # EOT: the argmax position
    tokens[:, 11:] = 0
    assert torch.allclose(moe.encode_image(images), dense.encode_image(images, normalize=True), atol=1e-6)
    assert torch.allclose(moe.encode_text(tokens), dense.encode_text(tokens, normalize=True), atol=1e-6)


@pytest.mark.parametrize("overrides, words", [
    ({"vision": {"moe": {"blocks": [9]}}}, ["model.vision.moe.blocks=[9]", "4 blocks"]),
    ({"vision": {"image_size": 30}}, ["image_size=30", "patch_size=8"]),
    ({"text": {"context_length": 1}}, ["context_length=1", ">= 2"]),
    ({"moe": {"top_k": 9}}, ["top_k=9"]),
    ({"vision": {"widht": 3}}, ["unknown fields ['widht']"]),
])
def test_bad_model_config(overrides, words):
    with pytest.raises(ValueError) as err:
        load_model_config("moe-clip-tiny", overrides)
    for word in words:
        assert word in str(err.value)


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown model 'vit-h'.*moe-clip-tiny"):
        create_model("vit-h")


def test_text_to_device_cuts_from_the_host_copy():
    """The trainer and evaluation cut text batches after their last EOS from the host copy: on a meta
    "device", whose tensors hold no values, the cut still comes out right, so nothing was read back."""
    from moe_dist.models.clip import text_to_device, trim_after_eos

    model = create_model("moe-clip-tiny")
    _, text, _ = _batch(model.cfg, n=6)
    text[:, 20:] = model.cfg.text.pad_id
    text[:, 19] = model.cfg.text.eos_id
    assert text_to_device(model, text, "meta").shape == (6, 20)
    assert torch.equal(text_to_device(model, text, "cpu"), trim_after_eos(text, model.text, model.cfg))
    limoe = create_model("limoe-tiny")  # a model that does not trim gets the batch as it is
    assert text_to_device(limoe, text, "meta").shape == text.shape
