# Helpers shared by the launchers (sourced, not run). Bash >= 4.3.
#
# Every launcher hands the processes it starts the environment contract of docs/launch.md:
#   OWL_COORDINATOR_ADDRESS=host:port  OWL_NUM_PROCESSES=N  OWL_PROCESS_ID=i  [OWL_LOCAL_DEVICE_IDS=0,1]
# or OWL_DISTRIBUTED=auto (let jax.distributed.initialize() detect a TPU pod / SLURM / ...).

# XLA flags for multi-GPU training (all known to jaxlib 0.10.2; tests/test_launch.py checks that
# XLA accepts them). OWL_GPU_XLA_FLAGS replaces them; the caller's own XLA_FLAGS come last, so
# they win over these defaults.
OWL_DEFAULT_GPU_XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_enable_triton_gemm=false \
--xla_gpu_enable_pipelined_all_gather=true \
--xla_gpu_enable_pipelined_reduce_scatter=true \
--xla_gpu_enable_pipelined_all_reduce=true \
--xla_gpu_enable_while_loop_double_buffering=true \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864 \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728"

owl_die() { echo "owl: $*" >&2; exit 2; }

# Prints the comment block at the top of a script (its usage) and exits 2.
owl_usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$1" >&2
  exit 2
}

owl_is_dry() { [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]; }

# Prints its arguments as one line that a shell reads back as the same words.
owl_quote() {
  local a out=()
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then out+=("$a")
    else out+=("'${a//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

# Runs a command, or with DRY_RUN=1 prints it.
owl_run() {
  if owl_is_dry; then owl_quote "$@"; else "$@"; fi
}

owl_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# Exports the GPU runtime environment (XLA flags, memory fraction, NCCL logging).
owl_gpu_env() {
  export XLA_FLAGS="${OWL_GPU_XLA_FLAGS:-$OWL_DEFAULT_GPU_XLA_FLAGS}${XLA_FLAGS:+ $XLA_FLAGS}"
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
}

OWL_PIDS=()
OWL_NAMES=()

owl_kill_all() {
  local pid
  for pid in "${OWL_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
}

# Waits for every pid in OWL_PIDS. The first non-zero exit stops the others (a process left
# alone would hang in a collective until its timeout). Returns the first failure's exit code.
# OWL_CODES[i] gets each exit code.
owl_wait_all() {
  local rc=0 i code
  local -a alive=("${!OWL_PIDS[@]}") left
  OWL_CODES=()
  while ((${#alive[@]})); do
    left=()
    for i in "${alive[@]}"; do
      if kill -0 "${OWL_PIDS[$i]}" 2>/dev/null; then left+=("$i"); continue; fi
      code=0; wait "${OWL_PIDS[$i]}" || code=$?
      OWL_CODES[$i]=$code
      if ((code != 0 && rc == 0)); then
        rc=$code
        echo "owl: ${OWL_NAMES[$i]} exited with status $code; stopping the others" >&2
        owl_kill_all
      fi
    done
    alive=("${left[@]}")
    if ((${#alive[@]})); then sleep 0.3; fi
  done
  return "$rc"
}

# owl_launch LOG_DIR COUNT ENV_FN [CMD...]
# Starts COUNT processes on this machine. Before process i starts, `ENV_FN i` sets the array
# OWL_ENV (NAME=VALUE words), OWL_LOG_NAME, and optionally the array OWL_CMD (this process's
# command, instead of CMD). Output goes to LOG_DIR/OWL_LOG_NAME.log; the first process's log is
# also shown here. Waits for all (see owl_wait_all). With DRY_RUN=1 prints the commands instead.
owl_launch() {
  local log_dir=$1 count=$2 env_fn=$3 i rc=0 tail_pid
  shift 3
  local -a cmd
  OWL_PIDS=(); OWL_NAMES=()
  owl_is_dry || mkdir -p "$log_dir"
  trap 'owl_kill_all; exit 130' INT TERM HUP
  for ((i = 0; i < count; i++)); do
    OWL_ENV=(); OWL_CMD=()
    "$env_fn" "$i"
    if ((${#OWL_CMD[@]})); then cmd=("${OWL_CMD[@]}"); else cmd=("$@"); fi
    if ((${#OWL_ENV[@]})); then cmd=(env "${OWL_ENV[@]}" "${cmd[@]}"); fi
    if owl_is_dry; then owl_quote "${cmd[@]}"; continue; fi
    : >"$log_dir/$OWL_LOG_NAME.log"   # exists before `tail` below looks for it
    "${cmd[@]}" >>"$log_dir/$OWL_LOG_NAME.log" 2>&1 </dev/null &
    OWL_PIDS+=("$!"); OWL_NAMES+=("$OWL_LOG_NAME")
  done
  if owl_is_dry; then trap - INT TERM HUP; return 0; fi
  echo "owl: started $count process(es): ${OWL_NAMES[*]}" >&2
  echo "owl: logs in $log_dir/{$(IFS=,; echo "${OWL_NAMES[*]}")}.log" >&2
  tail -n +1 -f --pid="${OWL_PIDS[0]}" "$log_dir/${OWL_NAMES[0]}.log" &
  tail_pid=$!
  owl_wait_all || rc=$?
  kill "$tail_pid" 2>/dev/null || true
  wait "$tail_pid" 2>/dev/null || true
  trap - INT TERM HUP
  if ((rc != 0)); then
    for i in "${!OWL_NAMES[@]}"; do
      # 143 = stopped by our SIGTERM after another process failed: its log is rarely the story.
      if [[ "${OWL_CODES[$i]:-0}" != 0 && "${OWL_CODES[$i]}" != 143 ]]; then
        echo "owl: ---- last lines of $log_dir/${OWL_NAMES[$i]}.log (status ${OWL_CODES[$i]}) ----" >&2
        tail -n 25 "$log_dir/${OWL_NAMES[$i]}.log" >&2
      fi
    done
  fi
  return "$rc"
}
