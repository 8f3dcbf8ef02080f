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
# of HOSTFILE, or 127.0.0.1), MASTER_PORT=29500, FORWARD_ENV (extra variable names to forward),
# MOE_DIST_ALLOCATOR=auto (CPU ranks: tcmalloc when installed; tcmalloc | system).
# With a hostfile and ssh (NO_SSH unset), the DeepSpeed runner exports to remote ranks only the
# variables listed in .deepspeed_env in the current directory, so this writes the ones a job needs
# (OMP_NUM_THREADS, NCCL_*, PYTHONPATH, MOE_DIST_*, ...) there, mode 0600. Credentials (HF_TOKEN, any
# *TOKEN*/*SECRET*/*PASSWORD* name) are left out unless named in FORWARD_ENV.
set -euo pipefail

die() { echo "launch/deepspeed.sh: error: $*" >&2; exit 2; }

[ $# -ge 1 ] || die "usage: launch/deepspeed.sh CONFIG [moe-dist train args]"
CONFIG=$1; shift
[ -f "$CONFIG" ] || die "run config '$CONFIG' does not exist"
command -v deepspeed >/dev/null || die "the deepspeed launcher is not installed (pip install deepspeed)"

MASTER_PORT=${MASTER_PORT:-29500}
NO_SSH=${NO_SSH:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# CPU ranks: tcmalloc when installed (moe_dist/distributed/allocator.py says why; MOE_DIST_ALLOCATOR=system
# keeps glibc). GPU nodes keep the system allocator.
if ! nvidia-smi -L >/dev/null 2>&1; then
  eval "$(python3 -m moe_dist.distributed.allocator)"
fi

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

# What remote ranks need to see (the runner forwards only a few prefixes by itself). Only the pdsh/ssh
# runner reads .deepspeed_env; single-node and NO_SSH=1 ranks inherit this environment directly.
forwarded() {  # is variable $1 one that remote ranks need?
  [[ " ${FORWARD_ENV:-} " == *" $1 "* ]] && return 0
  case "$1" in
    *TOKEN*|*SECRET*|*PASSWORD*|*PASSWD*|*CREDENTIAL*) return 1 ;;
    # HF_HOME/HF_HUB_CACHE/HF_HUB_OFFLINE: where the cache is and whether to go online; no credentials
    OMP_NUM_THREADS|PYTHONPATH|PATH|LD_LIBRARY_PATH|LD_PRELOAD|NCCL_*|MOE_DIST_*|TORCH_*|CUDA_*|FI_*|UCX_*|GLOO_*) ;;
    HF_HOME|HF_HUB_CACHE|HF_HUB_OFFLINE) ;;
    *) return 1 ;;
  esac
}
write_deepspeed_env() {
  local tmp name value
  tmp=$(mktemp .deepspeed_env.XXXXXX)  # created 0600 whatever the umask; renamed over any older file
  trap "rm -f -- $tmp" EXIT  # (mktemp's name has no characters the shell would interpret)
  for name in $(compgen -e); do
    forwarded "$name" || continue
    value=${!name}
    # the runner reads one NAME=value per line and pastes the value into a remote shell command
    # inside double quotes, where newlines, $, `, " and \ would not survive
    if [[ "$value" == *[$'\n'\$\`\"\\]* ]]; then
      echo "launch/deepspeed.sh: warning: not forwarding $name to remote ranks:" \
           "its value holds a newline, \$, \`, \" or \\" >&2
      continue
    fi
    printf '%s=%s\n' "$name" "$value"
  done > "$tmp"
  mv -f "$tmp" .deepspeed_env
  trap - EXIT
}
if [ -n "${HOSTFILE:-}" ] && [ "$NO_SSH" != 1 ]; then
  write_deepspeed_env
fi

exec deepspeed "${launcher_args[@]}" --master_port "$MASTER_PORT" --module moe_dist train --config "$CONFIG" "$@"
