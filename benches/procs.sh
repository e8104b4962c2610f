# Process helpers shared by the benches (sourced, not run): liveness, a bounded stop, and a
# watchdog that ends the whole bench at its time limit. Needs `log` defined by the caller.

# Is $1 a live (non-zombie) process?
# (Reads /proc with the `read` builtin: no fork, so it is cheap enough to poll.)
alive() {
  local st
  [[ -n $1 ]] || return 1
  { read -r st <"/proc/$1/stat"; } 2>/dev/null || return 1
  st=${st##*) }
  [[ ${st:0:1} != Z && ${st:0:1} != X ]]
}

# stop_pid PID WHAT [SIGNAL=TERM] [SECONDS=10]: sends SIGNAL, waits up to SECONDS, then
# SIGKILL; always reaps.
stop_pid() {
  local pid=$1 what=$2 sig=${3:-TERM} secs=${4:-10} i
  [[ -n $pid ]] || return 0
  if alive "$pid"; then
    kill -"$sig" "$pid" 2>/dev/null || true
    for ((i = 0; i < secs * 10; i++)); do
      alive "$pid" || break
      sleep 0.1
    done
    if alive "$pid"; then
      log "$what (pid $pid) ignored SIG$sig for ${secs}s; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}

# start_watchdog NAME SECONDS: SIGTERM this script after SECONDS (sets watchdog_pid; stop it
# with stop_watchdog). The script waits on its children with `wait`, which a trapped signal
# interrupts, so its EXIT trap runs promptly and stops what it started.
start_watchdog() {
  local name=$1 secs=$2 me=$$
  (
    trap 'kill -TERM "$sleeper" 2>/dev/null; wait "$sleeper" 2>/dev/null; exit 0' TERM
    sleep "$secs" & sleeper=$!
    wait "$sleeper"
    echo "$name: total time limit of ${secs}s reached; aborting" >&2
    kill -TERM "$me" 2>/dev/null
  ) &
  watchdog_pid=$!
}

stop_watchdog() {
  if [[ -n ${watchdog_pid:-} ]]; then
    kill -TERM "$watchdog_pid" 2>/dev/null || true
    wait "$watchdog_pid" 2>/dev/null || true
  fi
}
