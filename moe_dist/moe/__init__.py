"""Sparse mixture-of-experts layer with DeepSpeed expert parallelism.

    registry.py  one registry per family of variants, declared empty; each family's module fills its own
    config.py    MoEConfig (imports registry.py only)
    router.py    logits -> Routing (which experts, gate weights): top-k, threshold, top-p, Expert-Choice
    dispatch.py  capacity policies and the token dispatcher (the only all-to-all)
    experts.py   stacked local experts, grouped compute
    losses.py    auxiliary losses (balance over the micro batch, global batch or sequence) and statistics
    balance.py   load across micro batches and ranks: global-batch frequencies, the selection bias
    layer.py     MoELayer composes them and returns MoEOutput
    soft.py      Soft MoE: slots instead of routing, the same experts and dispatcher
    cost.py      arithmetic only: rows, FLOPs and active experts of a layer call (moe-dist params, plan)
Importing the package imports every module, so every registry is full before any MoEConfig is built.
"""

from . import soft  # noqa: F401  (registers the "soft" router and its layer)
from .balance import end_optimizer_step, record_loads
from .config import MoEConfig
from .layer import MoELayer, MoEOutput, build_moe_layer
from .router import IMAGE, MODALITY_NAMES, TEXT

__all__ = ["IMAGE", "MODALITY_NAMES", "MoEConfig", "MoELayer", "MoEOutput", "TEXT", "build_moe_layer",
           "end_optimizer_step", "record_loads"]
