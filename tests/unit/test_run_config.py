"""Run-config validation (before any process group) and launcher environment detection."""

import pytest

from moe_dist.distributed import detect_env, expand_nodelist
from moe_dist.engine import load_run_config

BASE = ["data.train=x"]


def _cfg(*sets):
    return load_run_config(None, list(BASE) + list(sets))


@pytest.mark.parametrize("sets, world, words", [
    (["batch.global_batch=100", "batch.micro_batch=8", "batch.grad_accum=2"], 2,
     ["batch.global_batch=100", "= 32", "adjust micro_batch/grad_accum"]),
    (["ep_size=3"], 2, ["ep_size=3 must divide the world size 2"]),
    (["ep_size=8"], 8, ["ep_size=8 must divide model.moe.num_experts=4"]),
    (["precision=fp8"], 1, ["precision='fp8' is unknown", "'bf16'"]),
    (["zero_stage=3"], 2, ["zero_stage=3 is refused", "does not support ZeRO stage 3"]),
    (["model.moe.num_experts=6", "ep_size=4"], 4, ["ep_size=4 must divide model.moe.num_experts=6"]),
    (["data.mode=shuffled"], 1, ["data.mode='shuffled'"]),
    (["checkpoint.keep=1"], 1, ["checkpoint.keep >= 2"]),
    (["data.weights=[1,2]"], 1, ["data.weights=[1, 2] must give one positive weight per source", "1 sources"]),
])
def test_invalid_run_configs(sets, world, words):
    with pytest.raises(ValueError) as err:
        _cfg(*sets).validate(world)
    for word in words:
        assert word in str(err.value)


def test_unknown_fields_and_bad_overrides():
    with pytest.raises(ValueError, match=r"run config has unknown fields \['stepz'\]"):
        _cfg("stepz=3")
    with pytest.raises(ValueError, match=r"batch has unknown fields \['micro'\]"):
        _cfg("batch.micro=3")
    with pytest.raises(ValueError, match="is not KEY=VALUE"):
        _cfg("steps")


def test_generated_deepspeed_config_states_batch_once():
    cfg = _cfg("batch.micro_batch=4", "batch.grad_accum=3", "zero_stage=1", "precision=bf16")
    cfg.validate(2)
    ds = cfg.deepspeed_config(2)
    assert ds["train_batch_size"] == 24 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    # the planner's ZeRO bucket: 1/16 of moe-clip-tiny's 887,553 parameters is 55,473, below its largest
    # tensors (the text token embedding [1024, 64] and each expert stack [4, 64, 256]: 65,536), so 65,536
    assert ds["zero_optimization"] == {"stage": 1, "reduce_bucket_size": 65_536, "allgather_bucket_size": 65_536}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert cfg.model_config().moe_config(64).num_experts == 4


def test_zero_bucket_elements_field():
    # a set value reaches both buckets as it is; 0 (the default) is the planner's choice (above)
    ds = _cfg("zero_bucket_elements=4096").deepspeed_config(2)["zero_optimization"]
    assert ds["reduce_bucket_size"] == 4096 == ds["allgather_bucket_size"]
    for bad in ("-2", "7"):  # DeepSpeed asserts allgather_bucket_size % 2 == 0
        with pytest.raises(ValueError) as err:
            _cfg(f"zero_bucket_elements={bad}")
        assert f"zero_bucket_elements={bad} must be 0" in str(err.value) and "multiple of 2" in str(err.value)


def test_exponent_numbers_without_a_dot_are_numbers():
    """YAML 1.1 reads 3e-4 as a string; a float field takes it as the number (and still refuses words)."""
    assert _cfg("optimizer.lr=3e-4").optimizer.lr == 3e-4
    assert _cfg("optimizer.weight_decay=+2E-1").optimizer.weight_decay == 0.2
    with pytest.raises(ValueError, match="optimizer.lr='fast' must be a number"):
        _cfg("optimizer.lr=fast")
    with pytest.raises(ValueError, match="steps='3e2' must be an integer"):
        _cfg("steps=3e2")


def test_model_overrides_from_set():
    cfg = _cfg("model.moe.top_k=2", "model.name=limoe-tiny")
    assert cfg.model.name == "limoe-tiny" and cfg.model_config().moe["top_k"] == 2


def test_cli_reports_config_errors_without_starting_ranks(tmp_path):
    import subprocess

    res = subprocess.run(["moe-dist", "train", "--set", "data.train=x", "--set", "zero_stage=3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "zero_stage=3 is refused" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.parametrize("env, want", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"},
     (3, 8, 1, "h0", 1234, "torchrun")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]",
      "SLURM_JOB_ID": "42", "MASTER_ADDR": "gpu07"}, (5, 16, 1, "gpu07", 20042, "slurm")),
    ({"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "0"},
     (2, 4, 0, "127.0.0.1", 29500, "mpi")),
])
def test_detect_env(env, want):
    got = detect_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr, got.master_port, got.launcher) == want


def test_single_process_without_launcher():
    got = detect_env({})
    assert (got.rank, got.world_size, got.launcher) == (0, 1, "none") and got.master_port > 0


def test_expand_nodelist():
    assert expand_nodelist("gpu[01-03,07]") == ["gpu01", "gpu02", "gpu03", "gpu07"]
    assert expand_nodelist("a1,b[9-10],c") == ["a1", "b9", "b10", "c"]
