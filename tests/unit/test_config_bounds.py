"""Issue 25, items 7 and 8: every number in a config is finite and in range, and what a YAML file or a
``--set`` value expands to is bounded.

NaN passes every ``<``/``>`` range check and ``1e999`` reads as inf, so each is refused where the config
loads, with the field's name; a YAML alias bomb is refused before anything is expanded or written.
"""

import subprocess
import sys

import pytest

from moe_dist.config import MAX_CONFIG_NODES, load_yaml, parse_overrides
from moe_dist.engine.config import load_run_config


def refused(tmp_path, text, *overrides):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        cfg = load_run_config(str(path), list(overrides))
        cfg.model_config()  # the model's fields (model.overrides) are checked when it is built
    return str(err.value)


@pytest.mark.parametrize("field", [
    "optimizer.lr", "optimizer.eps", "optimizer.weight_decay", "grad_clip", "stop_timeout_s",
    "data.remote_timeout_s", "data.remote_backoff_s", "data.max_failure_fraction", "schedule.min_lr_ratio",
    "model.overrides.moe.capacity_factor", "model.overrides.init_logit_scale", "model.overrides.vision.mlp_ratio",
])
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e999", "-1.0e999"])
def test_non_finite_numbers_are_refused_with_the_field_name(tmp_path, field, value):
    message = refused(tmp_path, "", f"{field}={value}")
    leaf = field.split(".")[-1]
    assert leaf in message and "finite" in message, message


def test_nan_in_a_yaml_file_names_its_field(tmp_path):
    message = refused(tmp_path, "data:\n  remote_timeout_s: .nan\n")
    assert "data.remote_timeout_s" in message and "finite" in message, message


@pytest.mark.parametrize("override, field", [
    ("seed=18446744073709551616", "seed"),  # 2**64: torch.manual_seed raised later, naming no field
    ("seed=4294967296", "seed"),  # 2**32: past what the data stream's seeds take
    ("steps=99999999999999999999999", "steps"),
    ("data.weights=[1, .nan]", "data.weights[1]"),
    ("model.overrides.vision.heads=0", "heads"),  # was a ZeroDivisionError
    ("model.overrides.moe.capacity_factor=abc", "capacity_factor"),  # was a TypeError in a comparison
    ("model.overrides.text.eos_id=100000", "eos_id"),
])
def test_out_of_range_numbers_are_refused_with_the_field_name(tmp_path, override, field):
    message = refused(tmp_path, "", override)
    assert field in message, message


def test_a_yaml_alias_bomb_is_refused_before_it_is_expanded(tmp_path):
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]  # 10**9 leaves
    text = "model:\n  overrides:\n    " + "\n    ".join(levels) + "\n"
    message = refused(tmp_path, text)
    assert f"{MAX_CONFIG_NODES:,}" in message and "alias" in message, message
    with pytest.raises(ValueError, match="alias"):  # the same through --set
        parse_overrides(["model.overrides={a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                         "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b], d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                         "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], f: [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]}"])


def test_yaml_merge_keys_work_and_duplicates_are_still_refused(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("base: &base {lr: 0.001, eps: 1.0e-8}\noptimizer:\n  <<: *base\n  lr: 0.002\n")
    assert load_yaml(str(path))["optimizer"] == {"lr": 0.002, "eps": 1e-8}  # the key given here wins
    path.write_text("optimizer:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(ValueError, match="appears twice"):
        load_yaml(str(path))


def test_a_config_that_is_not_a_regular_file_is_refused(tmp_path):
    import os

    fifo = tmp_path / "run.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):  # open() of a FIFO blocked forever
        load_yaml(str(fifo))


@pytest.mark.parametrize("argv", [
    ["moe_dist", "plan", "--config", "x.yaml", "--nodes", "1", "--gpus-per-node", "1", "--gpu-memory-gb", "nan"],
    ["data_tools.cli", "shard", "in.csv", "--out", "o", "--val-fraction", "inf"],
])
def test_float_flags_refuse_non_finite_values(argv):
    res = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "finite" in res.stderr, res.stderr[-800:]
