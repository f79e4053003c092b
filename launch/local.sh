#!/usr/bin/env bash
# Multi-process training on one machine's CPU: the multi-host code path (jax.distributed, per-
# process data shards, global arrays, checkpoints) without a cluster.
#
#   launch/local.sh N [owl-train args...]
#   launch/local.sh 2 --config configs/owl1/tiny_stage1.py --workdir /tmp/run
#
# Starts N processes of owl-train on localhost with process ids 0..N-1 and a shared
# coordinator, each with TOTAL/N CPU devices (TOTAL = OWL_LOCAL_DEVICES, default 8) and gloo
# CPU collectives; waits for all; exits non-zero if any fails (and stops the others).
#
# Environment:
#   DRY_RUN=1            print the N commands instead of running them
#   OWL_TRAIN            the command to run (default: owl-train), e.g. "python -m owl_jax.cli.train"
#   OWL_LOCAL_DEVICES    total CPU devices over all processes (default 8)
#   OWL_PORT             coordinator port (default: a free one)
#   OWL_LOG_DIR          per-process logs (default: logs/local-YYYYmmdd-HHMMSS)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  owl_usage "${BASH_SOURCE[0]}"
fi
NPROC=$1
shift
TOTAL=${OWL_LOCAL_DEVICES:-8}
((TOTAL % NPROC == 0)) || owl_die "$TOTAL devices do not split evenly over $NPROC processes"
PER_PROC=$((TOTAL / NPROC))
PORT=${OWL_PORT:-$(owl_free_port)}
LOG_DIR=${OWL_LOG_DIR:-logs/local-$(date +%Y%m%d-%H%M%S)}
read -r -a TRAIN <<<"${OWL_TRAIN:-owl-train}"

process_env() {
  OWL_ENV=(
    "OWL_COORDINATOR_ADDRESS=127.0.0.1:$PORT" "OWL_NUM_PROCESSES=$NPROC" "OWL_PROCESS_ID=$1"
    JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
    "XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$PER_PROC"
  )
  OWL_LOG_NAME="process_$1"
}

owl_launch "$LOG_DIR" "$NPROC" process_env "${TRAIN[@]}" "$@"
