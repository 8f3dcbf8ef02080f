"""``model.init``: sparse upcycling from a dense model (our checkpoint directory or export, or open_clip), for
MoE-CLIP and LIMoE, and the sources it refuses in one line.

Why the upcycled model is exact: with top-1 routing and ``renormalize: true`` the one selected gate weight is
p / p = 1, and with every expert a copy of the dense MLP and no dropped tokens (dropless) each MoE layer
computes dense_mlp(x); padding tokens are not routed (their output differs) but are masked out of attention
and are not pooled, so the embeddings match.
"""

import json
import os

import pytest
import torch

from moe_dist.checkpoint_files import MARKER, MODEL_STATES
from moe_dist.engine.config import load_run_config
from moe_dist.models import create_model
from moe_dist.models.pretrained import export, model_files
from moe_dist.models.upcycle import check_init, init_from_dense
from moe_dist.text import train_sentencepiece

EXACT = {"top_k": 1, "renormalize": True, "dropless": True}
CAPTIONS = ["a red circle", "two blue squares", "a small green triangle left of a yellow circle"] * 20


@pytest.fixture(scope="module")
def sp_model():
    return train_sentencepiece(CAPTIONS, vocab_size=60)


def _dense_checkpoint(directory, model, tokenizer: bytes) -> str:
    """A step directory as the trainer writes it (model files, model_config.json, tokenizer, marker)."""
    step = directory / "step00000001"
    step.mkdir(parents=True)
    torch.save({"module": model.state_dict()}, step / MODEL_STATES)
    for name, content in model_files(model.cfg, tokenizer).items():
        (step / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    (step / MARKER).write_text(json.dumps({"step": 1}))
    return str(step)


def _batch(cfg, n=3):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
    text = torch.randint(4, cfg.text.vocab_size, (n, cfg.text.context_length), generator=gen)
    for i, eos in enumerate((5, 9, 20)[:n]):
        text[i, eos], text[i, eos + 1:] = cfg.text.eos_id, cfg.text.pad_id
    return images, text


# the dense counterpart of each MoE model: the same config with no MoE blocks
KINDS = {
    "clip": ("moe-clip-tiny", {"vision": {"moe": {"every": 0}}, "text": {"moe": {"every": 0}}}),
    "limoe": ("limoe-tiny", {"vision": {"moe": {"every": 0}}}),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("form", ["checkpoint", "export"])
def test_upcycled_model_computes_the_dense_function(tmp_path, sp_model, kind, form):
    name, dense_overrides = KINDS[kind]
    torch.manual_seed(0)
    dense = create_model(name, overrides=dense_overrides).eval()
    path = _dense_checkpoint(tmp_path / "dense", dense, sp_model)
    if form == "export":
        export(path, str(tmp_path / "dense.safetensors"))
        path = str(tmp_path / "dense.safetensors")

    torch.manual_seed(1)  # another init: nothing may survive from it but the routers
    moe = create_model(name, moe=EXACT).eval()
    check_init(path, moe.cfg)
    report = init_from_dense(moe, path)
    assert len(report["experts"]) == {"clip": 4, "limoe": 2}[kind]
    first = next(m for m in moe.modules() if hasattr(m, "moe")).moe.experts
    mlp_key = report["experts"][0] + ".c_fc.weight"
    for e in range(first.w1.shape[0]):  # every expert is a copy of the dense MLP (w1 is [E, D, H])
        assert torch.equal(first.w1[e], dense.state_dict()[mlp_key].t())

    images, text = _batch(dense.cfg)
    with torch.no_grad():
        want, got = dense(images, text), moe(images, text)
    assert torch.allclose(got.image_features, want.image_features, atol=1e-6)
    assert torch.allclose(got.text_features, want.text_features, atol=1e-6)
    assert torch.equal(got.logit_scale, want.logit_scale)


def _open_clip_file(tmp_path):
    import open_clip

    vision = dict(image_size=32, patch_size=8, width=64, layers=4, head_width=16)
    text = dict(vocab_size=1024, context_length=32, width=64, layers=4, heads=4)
    path = tmp_path / "open_clip.pt"
    torch.save(open_clip.CLIP(embed_dim=64, vision_cfg=vision, text_cfg=text).state_dict(), path)
    return str(path)


def test_open_clip_file_into_moe_clip_is_accepted(tmp_path):
    path = _open_clip_file(tmp_path)
    moe = create_model("moe-clip-tiny", text={"pool_type": "argmax"})
    check_init(path, moe.cfg)
    assert len(init_from_dense(moe, path)["experts"]) == 4


def test_kind_mismatch_is_refused_in_one_line(tmp_path, sp_model):
    limoe = create_model("limoe-tiny")
    with pytest.raises(ValueError) as err:
        check_init(_open_clip_file(tmp_path), limoe.cfg)
    message = str(err.value)
    assert "\n" not in message and message.startswith("model.init: ")
    assert "open_clip CLIP checkpoint, a two-tower CLIP model" in message and "one-tower LIMoE" in message

    dense_clip = create_model("clip-tiny-dense")
    path = _dense_checkpoint(tmp_path / "clip", dense_clip, sp_model)
    with pytest.raises(ValueError, match=r"^model\.init: .*model 'clip-tiny-dense'.*a two-tower CLIP model, but the "
                                         r"run's model 'limoe-tiny' is a one-tower LIMoE"):
        init_from_dense(limoe, path)


def test_moe_source_wrong_shapes_and_missing_file_are_refused(tmp_path, sp_model):
    moe = create_model("moe-clip-tiny")
    path = _dense_checkpoint(tmp_path / "moe", moe, sp_model)
    with pytest.raises(ValueError, match=r"^model\.init: .* with 4 MoE layers; sparse upcycling starts from a dense"):
        check_init(path, moe.cfg)

    wide = create_model("clip-tiny-dense", vision={"width": 128})
    path = _dense_checkpoint(tmp_path / "wide", wide, sp_model)
    with pytest.raises(ValueError, match=r"^model\.init: .* does not fit model 'moe-clip-tiny': .*shape"):
        check_init(path, moe.cfg)

    with pytest.raises(ValueError, match=r"^model\.init: .*nowhere.pt does not exist"):
        check_init(str(tmp_path / "nowhere.pt"), moe.cfg)

    # what the tensors cannot show: the activation and the text pooling the source was trained with
    quick = _dense_checkpoint(tmp_path / "quick", create_model("clip-tiny-dense", quick_gelu=True), sp_model)
    with pytest.raises(ValueError, match=r"^model\.init: .*trained with model.quick_gelu=true, but the run's model has "
                                         r"model.quick_gelu=false, .*; set model.quick_gelu=true$"):
        check_init(quick, moe.cfg)
    argmax = create_model("clip-tiny-dense", text={"pool_type": "argmax"})
    with pytest.raises(ValueError, match=r"model.text.pool_type=argmax, but the run's model has model.text.pool_type"):
        check_init(_dense_checkpoint(tmp_path / "argmax", argmax, sp_model), moe.cfg)


def test_run_config_keeps_init_in_the_model_section(tmp_path, sp_model):
    cfg = load_run_config(overrides=["model.init=dense.safetensors", "model.moe.top_k=1"])
    assert cfg.model.init == "dense.safetensors" and cfg.model.overrides == {"moe": {"top_k": 1}}

    # check_inputs validates model.init on a fresh start only: a resume loads its checkpoint instead
    data = tmp_path / "data"
    os.makedirs(data / "train")
    (data / "train" / "train-000000.tar").write_bytes(b"\0" * 1024)
    tok = tmp_path / "tok.model"
    tok.write_bytes(sp_model)
    args = [f"data.train={data}/train/train-000000.tar", f"data.tokenizer={tok}", f"output_dir={tmp_path}/run",
            f"model.init={tmp_path}/missing.pt"]
    with pytest.raises(ValueError, match="model.init: .*missing.pt does not exist"):
        load_run_config(overrides=args).check_inputs("auto")
    _dense_checkpoint(tmp_path / "run" / "checkpoints", create_model("moe-clip-tiny"), sp_model)
    load_run_config(overrides=args).check_inputs("auto")  # resuming: model.init is not read
