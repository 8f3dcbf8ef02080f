"""Sparse mixture-of-experts layer with DeepSpeed expert parallelism.

    router.py    logits -> Routing (which experts, gate weights); no communication
    dispatch.py  capacity policies and the token dispatcher (the only all-to-all)
    experts.py   stacked local experts, grouped compute
    losses.py    auxiliary losses and routing statistics
    layer.py     MoELayer composes them and returns MoEOutput
"""

from .config import MoEConfig
from .layer import MoELayer, MoEOutput

__all__ = ["MoEConfig", "MoELayer", "MoEOutput"]
