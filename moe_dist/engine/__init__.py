"""Training engine: run config, DeepSpeed setup, the loop, checkpoints, metrics.

    config.py      RunConfig (YAML + --set), validation, generated DeepSpeed config
    optim.py       AdamW param groups (incl. DeepSpeed MoE groups) and LR schedule
    checkpoint.py  complete-only checkpoints with commit marker; resume
    metrics.py     TensorBoard, metrics.jsonl, progress bar, start summary
    trainer.py     Trainer and ``run``
"""

from .config import RunConfig, load_run_config

__all__ = ["RunConfig", "load_run_config"]
