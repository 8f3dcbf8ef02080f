"""``moe-dist export --format torch_dcp``: one process writes a torch.distributed.checkpoint directory, and
2 gloo ranks load it back with DCP, each the shared weights plus only its own experts (the ep_size=2 split,
DeepSpeed's placement), bit for bit."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers.harness import run_ranks
from moe_dist.cli import main
from moe_dist.config import from_dict
from moe_dist.models.build import build_model
from moe_dist.models.config import MODEL_CONFIG_FILE, TOKENIZER_FILE, ModelConfig, load_model_config
from moe_dist.models.pretrained import DTYPES, PretrainedState, load_pretrained, write_export
from moe_dist.text.tokenizer import train_sentencepiece

EXPERT = ".deepspeed_experts."


def _mine(name, rank, experts_per_rank=2):
    """Whether rank ``rank`` of an ep_size=2 split holds tensor ``name`` (every non-expert tensor, and the
    experts [2 * rank, 2 * rank + 2) of each layer)."""
    if EXPERT not in name:
        return True
    return int(name.split(EXPERT)[1].split(".")[0]) // experts_per_rank == rank


def _load_ranks(rank, world_size, exports, export_file):
    """``_load_rank`` for each (folder, dtype) of ``exports``, in one start of the ranks."""
    return [_load_rank(rank, folder, dtype, export_file) for folder, dtype in exports]


def _load_rank(rank, folder, dtype, export_file):
    """What torchtitan-style code does: the model from the folder's model_config.json, empty tensors of the
    names and shapes it needs (NaN, so nothing left unread passes), then ``dcp.load``. Returns the names
    loaded and those that differ from the export file's tensors in dtype or in any bit (compared here: a
    rank's tensors do not outlive it)."""
    import torch.distributed.checkpoint as dcp

    with open(os.path.join(folder, MODEL_CONFIG_FILE)) as f:
        cfg = from_dict(ModelConfig, json.load(f), MODEL_CONFIG_FILE)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(cfg).state_dict().items()}
    wanted = {k: torch.full(shape, float("nan"), dtype=dtype) for k, shape in shapes.items() if _mine(k, rank)}
    dcp.load(wanted, checkpoint_id=folder)  # the default process group: both ranks plan the read together
    want = {k: v.to(dtype) for k, v in load_file(export_file).items()}  # fp32 in the file
    return sorted(wanted), [k for k, v in wanted.items() if v.dtype != want[k].dtype or not torch.equal(v, want[k])]


@pytest.mark.world_size(2)
def test_a_dcp_export_loads_on_two_ranks_bit_for_bit(tmp_path, capsys):
    cfg = load_model_config("moe-clip-tiny")
    torch.manual_seed(0)
    tokenizer = train_sentencepiece([f"a red circle number {i}" for i in range(50)], vocab_size=32)
    state = PretrainedState(cfg, build_model(cfg).state_dict(), tokenizer, "built in the test", step=3)
    src = str(tmp_path / "model.safetensors")
    write_export(state, src)
    exports = []
    for dtype in ("fp32", "bf16"):
        out = str(tmp_path / f"dcp_{dtype}")
        assert main(["export", "--checkpoint", src, "--format", "torch_dcp", "--dtype", dtype, "--out", out]) == 0
        assert "torch_dcp" in capsys.readouterr().out
        assert {".metadata", MODEL_CONFIG_FILE, TOKENIZER_FILE} <= set(os.listdir(out))
        exports.append((out, DTYPES[dtype]))
    want = load_pretrained(src)[0].state_dict()
    for rank, per_export in enumerate(run_ranks(_load_ranks, 2, args=(exports, src))):
        for names, differ in per_export:
            assert names == sorted(k for k in want if _mine(k, rank))
            assert sum(EXPERT in k for k in names) == 4 * 2 * 4  # 4 MoE layers x 2 experts x (w1, b1, w2, b2)
            assert differ == []
