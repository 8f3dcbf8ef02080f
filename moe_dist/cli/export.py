"""``moe-dist export``: one safetensors file with every expert, the model config and the tokenizer embedded.

    moe-dist export --checkpoint PATH --out model.safetensors [--dtype fp32|bf16]
PATH is a run's checkpoint root (its newest complete checkpoint), one step directory, or an export (to
change its dtype). The file stands alone: ``moe_dist.models.load_pretrained("model.safetensors")``. The
format is in ``moe_dist/models/pretrained.py``.
"""

from __future__ import annotations

import argparse
import os


def _run(args: argparse.Namespace) -> int:
    from ..models.pretrained import experts_per_layer, export

    state = export(args.checkpoint, args.out, args.dtype, args.model_config, args.tokenizer)
    layers = experts_per_layer(state.state_dict)
    tokenizer = "sentencepiece (embedded)" if isinstance(state.tokenizer, bytes) else state.tokenizer
    step = "" if state.step is None else f" at step {state.step}"
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 2 ** 20:.1f} MiB, {args.dtype}): {state.config.kind} model "
          f"{state.config.name!r}{step}, {len(state.state_dict)} tensors, {len(layers)} MoE layers x "
          f"{max(layers.values(), default=0)} experts, tokenizer {tokenizer}; from {state.source}")
    return 0


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint, and what a checkpoint from before model_config.json needs (shared with reshard)."""
    p.add_argument("--checkpoint", required=True,
                   help="a run's checkpoint root (newest complete checkpoint), a step directory, or an export")
    p.add_argument("--model-config", metavar="NAME_OR_JSON",
                   help="the model the checkpoint was trained with, for checkpoints without model_config.json")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="the sentencepiece .model it was trained with (or openclip-bpe), instead of the one it carries")


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write one safetensors file with all experts, the config and the tokenizer",
                       description=__doc__.splitlines()[0])
    add_checkpoint_args(p)
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="precision of the weights in the file (bf16: half the size)")
    p.set_defaults(func=_run)
