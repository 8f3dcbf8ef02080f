"""``moe-dist export``: a trained model in a file or folder that stands alone, in our format or another tool's.

    moe-dist export --checkpoint PATH --out model.safetensors [--dtype fp32|bf16]
    moe-dist export --checkpoint PATH --format open_clip --out DIR [--collapse expert:I|mean|routed-mass:FILE] [--dtype ...]
    moe-dist export --checkpoint PATH --format hub --out DIR [--push REPO] [--dtype ...]
    moe-dist export --checkpoint PATH --format torch_dcp --out DIR [--dtype ...]
PATH is a run's checkpoint root (its newest complete checkpoint), one step directory, an export (to change its
dtype or format) or a Hub folder; a checkpoint of any ep_size is gathered on this one process.
    safetensors  one file with every expert, the model config and the tokenizer embedded
                 (``moe_dist.models.load_pretrained(FILE)``; format in ``moe_dist/models/pretrained.py``)
    open_clip    a folder ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads: a dense CLIP with
                 the openclip-bpe tokenizer; an MoE model only with --collapse (it changes the model)
    hub          config.json, model.safetensors, the tokenizer and a README.md model card from the run
                 (``load_pretrained(DIR)``); --push REPO uploads it with huggingface_hub
    torch_dcp    a torch.distributed.checkpoint directory (plus model_config.json) for DCP / torchtitan code
Formats and what round-trips exactly: docs/interop.md.
"""

from __future__ import annotations

import argparse
import os

FORMATS = ("safetensors", "open_clip", "hub", "torch_dcp")


def _run(args: argparse.Namespace) -> int:
    from ..models.pretrained import DTYPES, consolidated_state_dict, experts_per_layer, export

    if args.collapse and args.format != "open_clip":
        raise ValueError(f"--collapse applies to --format open_clip only (got --format {args.format}); the other "
                         "formats keep every expert")
    if args.push and args.format != "hub":
        raise ValueError(f"--push applies to --format hub only (got --format {args.format})")
    if args.format == "safetensors":
        state = export(args.checkpoint, args.out, args.dtype, args.model_config, args.tokenizer)
    else:
        if args.dtype not in DTYPES:
            raise ValueError(f"--dtype {args.dtype!r}; use one of {sorted(DTYPES)}")
        state = consolidated_state_dict(args.checkpoint, args.model_config, args.tokenizer)
        state = _write(state, args)
    layers = experts_per_layer(state.state_dict)
    tokenizer = "sentencepiece (embedded)" if isinstance(state.tokenizer, bytes) else state.tokenizer
    step = "" if state.step is None else f" at step {state.step}"
    print(f"wrote {args.out} ({args.format}, {_size_mib(args.out):.1f} MiB, {args.dtype}): {state.config.kind} model "
          f"{state.config.name!r}{step}, {len(state.state_dict)} tensors, {len(layers)} MoE layers x "
          f"{max(layers.values(), default=0)} experts, tokenizer {tokenizer}; from {state.source}")
    if args.push:
        from ..models.hub import push_folder

        print(f"pushed {args.out} to {push_folder(args.out, args.push)}")
    return 0


def _write(state, args: argparse.Namespace):
    """Write ``state`` in ``args.format`` to ``args.out``; returns the state written (collapsed or not)."""
    if args.format == "open_clip":
        from ..models.collapse import CollapseRule, collapse
        from ..models.interop import check_open_clip_kind, write_open_clip

        check_open_clip_kind(state)  # a model open_clip cannot load is refused before any collapsing message
        if args.collapse:
            state = collapse(state, CollapseRule.parse(args.collapse))
            print(f"collapsed every MoE layer by --collapse {args.collapse}: the dense model differs from the MoE "
                  "one unless all experts are equal (docs/interop.md)")
        write_open_clip(state, args.out, args.dtype)
    elif args.format == "hub":
        from ..models.hub import write_hub

        write_hub(state, args.out, args.dtype)
    else:
        from ..models.interop import write_dcp

        write_dcp(state, args.out, args.dtype)
    return state


def _size_mib(path: str) -> float:
    if os.path.isfile(path):
        return os.path.getsize(path) / 2 ** 20
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2 ** 20


def add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    """--checkpoint, and what a checkpoint from before model_config.json needs (shared with reshard)."""
    p.add_argument("--checkpoint", required=True,
                   help="a run's checkpoint root (newest complete checkpoint), a step directory, an export, or a "
                        "Hub folder")
    p.add_argument("--model-config", metavar="NAME_OR_JSON",
                   help="the model the checkpoint was trained with, for checkpoints without model_config.json")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="the sentencepiece .model it was trained with (or openclip-bpe), instead of the one it carries")


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="a model that stands alone: one safetensors file, an open_clip or Hub folder, "
                                      "or a torch DCP directory", description=__doc__.splitlines()[0])
    add_checkpoint_args(p)
    p.add_argument("--out", required=True,
                   help="the .safetensors file to write (--format safetensors), else a new or empty directory")
    p.add_argument("--format", choices=FORMATS, default="safetensors",
                   help="safetensors (default): one file; open_clip: a local-dir: folder for open_clip; hub: a "
                        "Hugging Face Hub folder with a model card; torch_dcp: torch.distributed.checkpoint")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="precision of the weights written (bf16: half the size)")
    p.add_argument("--collapse", metavar="RULE",
                   help="open_clip only: make an MoE model dense, expert:I (keep expert I of every MoE layer), "
                        "mean (average the experts' weights) or routed-mass:routing.json (weight them by the "
                        "assignments of moe-dist analyze-routing); changes the model unless all experts are equal")
    p.add_argument("--push", metavar="REPO",
                   help="hub only: upload the folder to this Hub model repo (needs huggingface_hub and a token: "
                        "HF_TOKEN or `hf auth login`)")
    p.set_defaults(func=_run)
