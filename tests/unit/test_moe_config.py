"""Bad MoE configs raise ValueError naming the field and the fix."""

import pytest
import torch

from moe_dist.moe import MoEConfig, MoELayer

BASE = dict(hidden_size=8, ffn_hidden_size=16, num_experts=4)


@pytest.mark.parametrize("changes, words", [
    (dict(top_k=5), ["top_k=5", "num_experts=4"]),
    (dict(router="threshold", threshold=0.0), ["threshold=0.0", "(0, 1]"]),
    (dict(router="threshold", threshold=1.5), ["threshold=1.5", "(0, 1]"]),
    (dict(router="hash"), ["router='hash'", "'topk'", "'threshold'"]),
    (dict(drop_priority="fifo"), ["drop_priority='fifo'", "'score'"]),
    (dict(activation="tanh"), ["activation='tanh'", "'swiglu'"]),
    (dict(modality_experts=(3, 2)), ["modality_experts", "num_experts=4"]),
    (dict(modality_experts=(2, 0), top_k=3), ["top_k/max_k"]),
    (dict(capacity_factor=0.0), ["capacity_factor", "dropless=True"]),
    (dict(num_experts=0), ["num_experts=0"]),
])
def test_bad_config(changes, words):
    with pytest.raises(ValueError) as err:
        MoEConfig(**{**BASE, **changes})
    for word in words:
        assert word in str(err.value)


def test_ep_size_must_divide_num_experts():
    with pytest.raises(ValueError, match=r"num_experts=4 is not divisible by ep_size=3"):
        MoELayer(MoEConfig(**BASE), ep_size=3)


def test_ep_size_needs_distributed():
    with pytest.raises(ValueError, match=r"ep_size=2 needs torch.distributed"):
        MoELayer(MoEConfig(**BASE), ep_size=2)


def test_modality_experts_need_modality_tensor():
    import torch
    layer = MoELayer(MoEConfig(**BASE, modality_experts=(1, 1)))
    with pytest.raises(ValueError, match="needs modality="):
        layer(torch.randn(3, 8))


def test_modality_experts_build_on_the_meta_device():
    """Parameter counting and the planner build models under torch.device("meta"); the router's table
    of allowed experts per modality must build there too (it once used an operator meta cannot run)."""
    with torch.device("meta"):
        layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=16, top_k=2,
                                   modality_experts=(4, 4, 4)))
    assert layer.router.allowed_ME.shape == (4, 16) and layer.router.allowed_ME.is_meta
