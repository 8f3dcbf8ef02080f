"""MoE vision-language models built from open_clip components.

    config.py      ModelConfig dataclasses and the JSON registry (configs/models/*.json)
    moe_blocks.py  MoE MLPs inside open_clip blocks; collecting aux losses and stats
    loss.py        ModelOutput; CLIP / SigLIP contrastive loss (open_clip, gathered across ranks) + MoE aux loss
    clip.py        two-tower MoE-CLIP
    limoe.py       single-tower LIMoE
    coca.py        CoCa-MoE: two towers + a multimodal text decoder (captioning, VQA) and its loss
    build.py       the model-kind registry: build_model, build_loss, create_model
    upcycle.py     sparse upcycling from a dense open_clip checkpoint
    params.py      parameter and FLOP accounting
    pretrained.py  load_pretrained (any checkpoint, export or Hub folder -> one-process model + tokenizer), export
    collapse.py    an MoE model made dense by an explicit rule (expert:I, mean) for open_clip
    interop.py     writers for other tools: an open_clip local-dir: folder, a torch.distributed.checkpoint directory
    hub.py         a Hugging Face Hub folder with a model card from the run, and pushing it
"""

from .build import MODEL_KINDS, build_loss, build_model, create_model, expert_parallel_share
from .clip import MoECLIP
from .coca import CoCa, CocaLoss
from .config import ModelConfig, list_models, load_model_config
from .limoe import LIMoE
from .loss import ModelOutput
from .pretrained import consolidated_state_dict, load_pretrained

__all__ = ["ModelConfig", "ModelOutput", "MoECLIP", "LIMoE", "CoCa", "CocaLoss", "MODEL_KINDS", "create_model",
           "build_model", "build_loss", "expert_parallel_share", "list_models",
           "load_model_config", "load_pretrained", "consolidated_state_dict"]
