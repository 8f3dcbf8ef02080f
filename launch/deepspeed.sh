#!/usr/bin/env bash
# Run a moe-dist training config through the deepspeed launcher, on one node or many.
#
#   launch/deepspeed.sh CONFIG [moe-dist train args, e.g. --set steps=1000 --resume auto]
#
# Single node:                         GPUS_PER_NODE=8 launch/deepspeed.sh configs/runs/x.yaml
# Multi-node over pdsh/ssh (default):  HOSTFILE=hosts launch/deepspeed.sh configs/runs/x.yaml
# Multi-node, one launcher per node:   HOSTFILE=hosts NO_SSH=1 NODE_RANK=<0..N-1> MASTER_ADDR=<node 0> \
#                                      launch/deepspeed.sh configs/runs/x.yaml      (run on every node)
#
# Environment (defaults): GPUS_PER_NODE (GPUs visible to nvidia-smi, else 1; ignored with HOSTFILE),
# HOSTFILE (DeepSpeed hostfile, "host slots=N" per line), NO_SSH=0, NODE_RANK, MASTER_ADDR (first host
# of HOSTFILE, or 127.0.0.1), MASTER_PORT=29500, FORWARD_ENV (extra variable names to forward).
# The DeepSpeed runner forwards only some variables to remote ranks, so this writes the ones a job
# needs (OMP_NUM_THREADS, NCCL_*, PYTHONPATH, MOE_DIST_*, ...) to .deepspeed_env in the current
# directory, which the runner reads.
set -euo pipefail

die() { echo "launch/deepspeed.sh: error: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: launch/deepspeed.sh CONFIG [moe-dist train args]"
CONFIG=$1; shift
[ -f "$CONFIG" ] || die "run config '$CONFIG' does not exist"
command -v deepspeed >/dev/null || die "the deepspeed launcher is not installed (pip install deepspeed)"

MASTER_PORT=${MASTER_PORT:-29500}
NO_SSH=${NO_SSH:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

launcher_args=()
if [ -n "${HOSTFILE:-}" ]; then
  [ -f "$HOSTFILE" ] || die "hostfile '$HOSTFILE' does not exist"
  n=0
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    line=${line%%#*}
    [ -z "${line// /}" ] && continue
    [[ "$line" =~ ^[[:space:]]*[^[:space:]]+[[:space:]]+slots=[0-9]+[[:space:]]*$ ]] || \
      die "line $n of hostfile '$HOSTFILE' is '$line'; each line must be 'hostname slots=N'"
  done < "$HOSTFILE"
  MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
  launcher_args+=(--hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR")
  if [ "$NO_SSH" = 1 ]; then
    [ -n "${NODE_RANK:-}" ] || die "NO_SSH=1 needs NODE_RANK (this node's index in the hostfile)"
    launcher_args+=(--no_ssh --node_rank "$NODE_RANK")
  fi
else
  if [ -z "${GPUS_PER_NODE:-}" ]; then
    GPUS_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
    [ "${GPUS_PER_NODE:-0}" -ge 1 ] 2>/dev/null || GPUS_PER_NODE=1
  fi
  launcher_args+=(--num_gpus "$GPUS_PER_NODE")
fi

# What remote ranks need to see (the runner forwards only a few prefixes by itself).
{
  for name in $(compgen -e); do
    case "$name" in
      OMP_NUM_THREADS|PYTHONPATH|PATH|LD_LIBRARY_PATH|NCCL_*|MOE_DIST_*|TORCH_*|CUDA_*|HF_*|FI_*|UCX_*|GLOO_*) ;;
      *) [[ " ${FORWARD_ENV:-} " == *" $name "* ]] || continue ;;
    esac
    printf '%s=%s\n' "$name" "${!name}"
  done
} > .deepspeed_env

exec deepspeed "${launcher_args[@]}" --master_port "$MASTER_PORT" --module moe_dist train --config "$CONFIG" "$@"
