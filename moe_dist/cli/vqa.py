"""``moe-dist vqa``: visual question answering accuracy of a CoCa checkpoint on VQA shards.

Each sample's json gives "question" and "answer" (and "question_type"); the answer is decoded after the
prompt "question: Q answer:" and scored by exact match after VQA answer normalisation (lowercase,
punctuation and articles removed, number words as digits), overall and per question type, beside the
majority-answer baseline of each type.
"""

from __future__ import annotations

import argparse
import os
import sys

from .caption import add_generation_flags, generation_config, load_model


def _run(args: argparse.Namespace) -> int:
    import json

    from ..data.urls import shown_spec
    from ..evaluation.captioning import check_vqa_data, generate_over, vqa_scores
    from ..files import atomic_json, atomic_write

    cfg = generation_config(args)
    check_vqa_data(args.data, args.allow_pipe)
    model, tokenizer = load_model(args.checkpoint)
    rows = generate_over(model, tokenizer, args.data, "vqa", cfg, args.batch, allow_pipe=args.allow_pipe,
                         progress=sys.stderr.isatty())
    scores = vqa_scores(rows)
    print(f"vqa of {args.checkpoint} on {shown_spec(args.data)}: {scores['questions']} questions, "
          f"{args.strategy} decoding")
    print(f"  {'all':12s} accuracy {scores['accuracy']:.4f}  majority baseline {scores['majority_baseline']:.4f}  "
          f"(one answer for all: {scores['single_answer_baseline']:.4f})")
    for qtype, s in scores["per_type"].items():
        print(f"  {qtype:12s} accuracy {s['accuracy']:.4f}  majority baseline {s['majority_baseline']:.4f}  "
              f"({s['questions']} questions)")
    if args.json:
        atomic_json(args.json, {"checkpoint": args.checkpoint, "data": shown_spec(args.data), **scores},
                    durable=False)
        print(f"wrote {args.json}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        atomic_write(args.out, "".join(json.dumps({"key": f"{r['key'][0]}:{r['key'][1]}",
                                                   "question": r["metadata"]["question"], "answer": r["generated"],
                                                   "reference": r["metadata"]["answer"]}) + "\n" for r in rows),
                     durable=False)
        print(f"wrote {args.out}")
    return 0


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vqa", help="VQA exact-match accuracy (overall, per question type) of a CoCa checkpoint",
                       description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True,
                   help="a CoCa run's checkpoint root, one step directory, or an exported .safetensors file")
    p.add_argument("--data", required=True, help="shard spec of VQA samples (json question, answer, question_type), "
                                                 "e.g. the --out DIR/heldout of moe-dist-data synth --vqa")
    p.add_argument("--json", metavar="OUT", help="write the scores as JSON")
    p.add_argument("--out", metavar="FILE", help="write JSONL {key, question, answer, reference}")
    p.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run shell commands)")
    add_generation_flags(p, max_length=8)
    p.set_defaults(func=_run)
