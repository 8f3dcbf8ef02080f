"""Activation checkpointing and torch.compile per block (``configure_blocks``): the same loss, aux losses,
routing stats and gradients as the plain model, and checkpointing really saves less for backward."""

import functools

import pytest
import torch

from helpers.data import model_batch
from moe_dist.models import build_loss, create_model
from moe_dist.models.loss import ContrastiveLoss
from moe_dist.models.moe_blocks import configure_blocks, moe_mlps, transformer_blocks

# gumbel noise and random drop priority draw from the RNG in the MoE layer: the recomputation in backward
# must replay the same draws (checkpoint restores the RNG state) or routing, and so gradients, would differ
NOISY = {"moe": {"router_noise": "gumbel", "router_noise_eps": 1.0, "drop_priority": "random"}}


def _step(name, checkpointing="none", compile=False, saved=None):
    """One forward/backward from fixed weights and RNG: (loss parts, layer stats, grads by name)."""
    torch.manual_seed(0)
    model = create_model(name, overrides=NOISY).train()
    configure_blocks(model, checkpointing, compile)
    images, text = model_batch(model.cfg, n=6)
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(*_counter(saved)):
        out = model(images, text)
        result = ContrastiveLoss(model.cfg.loss)(out)
    result.total.backward()
    assert all(m.last is None for m in moe_mlps(model)), "a recomputation left an MoEOutput behind"
    parts = {k: v.detach() for k, v in result.parts.items()}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return parts, out.moe.layer_stats, grads


def _counter(saved):
    def pack(t):
        if saved is not None:
            saved.append(t.numel() * t.element_size())
        return t
    return pack, lambda t: t


@pytest.mark.parametrize("name, mode", [("moe-clip-tiny", "blocks"), ("limoe-tiny", "blocks"), ("moe-clip-tiny", "moe")])
def test_checkpointing_keeps_losses_stats_and_gradients(name, mode):
    saved_plain, saved_ckpt = [], []
    parts, stats, grads = _step(name, saved=saved_plain)
    parts_c, stats_c, grads_c = _step(name, mode, saved=saved_ckpt)
    assert parts.keys() == parts_c.keys() and stats.keys() == stats_c.keys()
    for k in parts:
        torch.testing.assert_close(parts_c[k], parts[k], rtol=1e-5, atol=1e-6, msg=f"loss part {k}")
    for layer in stats:
        for k in stats[layer]:
            torch.testing.assert_close(stats_c[layer][k], stats[layer][k], msg=f"{layer} stat {k}")
    assert grads.keys() == grads_c.keys()
    assert any("experts" in n for n in grads) and any("router" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-4, atol=1e-6, msg=f"grad of {n}")
    # what the forward keeps for backward (outside checkpointed regions only the region inputs)
    assert sum(saved_ckpt) < (0.5 if mode == "blocks" else 0.9) * sum(saved_plain)


def test_noise_matters_so_the_replay_is_tested():
    """Without RNG replay the two forwards would route differently: a different seed changes the loss."""
    torch.manual_seed(0)
    model = create_model("moe-clip-tiny", overrides=NOISY).train()
    images, text = model_batch(model.cfg, n=6)
    parts = []
    with torch.no_grad():
        for seed in (1, 2):
            torch.manual_seed(seed)
            parts.append(ContrastiveLoss(model.cfg.loss)(model(images, text)).parts)
    assert any(not torch.allclose(parts[0][k], parts[1][k]) for k in ("load_balance", "z_loss"))


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="activation_checkpointing='layers'.*none"):
        configure_blocks(create_model("moe-clip-tiny"), "layers")


def test_every_kind_of_block_compiles_into_its_own_cache(monkeypatch):
    """torch.compile keeps at most 8 graphs (recompile_limit) per code object, and every open_clip block
    runs the same forward. MoE-CLIP's dense and MoE blocks in two towers, with caption lengths that vary
    per batch, in training and in eval need more than 8; past the limit blocks fell back to eager. Each
    kind of block now compiles its own copy of the forward, so none reaches the limit (dynamo raises here
    if one does). Dynamo's "eager" backend: this checks the caching, not inductor's kernels."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = create_model("moe-clip-tiny").train()
    configure_blocks(model, compile=True)
    batches = [model_batch(model.cfg, n=6, seed=seed) for seed in range(3)]
    assert len({int((text != model.cfg.text.pad_id).sum(1).max()) for _, text in batches}) > 1  # lengths vary
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for images, text in batches:
            ContrastiveLoss(model.cfg.loss)(model(images, text)).total.backward()
        with torch.no_grad():
            for images, text in batches:
                model.eval()(images, text)
    blocks = transformer_blocks(model)
    kinds = {id(block.forward.__wrapped__.__func__.__code__) for block in blocks}  # copies compare equal
    assert len(kinds) == 4 and len(blocks) == 8  # vision and text x dense and MoE


def test_coca_cross_attention_blocks_are_checkpointed_and_compiled_too(monkeypatch):
    """CoCa's decoder alternates self-attention blocks (``resblocks``) and cross-attention blocks
    (``cross_attn``, with MoE MLPs here, called with the image tokens as keyword arguments): "blocks"
    recomputes both kinds, compile (dynamo's eager backend: the tracing, not the kernels) wraps both, and
    the loss parts and gradients stay those of the plain model."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    results = []
    for mode, compile in (("none", False), ("blocks", False), ("blocks", True)):
        torch.manual_seed(0)
        model = create_model("coca-tiny", overrides={
            "text": {"tokenizer": "openclip-bpe", "vocab_size": 64, "context_length": 12}}).train()
        configure_blocks(model, mode, compile)
        images, text = model_batch(model.cfg, n=6)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(*_counter(saved)):
            result = build_loss(model.cfg)(model(images, text))
        result.total.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((result.parts, grads, sum(saved)))
    cross = list(model.decoder.cross_attn)
    assert cross and all("forward" in block.__dict__ for block in cross)  # configured, like the resblocks
    (parts, grads, saved), *others = results
    assert any(n.startswith("decoder.cross_attn.") and "experts" in n for n in grads)
    for parts_c, grads_c, _ in others:
        for k in parts:
            torch.testing.assert_close(parts_c[k], parts[k], rtol=1e-5, atol=1e-6, msg=k)
        assert grads.keys() == grads_c.keys()
        for n in grads:
            torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-4, atol=1e-6, msg=n)
    assert others[0][2] < 0.5 * saved
