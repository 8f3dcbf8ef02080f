"""``model.name: open_clip:ARCH`` and ``model.init: open_clip:ARCH/TAG``: a published open_clip architecture as
our MoE-CLIP, upcycled from weights that open_clip itself wrote, and the inputs refused in one line.

Why the upcycled model is exact (as in test_upcycle_init.py): with top-1 routing, ``renormalize`` (the one
selected gate weight is p / p = 1), every expert a copy of the dense MLP and no dropped tokens (dropless),
each MoE layer computes the dense MLP, so image and text embeddings equal open_clip's model's (fp32, up to
summation order). No test touches the network: the hub is offline and its cache a temporary directory.
"""

import math
import os

import open_clip
import pytest
import torch

from moe_dist.engine.config import load_run_config
from moe_dist.models import build_model, load_model_config
from moe_dist.models.moe_blocks import MoEMLP, moe_mlps
from moe_dist.models.openclip_arch import cached_weights, locate_weights, parse_init
from moe_dist.models.upcycle import check_init, init_from_dense
from moe_dist.text import get_tokenizer

ARCH = "ViT-B-32"
TAG = "laion2b_s34b_b79k"
LOGIT_SCALE = 3.25  # not open_clip's init ln(1/0.07) = 2.659: the copied value must be the saved one
EXACT_MOE = {"num_experts": 4, "top_k": 1, "renormalize": True, "dropless": True}
# two MoE blocks per tower (6th and 12th) keep the model small enough for a CPU test
PLACEMENT = {"vision": {"moe": {"every": 6}}, "text": {"moe": {"every": 6}}}
CAPTIONS = ["a photo of a cat", "two red squares next to a small dog on the grass"]


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """The Hugging Face hub offline, with an empty cache of our own: nothing here may download."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture(scope="module")
def openclip_weights(tmp_path_factory):
    """(open_clip's ViT-B-32 in eval mode, the file its state dict was saved to by open_clip/torch)."""
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH).eval()
    with torch.no_grad():
        model.logit_scale.fill_(LOGIT_SCALE)
    path = tmp_path_factory.mktemp("openclip") / "vit_b_32.pt"
    torch.save(model.state_dict(), path)
    return model, str(path)


def _inputs():
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    text = open_clip.get_tokenizer(ARCH)(CAPTIONS)
    return images, text


def _moe_model(arch=ARCH):
    torch.manual_seed(5)  # routers start random: the equality must not depend on where tokens go
    return build_model(load_model_config(f"open_clip:{arch}", {"moe": EXACT_MOE, **PLACEMENT}))


def test_name_maps_the_architecture_and_tokenizer():
    cfg = load_model_config(f"open_clip:{ARCH}")
    oc = open_clip.get_model_config(ARCH)
    assert (cfg.embed_dim, cfg.kind, cfg.name) == (oc["embed_dim"], "clip", f"open_clip:{ARCH}")
    v, t = cfg.vision, cfg.text
    assert (v.image_size, v.patch_size, v.width, v.layers, v.heads) == (224, 32, 768, 12, 768 // 64)
    assert (t.vocab_size, t.context_length, t.width, t.layers, t.heads) == (49408, 77, 512, 12, 8)
    assert cfg.init_logit_scale == pytest.approx(math.log(1 / 0.07))
    ours = get_tokenizer(t.tokenizer, t.context_length)
    assert torch.equal(torch.as_tensor(ours(CAPTIONS)), open_clip.get_tokenizer(ARCH)(CAPTIONS))
    # LIMoE where the two towers match: one shared tower of ViT-S-32's size
    limoe = load_model_config("open_clip:ViT-S-32", {"kind": "limoe", "vision": {"moe": {"every": 2}}})
    assert (limoe.kind, limoe.vision.width, limoe.vision.layers, limoe.vision.heads) == ("limoe", 384, 12, 6)
    assert limoe.vision_moe_blocks() == [1, 3, 5, 7, 9, 11]


def _fake_hub_cache(hub, weights: str) -> str:
    """open_clip's file for ARCH/TAG placed in the hub cache layout (refs/main -> snapshots/<rev>/FILE)."""
    repo, _ = os.path.split(open_clip.get_pretrained_cfg(ARCH, TAG)["hf_hub"])
    folder = hub / f"models--{repo.replace('/', '--')}"
    rev = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(rev)
    snapshot = folder / "snapshots" / rev
    snapshot.mkdir(parents=True)
    os.symlink(weights, snapshot / "open_clip_pytorch_model.bin")
    return str(snapshot / "open_clip_pytorch_model.bin")


@torch.no_grad()
@pytest.mark.parametrize("arch", [ARCH, f"{ARCH}-quickgelu"])  # the same weights, GELU or OpenAI's QuickGELU
def test_upcycled_model_computes_what_openclip_computes(openclip_weights, offline_hub, arch):
    """ViT-B-32 through its tag (the file in the hub cache), ViT-B-32-quickgelu through the file itself."""
    reference, path = openclip_weights
    if arch == ARCH:
        _fake_hub_cache(offline_hub, path)
        spec = f"open_clip:{ARCH}/{TAG}"
    else:
        reference = open_clip.create_model(arch, pretrained=path).eval()
        assert isinstance(reference.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
        spec = f"open_clip:{arch}/{path}"  # an absolute path: open_clip:ARCH//abs/file.pt
    model = _moe_model(arch)
    assert model.cfg.quick_gelu == (arch != ARCH) and model.cfg.moe_config(768).activation == (
        "quick_gelu" if arch != ARCH else "gelu")
    report = init_from_dense(model, spec)
    assert sorted(report["experts"]) == ["text.transformer.resblocks.11.mlp", "text.transformer.resblocks.5.mlp",
                                         "visual.transformer.resblocks.11.mlp", "visual.transformer.resblocks.5.mlp"]
    dense = reference.state_dict()
    for name, mlp in model.named_modules():
        if not isinstance(mlp, MoEMLP):
            continue
        dense_name = name.replace("text.", "", 1)  # open_clip's CLIP keeps its text tower at the top level
        for e in range(EXACT_MOE["num_experts"]):  # every expert a copy of the dense MLP
            assert torch.equal(mlp.moe.experts.w1[e], dense[f"{dense_name}.c_fc.weight"].t())
            assert torch.equal(mlp.moe.experts.w2[e], dense[f"{dense_name}.c_proj.weight"].t())
    model.eval()
    images, text = _inputs()
    image_ours, image_ref = model.encode_image(images), reference.encode_image(images, normalize=True)
    text_ours, text_ref = model.encode_text(text), reference.encode_text(text, normalize=True)
    torch.testing.assert_close(image_ours, image_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(text_ours, text_ref, rtol=0, atol=2e-5)
    assert model.logit_scale.exp().item() == pytest.approx(reference.logit_scale.exp().item(), abs=0)
    tokens_per_expert = next(moe_mlps(model.visual)).last.stats["tokens_per_expert"]
    assert (tokens_per_expert > 0).sum() > 1  # the random router really spreads tokens over several experts
    # the check can fail: one expert changed -> the image embedding moves
    next(moe_mlps(model.visual)).moe.experts.w1[1].mul_(1.5)
    assert (model.encode_image(images) - image_ref).abs().max() > 1e-3


def test_weights_of_another_architecture_are_refused_naming_the_tensor(openclip_weights):
    _, path = openclip_weights  # ViT-B-32's weights, given as ViT-B-16's
    with pytest.raises(ValueError) as err:  # the config-load check: our model on the meta device
        check_init(f"open_clip:ViT-B-16/{path}", load_model_config("open_clip:ViT-B-16"))
    assert f"open_clip could not load {path} into ViT-B-16 (RuntimeError: size mismatch for " in str(err.value)
    assert "\n" not in str(err.value)


def _run_config(*sets):
    return load_run_config(overrides=[f"model.name=open_clip:{ARCH}", "model.moe.num_experts=4",
                                      "model.vision.moe.every=6", "model.text.moe.every=6", *sets])


def test_tag_resolves_through_the_cache(openclip_weights, offline_hub):
    _, path = openclip_weights
    cached = _fake_hub_cache(offline_hub, path)
    init = parse_init(f"open_clip:{ARCH}/{TAG}")
    assert (init.arch, init.tag) == (ARCH, TAG)
    assert cached_weights(open_clip.get_pretrained_cfg(ARCH, TAG)) == cached == locate_weights(init)
    # (the upcycling test above loads the tag from this cache through init_from_dense, as the trainer does)


def test_tag_not_cached_and_offline_fails_at_config_load_naming_what_to_download():
    cfg = _run_config(f"model.init=open_clip:{ARCH}/{TAG}")
    with pytest.raises(ValueError) as err:
        cfg.check_inputs(resume="none")
    message = str(err.value)
    assert "\n" not in message
    assert "not in open_clip's cache and could not be downloaded (HF_HUB_OFFLINE is set)" in message
    assert "laion/CLIP-ViT-B-32-laion2B-s34B-b79K" in message and "HF_HUB_CACHE=" in message
    assert f"model.init=open_clip:{ARCH}//path/to/the/file" in message


def test_another_data_tokenizer_is_refused_at_config_load(tmp_path):
    """open_clip:ARCH's BPE embeddings must not get a base YAML's sentencepiece ids; nor a small model BPE ids."""
    for sets in ([], [f"model.init=open_clip:{ARCH}/{TAG}"]):
        cfg = _run_config(f"data.tokenizer={tmp_path}/base.model", *sets)
        for check in (lambda: cfg.validate(1), lambda: cfg.check_inputs(resume="none")):
            with pytest.raises(ValueError) as err:
                check()
            assert "replaces the openclip-bpe tokenizer of model.name=open_clip:ViT-B-32" in str(err.value)
            assert "--set data.tokenizer=openclip-bpe" in str(err.value) and "\n" not in str(err.value)
    small = load_run_config(overrides=["model.name=moe-clip-tiny", "data.tokenizer=openclip-bpe"])
    with pytest.raises(ValueError, match=r"has 49408 tokens but model.text.vocab_size is \d+; use a tokenizer"):
        small.check_inputs(resume="none")


def test_no_dns_pre_check_behind_a_proxy(monkeypatch):
    import socket

    from moe_dist.models.openclip_arch import _unreachable

    def no_dns(*args, **kwargs):
        raise OSError("no DNS")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    url_tag = {"url": "https://openaipublic.azureedge.net/clip/models/x/ViT-B-32.pt"}  # a URL tag: not the hub
    assert "does not resolve" in _unreachable(url_tag)
    monkeypatch.setenv("https_proxy", "http://proxy:3128")
    assert _unreachable(url_tag) == ""


@pytest.mark.parametrize("name, overrides, init, expected", [
    # a non-ViT image tower: no transformer MLPs to turn into experts
    ("open_clip:RN50", {}, "", "the image tower is a ModifiedResNet (vision_cfg.layers=[3, 4, 6, 3])"),
    ("open_clip:convnext_tiny", {}, "", "the image tower is timm's convnext_tiny"),
    ("open_clip:ViT-M-16-alt", {}, "", "vision_cfg.ls_init_value=0.0001 is not supported"),
    ("open_clip:roberta-ViT-B-32", {}, "", "text_cfg.hf_model_name='roberta-base'"),
    ("open_clip:ViT-B-33", {}, "", "has no architecture 'ViT-B-33'; nearest: ViT-B-32"),
    ("open_clip:ViT-B-32", {"kind": "limoe"}, "", "towers differ (vision vs text: width 768 vs 512, heads 12 vs 8)"),
    # model.init against model.name, before any weights are looked for
    ("open_clip:ViT-B-32", {}, "open_clip:ViT-B-16/laion2b_s34b_b88k",
     "ViT-B-16 is not the architecture of model.name=open_clip:ViT-B-32 "
     "(ViT-B-16 vs model: vision.patch_size 16 vs 32)"),
    ("open_clip:ViT-B-32", {"text.layers": 6}, f"open_clip:{ARCH}/{TAG}", "text.layers 12 vs 6"),
    ("moe-clip-tiny", {}, f"open_clip:{ARCH}/{TAG}", "embed_dim 512 vs"),
    ("open_clip:ViT-B-32", {}, f"open_clip:{ARCH}/no_such_tag",
     "open_clip has no pretrained tag 'no_such_tag' for ViT-B-32; known tags: openai, laion400m_e31"),
    ("open_clip:ViT-B-32", {}, f"open_clip:{ARCH}/openai", "tag openai was trained with QuickGELU but ViT-B-32 "
     "computes GELU; use model.name=open_clip:ViT-B-32-quickgelu and model.init=open_clip:ViT-B-32-quickgelu/openai"),
    ("open_clip:ViT-B-32-quickgelu", {"moe.activation": "gelu", "vision.moe.every": 6}, f"open_clip:{ARCH}-quickgelu/"
     f"{__file__}", "the dense MLPs compute quick_gelu (model.quick_gelu=true) but visual.transformer.resblocks.5.mlp "
     "experts compute gelu"),
    ("open_clip:ViT-B-32", {}, f"open_clip:{ARCH}", "give a pretrained tag or a file after the architecture"),
    # a tag trained on other pixels than our eval transform gives (its preprocess cfg; no download)
    ("open_clip:ViT-L-14", {}, "open_clip:ViT-L-14/laion2b_s32b_b82k", "tag laion2b_s32b_b82k was trained with "
     "mean=(0.5, 0.5, 0.5) but moe_dist's image transform uses mean=(0.48145466"),
    ("open_clip:ViT-H-14-quickgelu", {}, "open_clip:ViT-H-14-quickgelu/dfn5b", "resize_mode='squash' but"),
    ("moe-clip-tiny", {}, "open_clip:RN50/openai", "model.init=open_clip:RN50: the image tower is a ModifiedResNet"),
    ("open_clip:ViT-S-32", {"kind": "limoe"}, f"open_clip:ViT-S-32/{__file__}", "is a one-tower LIMoE"),
])
def test_refused_in_one_line(name, overrides, init, expected):
    sets = [f"model.name={name}", "data.tokenizer=openclip-bpe"] + ([f"model.init={init}"] if init else [])
    sets += [f"model.{k}={v}" for k, v in overrides.items()]
    with pytest.raises(ValueError) as err:
        cfg = load_run_config(overrides=sets)
        cfg.model_config()
        cfg.check_inputs(resume="none")
    assert expected in str(err.value) and "\n" not in str(err.value)
