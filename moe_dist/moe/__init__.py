"""Sparse mixture-of-experts layer with DeepSpeed expert parallelism.

    registry.py  one registry per family of variants (routers, noise, drop priorities, activations, backends)
    router.py    logits -> Routing (which experts, gate weights); no communication
    dispatch.py  capacity policies and the token dispatcher (the only all-to-all)
    experts.py   stacked local experts, grouped compute
    losses.py    auxiliary losses and routing statistics
    layer.py     MoELayer composes them and returns MoEOutput
"""

from .config import MoEConfig
from .layer import MoELayer, MoEOutput
from .router import IMAGE, MODALITY_NAMES, TEXT

__all__ = ["IMAGE", "MODALITY_NAMES", "MoEConfig", "MoELayer", "MoEOutput", "TEXT"]
