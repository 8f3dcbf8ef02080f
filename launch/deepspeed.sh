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
# With a hostfile of two or more hosts and ssh (NO_SSH unset), DeepSpeed's pdsh runner starts the nodes'
# launchers with one shell command line: it pastes into it, unquoted, the training arguments, the working
# directory, MASTER_ADDR and every variable it forwards ("export NAME=value;", visible in ps and printed in
# its log). So in that mode this script (docs/guarantees.md, docs/launching.md):
#   - hands the training arguments over as one base64 word (moe_dist/distributed/launch_argv.py), so each
#     reaches `moe-dist train` byte for byte and none runs or expands on a node;
#   - starts the runner without any credential-named variable (*TOKEN*, *SECRET*, *PASSWORD*, *PASSWD*,
#     *CREDENTIAL*, *API_KEY*, *APIKEY*, *ACCESS_KEY*, *PRIVATE_KEY*, any case), without any variable whose
#     value a remote shell or pdsh would change (newline, $, `, ", \, %, surrounding blanks), and without
#     any name that is not a shell identifier, so the runner can forward none of them; FORWARD_ENV may not
#     name a credential;
#   - writes the variables the ranks need (OMP_NUM_THREADS, NCCL_*, PYTHONPATH, MOE_DIST_*, ...) to
#     .deepspeed_env in the current directory, mode 0600, and points the runner at that file alone
#     (DS_ENV_FILE; ~/.deepspeed_env is not read);
#   - refuses a working directory, MASTER_ADDR or hostfile host name with characters a shell would read.
# Single-node and NO_SSH=1 launches start their ranks without a shell: the ranks inherit this environment
# (credentials included) and the arguments as they are; only credential-named variables whose name holds
# NCCL are removed, because deepspeed.launcher.launch prints every such variable with its value.
set -euo pipefail

die() { echo "launch/deepspeed.sh: error: $*" >&2; exit 2; }
warn() { echo "launch/deepspeed.sh: warning: $*" >&2; }

[ $# -ge 1 ] || die "usage: launch/deepspeed.sh CONFIG [moe-dist train args]"
CONFIG=$1; shift
[ -f "$CONFIG" ] || die "run config '$CONFIG' does not exist"
command -v deepspeed >/dev/null || die "the deepspeed launcher is not installed (pip install deepspeed)"

MASTER_PORT=${MASTER_PORT:-29500}
[[ "$MASTER_PORT" =~ ^[0-9]+$ ]] || die "MASTER_PORT '$MASTER_PORT' is not a port number"
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
  n=0 hosts=0
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    line=${line%%#*}
    [ -z "${line// /}" ] && continue
    [[ "$line" =~ ^[[:space:]]*[^[:space:]]+[[:space:]]+slots=[0-9]+[[:space:]]*$ ]] || \
      die "line $n of hostfile '$HOSTFILE' is '$line'; each line must be 'hostname slots=N'"
    read -r host _ <<< "$line"
    # the runner pastes the first host (MASTER_ADDR) into a shell command and hands the list to pdsh -w
    [[ "$host" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || \
      die "line $n of hostfile '$HOSTFILE': '$host' is not a host name (letters, digits, '.', '-', '_')"
    hosts=$((hosts + 1))
  done < "$HOSTFILE"
  MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$HOSTFILE")}
  [[ "$MASTER_ADDR" =~ ^[A-Za-z0-9._:-]+$ ]] || \
    die "MASTER_ADDR '$MASTER_ADDR' is not a host name or IP address (letters, digits, '.', '-', '_', ':')"
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

# A launch over pdsh (two or more hosts, NO_SSH unset) reaches the nodes through a remote shell command
# line; every other launch starts its ranks locally, without a shell.
over_pdsh=0
if [ -n "${HOSTFILE:-}" ] && [ "$NO_SSH" != 1 ] && [ "$hosts" -ge 2 ]; then
  over_pdsh=1
fi

credential() {  # does the variable name $1 hold a secret, by convention (any case)?
  case "${1^^}" in
    *TOKEN*|*SECRET*|*PASSWORD*|*PASSWD*|*CREDENTIAL*|*API_KEY*|*APIKEY*|*ACCESS_KEY*|*PRIVATE_KEY*) return 0 ;;
  esac
  return 1
}
forwarded() {  # is variable $1 one that remote ranks need (written to .deepspeed_env)?
  credential "$1" && return 1
  [[ " ${FORWARD_ENV:-} " == *" $1 "* ]] && return 0
  case "$1" in
    # HF_HOME/HF_HUB_CACHE/HF_HUB_OFFLINE: where the cache is and whether to go online; no credentials
    OMP_NUM_THREADS|PYTHONPATH|PATH|LD_LIBRARY_PATH|LD_PRELOAD|NCCL_*|MOE_DIST_*|TORCH_*|CUDA_*|FI_*|UCX_*|GLOO_*) ;;
    HF_HOME|HF_HUB_CACHE|HF_HUB_OFFLINE) ;;
    *) return 1 ;;
  esac
}
runner_forwards() {  # does DeepSpeed's runner export $1 by itself (runner.EXPORT_ENVS and the accelerators'
  # export_envs() in DeepSpeed 0.19.8)? Only decides the warning: the stripping below does not rely on it.
  case "$1" in
    MLFLOW*|PYTHON*|MV2*|UCX*|NCCL*|BKCL*|XPU*|XMLIR*|LD_LIBRARY*|PATH*|NEUWARE_HOME*|CNCL*|ASCEND*|HCCL*|BCCL*|\
    BIREN*|SUPA*) return 0 ;;
  esac
  return 1
}
# Remove from the environment the runner sees what it must not see. Over pdsh ($1 = pdsh): every
# credential, every value a remote shell or pdsh would change (the runner pastes values it forwards
# into the command line, double-quoted at most) and every name that is not an identifier (bash passes
# those on; the runner would paste the name unquoted). Locally: credentials whose name holds NCCL,
# which deepspeed.launcher.launch prints with their values. Valid names are unset here; the others
# are left for `env -u` (bash cannot unset them), in not_identifiers.
not_identifiers=()
strip_env() {
  local entry name value
  while IFS= read -r -d '' entry; do
    name=${entry%%=*} value=${entry#*=}
    if [ "$1" = pdsh ]; then
      if credential "$name"; then
        :
      elif ! [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
        runner_forwards "$name" && warn "not forwarding $(printf %q "$name") to remote ranks: not a variable name"
      elif [[ "$value" == *[$'\n'\$\`\"\\%]* || "$value" =~ ^[[:space:]] || "$value" =~ [[:space:]]$ ]]; then
        if forwarded "$name" || runner_forwards "$name"; then
          warn "not forwarding $name to remote ranks: its value holds a newline, \$, \`, \", \\ or %, or starts" \
               "or ends with a blank, which the remote shell or pdsh would change"
        fi
      else
        continue
      fi
    else
      [[ "$name" == *NCCL* ]] && credential "$name" || continue
    fi
    if [[ "$name" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
      unset "$name"
    else
      not_identifiers+=(-u "$name")
    fi
  done < <(env -0)
}
write_deepspeed_env() {  # the variables remote ranks need, for the runner to export; mode 0600
  local tmp name
  tmp=$(mktemp .deepspeed_env.XXXXXX)  # created 0600 whatever the umask; renamed over any older file
  trap "rm -f -- $tmp" EXIT  # (mktemp's name has no characters the shell would interpret)
  for name in $(compgen -e); do
    if forwarded "$name"; then
      printf '%s=%s\n' "$name" "${!name}"  # one NAME=value a line, as the runner reads it
    fi
  done > "$tmp"
  mv -f "$tmp" .deepspeed_env
  trap - EXIT
}

train=(train --config "$CONFIG" "$@")
if [ "$over_pdsh" = 1 ]; then
  read -r -a names <<< "${FORWARD_ENV:-}"
  for name in "${names[@]}"; do
    credential "$name" && die "FORWARD_ENV names $name, a credential: the pdsh runner would put its value on" \
      "its command line (ps on every node) and in its log; let the ranks read it from a file on the nodes" \
      "instead (e.g. \$HF_HOME/token, ~/.aws/credentials)"
  done
  # the runner pastes the directory into the remote command ("cd DIR;") and prepends it to PYTHONPATH
  cwd=$(pwd -P)
  [[ "$cwd" =~ ^[A-Za-z0-9_@+=:,./-]+$ ]] || die "the working directory '$cwd' has characters that the" \
    "remote shell or pdsh would read (the runner pastes it unquoted into the nodes' command); launch from a" \
    "directory whose path has only letters, digits and _@+=:,./-"
  # the runner also reads ~/.deepspeed_env (and DS_ENV_FILE names another file): point it at ours alone
  if [ -f "${HOME:-/nonexistent}/.deepspeed_env" ] || [[ "${DS_ENV_FILE:-.deepspeed_env}" != .deepspeed_env ]]; then
    warn "ignoring ~/.deepspeed_env and DS_ENV_FILE: export the variables the ranks need (FORWARD_ENV for" \
         "names outside the default list); this script writes ./.deepspeed_env"
  fi
  strip_env pdsh
  write_deepspeed_env
  export DS_ENV_FILE="$cwd/.deepspeed_env"
  # one word that neither the remote shell nor pdsh interprets (moe_dist/distributed/launch_argv.py)
  train=("--argv-base64=$(printf '%s\0' "${train[@]}" | base64 | tr -d '\n')")
else
  strip_env local
fi

exec env "${not_identifiers[@]}" deepspeed "${launcher_args[@]}" --master_port "$MASTER_PORT" --module moe_dist \
  "${train[@]}"
