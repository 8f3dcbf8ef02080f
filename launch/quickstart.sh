#!/usr/bin/env bash
# Quickstart: make the synth dataset and its tokenizer (once), then train the tiny MoE-CLIP with
# NUM_RANKS ranks (default 2; ep_size=2, ZeRO-2) through the deepspeed launcher. CPU-only works.
#   bash launch/quickstart.sh [extra moe-dist train args, e.g. --set steps=100]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-datasets/synth}
NUM_RANKS=${NUM_RANKS:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ ! -f "$DATA/manifest.json" ]; then
  moe-dist-data synth --out "$DATA" --n "${SYNTH_N:-2000}" --val-fraction 0.05
fi
if [ ! -f "$DATA/tok.model" ]; then
  moe-dist-data tokenizer "$DATA/train" --out "$DATA/tok.model" --vocab-size 1000
fi
exec deepspeed --num_gpus "$NUM_RANKS" --master_port "${MASTER_PORT:-29500}" --module moe_dist train \
  --config configs/runs/tiny-synth.yaml \
  --set data.train="$DATA/train" --set data.val="$DATA/val" --set data.tokenizer="$DATA/tok.model" \
  --set eval.tasks=[loss,zeroshot,retrieval] --set eval.classes="$DATA/classes.json" "$@"
