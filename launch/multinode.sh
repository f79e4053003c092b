#!/usr/bin/env bash
# Multi-node GPU training without torchrun or SLURM: one process per node (driving all its GPUs)
# or one per GPU, wired together by jax.distributed through the OWL_* environment.
#
# From one machine, over ssh (passwordless; same checkout path and shared filesystem on all):
#   launch/multinode.sh --hosts node0,node1 [options] -- --config configs/owl1/owl_7b_stage1.py --workdir /shared/run
# Or on every node yourself (pdsh, Kubernetes, cloud VMs ...), the same line with its rank:
#   launch/multinode.sh --node-rank R --nnodes N --coordinator node0:12355 [options] -- ARGS...
#
# Options:
#   --procs-per-node P   1 (default): one process uses every local GPU; or the GPU count: one
#                        process per GPU (process i of a node gets OWL_LOCAL_DEVICE_IDS=i)
#   --port PORT          coordinator port on the first host in --hosts mode (default 12355)
#   --repo DIR           checkout on the remote hosts (default: this one's path)
#   --setup CMD          run on each host before launching (default: activate DIR/.venv if present)
#   --log-dir DIR        per-process logs (default logs/multinode-YYYYmmdd-HHMMSS)
#   --platform gpu|cpu   cpu runs the same wiring on CPU devices (testing)
# Environment: DRY_RUN=1 prints the commands; OWL_TRAIN overrides `owl-train`; XLA_FLAGS adds to
# (and overrides) the GPU defaults of launch/_lib.sh; OWL_GPU_XLA_FLAGS replaces them.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
source "$HERE/_lib.sh"

HOSTS="" NODE_RANK="" NNODES="" COORD="" PROCS=1 PORT=12355 PLATFORM=gpu SETUP=""
REPO=$(cd "$HERE/.." && pwd)
LOG_DIR=logs/multinode-$(date +%Y%m%d-%H%M%S)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --hosts) HOSTS=$2; shift 2 ;;
    --node-rank) NODE_RANK=$2; shift 2 ;;
    --nnodes) NNODES=$2; shift 2 ;;
    --coordinator) COORD=$2; shift 2 ;;
    --procs-per-node) PROCS=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --repo) REPO=$2; shift 2 ;;
    --setup) SETUP=$2; shift 2 ;;
    --log-dir) LOG_DIR=$2; shift 2 ;;
    --platform) PLATFORM=$2; shift 2 ;;
    --) shift; break ;;
    -h|--help) owl_usage "${BASH_SOURCE[0]}" ;;
    *) owl_die "unknown option $1 (owl-train arguments go after --)" ;;
  esac
done
[[ "$PROCS" =~ ^[1-9][0-9]*$ ]] || owl_die "--procs-per-node must be a positive integer"
[[ "$PLATFORM" == gpu || "$PLATFORM" == cpu ]] || owl_die "--platform is gpu or cpu"
read -r -a TRAIN <<<"${OWL_TRAIN:-owl-train}"

TRAIN_ARGS=("$@")

if [[ -n "$HOSTS" ]]; then
  # --- ssh mode: run this script in node mode on every host ----------------------------------
  IFS=, read -r -a HOST_LIST <<<"$HOSTS"
  NNODES=${#HOST_LIST[@]}
  [[ "$LOG_DIR" == /* ]] || LOG_DIR="$PWD/$LOG_DIR"   # the nodes write there too
  COORD="${HOST_LIST[0]}:$PORT"
  SETUP=${SETUP:-"if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi"}
  ssh_process() {
    local forward=("OWL_TRAIN=${OWL_TRAIN:-owl-train}")
    if [[ -n "${XLA_FLAGS:-}" ]]; then forward+=("XLA_FLAGS=$XLA_FLAGS"); fi
    local remote
    remote="cd $(owl_quote "$REPO") && $SETUP && $(owl_quote env "${forward[@]}" \
      "$REPO/launch/multinode.sh" --node-rank "$1" --nnodes "$NNODES" --coordinator "$COORD" \
      --procs-per-node "$PROCS" --platform "$PLATFORM" --log-dir "$LOG_DIR" -- "${TRAIN_ARGS[@]}")"
    # -tt: when the ssh session dies, the remote processes get a hangup instead of living on.
    OWL_ENV=()
    OWL_CMD=(ssh -tt -o BatchMode=yes "${HOST_LIST[$1]}" "$remote")
    OWL_LOG_NAME="node_$1"
  }
  owl_launch "$LOG_DIR" "$NNODES" ssh_process
  exit $?
fi

# --- node mode: start this node's processes --------------------------------------------------
[[ -n "$NODE_RANK" && -n "$NNODES" && -n "$COORD" ]] \
  || owl_die "give --hosts, or all of --node-rank, --nnodes and --coordinator"
((NODE_RANK >= 0 && NODE_RANK < NNODES)) || owl_die "--node-rank $NODE_RANK not in [0, $NNODES)"
if [[ "$PLATFORM" == gpu ]]; then
  owl_gpu_env
else
  export JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
fi

process_env() {
  local id=$((NODE_RANK * PROCS + $1))
  OWL_ENV=("OWL_COORDINATOR_ADDRESS=$COORD" "OWL_NUM_PROCESSES=$((NNODES * PROCS))" "OWL_PROCESS_ID=$id")
  if ((PROCS > 1)); then OWL_ENV+=("OWL_LOCAL_DEVICE_IDS=$1"); fi
  if owl_is_dry; then OWL_ENV+=("XLA_FLAGS=${XLA_FLAGS:-}"); fi   # show what the run would get
  OWL_LOG_NAME="process_$id"
}
owl_launch "$LOG_DIR" "$PROCS" process_env "${TRAIN[@]}" "${TRAIN_ARGS[@]}"
