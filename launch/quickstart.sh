#!/usr/bin/env bash
# Quickstart: runs `moe-dist quickstart` from the repository root (synth data, tokenizer, tiny MoE-CLIP on 2
# ranks through the deepspeed launcher, eval, export, routing plots; writes runs/quickstart/summary.json).
#   bash launch/quickstart.sh [--out DIR] [--steps N] [--ranks N] [--model NAME] [--data SPEC] ...
set -euo pipefail
cd "$(dirname "$0")/.."
exec moe-dist quickstart "$@"
