#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod): create it, ship this checkout to every
# worker, install, run the same owl-train command on all workers, collect logs, delete it.
#
#   launch/tpu_pod.sh --name owl-s1 --zone us-east5-a --accelerator v5p-64 \
#       -- --config configs/owl1/owl_7b_stage1.py --workdir gs://my-bucket/owl/s1
#
# Options:
#   --name NAME            TPU (and queued resource) name (required)
#   --zone ZONE            (required)
#   --accelerator TYPE     e.g. v4-32, v5p-64, v5litepod-16, v6e-64 (required)
#   --version VERSION      TPU VM runtime (default tpu-ubuntu2204-base; v5p: v2-alpha-tpuv5,
#                          v5e: v2-alpha-tpuv5-lite, v6e: v2-alpha-tpuv6e)
#   --project PROJECT      gcloud project (default: gcloud's)
#   --queued               go through `queued-resources create` and wait until ACTIVE
#   --spot                 spot capacity
#   --existing             use an existing TPU named NAME (no create, no delete)
#   --keep                 do not delete the TPU at the end
#   --log-dir DIR          local logs, one file per worker (default logs/tpu-NAME-YYYYmmdd-HHMMSS)
#   --dry-run              print the gcloud commands instead of running them (also DRY_RUN=1)
# The workers run owl-train with OWL_DISTRIBUTED=auto (jax.distributed.initialize() finds the
# other workers itself). --workdir should be a gs:// path: every worker writes its checkpoint
# shards there. The checkout is shipped with `git archive HEAD` (commit your changes first).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_lib.sh"

NAME="" ZONE="" ACCEL="" VERSION=tpu-ubuntu2204-base PROJECT="" QUEUED=0 SPOT=0 EXISTING=0 KEEP=0
LOG_DIR=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --zone) ZONE=$2; shift 2 ;;
    --accelerator) ACCEL=$2; shift 2 ;;
    --version) VERSION=$2; shift 2 ;;
    --project) PROJECT=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --existing) EXISTING=1; shift ;;
    --keep) KEEP=1; shift ;;
    --log-dir) LOG_DIR=$2; shift 2 ;;
    --dry-run) export DRY_RUN=1; shift ;;
    --) shift; break ;;
    -h|--help) owl_usage "${BASH_SOURCE[0]}" ;;
    *) owl_die "unknown option $1 (owl-train arguments go after --)" ;;
  esac
done
[[ -n "$NAME" && -n "$ZONE" ]] || owl_die "--name and --zone are required (see --help)"
[[ -n "$ACCEL" || "$EXISTING" == 1 ]] || owl_die "--accelerator is required (see --help)"
[[ $# -gt 0 ]] || owl_die "no owl-train arguments after -- (at least --config and --workdir)"
LOG_DIR=${LOG_DIR:-logs/tpu-$NAME-$(date +%Y%m%d-%H%M%S)}
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == --workdir ]]; then j=$((i + 1)); WORKDIR=${!j:-}; fi
  if [[ "${!i}" == --workdir=* ]]; then WORKDIR=${!i#--workdir=}; fi
done
if [[ "${WORKDIR:-gs://}" != gs://* ]]; then
  echo "owl: warning: --workdir $WORKDIR is not on GCS; on a multi-host slice every worker" \
       "would checkpoint to its own disk" >&2
fi

G=(gcloud compute tpus)
LOC=("--zone=$ZONE")
if [[ -n "$PROJECT" ]]; then LOC+=("--project=$PROJECT"); fi
CAPACITY=()
if ((SPOT)); then CAPACITY=(--spot); fi
TARBALL=${TMPDIR:-/tmp}/owl-jax-$NAME.tar.gz
REMOTE_SETUP='set -e; rm -rf ~/owl-jax; mkdir -p ~/owl-jax; tar -xzf ~/owl-jax.tar.gz -C ~/owl-jax; python3 -m venv ~/owl-venv; ~/owl-venv/bin/pip install -q -U pip; cd ~/owl-jax; ~/owl-venv/bin/pip install -q -e ".[tpu]"'
REMOTE_TRAIN="set -o pipefail; cd ~/owl-jax && OWL_DISTRIBUTED=auto ~/owl-venv/bin/$(owl_quote owl-train "$@") 2>&1 | tee ~/owl-train.log"

create() {
  if ((QUEUED)); then
    owl_run "${G[@]}" queued-resources create "$NAME" --node-id="$NAME" "${LOC[@]}" \
      --accelerator-type="$ACCEL" --runtime-version="$VERSION" "${CAPACITY[@]}"
    trap cleanup EXIT
    if owl_is_dry; then
      owl_quote "${G[@]}" queued-resources describe "$NAME" "${LOC[@]}" '--format=value(state.state)'
      return
    fi
    local state=""
    while [[ "$state" != ACTIVE ]]; do
      sleep 30
      state=$("${G[@]}" queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)')
      echo "owl: queued resource $NAME: $state" >&2
      case "$state" in FAILED|SUSPENDED) owl_die "queued resource $NAME is $state" ;; esac
    done
  else
    owl_run "${G[@]}" tpu-vm create "$NAME" "${LOC[@]}" --accelerator-type="$ACCEL" \
      --version="$VERSION" "${CAPACITY[@]}"
    trap cleanup EXIT
  fi
}

collect_logs() {
  # Each worker's full ~/owl-train.log, written here as LOG_DIR/remote/<worker>.log; the live
  # output of the run itself is in LOG_DIR/<worker>.log.
  owl_is_dry || mkdir -p "$LOG_DIR/remote"
  owl_run "${G[@]}" tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all \
    --output-directory="$LOG_DIR/remote" --command='cat ~/owl-train.log' || true
}

delete() {
  if ((QUEUED)); then
    owl_run "${G[@]}" queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    owl_run "${G[@]}" tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}

cleanup() {
  local rc=$?
  trap - EXIT
  collect_logs
  if ((KEEP || EXISTING)); then
    echo "owl: keeping TPU $NAME" >&2
  else
    delete || echo "owl: could not delete $NAME; delete it by hand!" >&2
  fi
  echo "owl: logs in $LOG_DIR" >&2
  exit "$rc"
}

if ((EXISTING)); then trap cleanup EXIT; else create; fi
if ! owl_is_dry && [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
  echo "owl: warning: uncommitted changes are not shipped (git archive HEAD)" >&2
fi
owl_run git archive --format=tar.gz -o "$TARBALL" HEAD
owl_run "${G[@]}" tpu-vm scp "$TARBALL" "$NAME:~/owl-jax.tar.gz" "${LOC[@]}" --worker=all
owl_run "${G[@]}" tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --command="$REMOTE_SETUP"
if ! owl_is_dry; then
  mkdir -p "$LOG_DIR"
  echo "owl: training; follow a worker with: tail -f $LOG_DIR/0.log" >&2
fi
owl_run "${G[@]}" tpu-vm ssh "$NAME" "${LOC[@]}" --worker=all --output-directory="$LOG_DIR" \
  --command="$REMOTE_TRAIN"
