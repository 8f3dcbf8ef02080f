"""Whole-model torch.compile (``compile: model``): no graph break in a forward + loss of any model kind, the
same loss and gradients as eager, and a clear refusal for what cannot compile."""

import pytest
import torch

from helpers.data import model_batch
from moe_dist.engine.config import load_run_config
from moe_dist.models import build_loss, create_model
from moe_dist.models.moe_blocks import configure_blocks


def _whole_model(name, dtype, backend):
    model = create_model(name, moe={"expert_backend": backend}).to(dtype).train()
    for m in model.modules():  # what configure_blocks(compile="model") sets, without compiling here
        if hasattr(m, "trim_in_forward"):
            m.trim_in_forward = False
    return model


@pytest.mark.parametrize("name", ["moe-clip-tiny", "limoe-tiny", "coca-tiny"])
@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "grouped_mm"), (torch.float32, "loop")],
                         ids=["bf16_grouped_mm", "fp32_loop"])
def test_forward_and_loss_trace_without_graph_breaks(name, dtype, backend):
    """dynamo's explain over model + loss: one graph. grouped_mm's meta kernel wants bf16; in fp32 the
    loop backend's custom operators stand in (fixed output shapes, opaque to the trace)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _whole_model(name, dtype, backend)
    loss_fn = build_loss(model.cfg)
    images, text = model_batch(model.cfg, dtype=dtype)
    explained = torch._dynamo.explain(lambda i, t: loss_fn(model(i, t)).total)(images, text)
    reasons = [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_break_count == 0 and explained.graph_count == 1, reasons


@pytest.mark.parametrize("mode", ["blocks", "model"])
def test_compiled_equals_eager(mode):
    """compile=blocks (each block, the MoE layer inside) and compile=model (one graph) with inductor, its
    CPU C++ backend here: loss parts and every gradient equal eager within fp32 tolerance. A 2-block LIMoE,
    both blocks MoE (both modalities in one pass; two layers' buffers in one graph, where inductor once
    mixed up buffers of equal shape: batch 4, 4 experts) keeps it short."""
    small = {"vision": {"layers": 2, "moe": {"every": 1}}}
    results = []
    for compile in ("none", mode):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = create_model("limoe-tiny", overrides=small).train()
        configure_blocks(model, compile=compile)
        result = build_loss(model.cfg)(model(*model_batch(model.cfg)))
        result.total.backward()
        results.append((result.parts, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (parts, grads), (parts_c, grads_c) = results
    for k in parts:
        torch.testing.assert_close(parts_c[k].detach(), parts[k].detach(), rtol=1e-5, atol=1e-6, msg=k)
    assert grads.keys() == grads_c.keys() and any("experts" in n for n in grads)
    for n in grads:
        torch.testing.assert_close(grads_c[n], grads[n], rtol=1e-4, atol=1e-5, msg=n)


def test_what_cannot_compile_is_refused():
    model = create_model("moe-clip-tiny")
    with pytest.raises(ValueError, match="compile=model cannot trace activation_checkpointing='blocks'"):
        configure_blocks(model, "blocks", "model")
    with pytest.raises(ValueError, match="compile='fast' is unknown"):
        load_run_config(None, ["compile=fast"])
    with pytest.raises(ValueError, match="compile=model cannot trace activation_checkpointing='moe'"):
        load_run_config(None, ["compile=model", "activation_checkpointing=moe"])
    cfg = load_run_config(None, ["compile=model", "model.moe.expert_backend=grouped_mm", "precision=fp32",
                                 "data.train=x"])
    with pytest.raises(ValueError, match="compile=model traces .*grouped_mm in bf16 only.*precision=fp32"):
        cfg.validate(1)
    cfg.compile = "blocks"  # blocks trace the layer too at ep_size 1
    with pytest.raises(ValueError, match="compile=blocks traces .*grouped_mm in bf16 only"):
        cfg.validate(1)


def test_compile_modes_resolve():
    from moe_dist.models.moe_blocks import compile_mode

    assert load_run_config(None, ["compile=true"]).compile == "blocks"  # configs written before the modes
    assert load_run_config(None, ["compile=false"]).compile == "none"
    assert compile_mode("auto", "none", "cuda") == "model"
    assert compile_mode("auto", "blocks", "cuda") == "blocks"
    assert compile_mode("auto", "none", "cpu") == "none"


def test_compiled_model_takes_host_trimmed_text_of_any_length(monkeypatch):
    """Under compile=model MoE-CLIP's forward reads nothing on the host; the trainer cuts each host batch
    after its last EOS (trim_text_batch) instead. Batches of three lengths run through one fullgraph
    compile (recompiled once, with a dynamic length; AOT autograd's eager backend keeps this short) and
    give the eager model's loss on the uncut batch."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = create_model("moe-clip-tiny").train()
    compiled = create_model("moe-clip-tiny").train()
    compiled.load_state_dict(eager.state_dict())
    configure_blocks(compiled, compile="model")
    loss_fn = build_loss(eager.cfg)
    lengths = set()
    for seed in (0, 6, 3):
        images, text = model_batch(eager.cfg, seed=seed)
        cut = compiled.trim_text_batch(text)
        lengths.add(cut.shape[1])
        with torch.no_grad():
            want, got = loss_fn(eager(images, text)).total, loss_fn(compiled(images, cut)).total
        assert float(got) == pytest.approx(float(want), rel=1e-5)
    assert len(lengths) == 3 and max(lengths) < eager.cfg.text.context_length
