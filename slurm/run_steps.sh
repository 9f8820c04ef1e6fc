#!/usr/bin/env bash
# Shared body of the sbatch scripts: run the ranks with srun, forward stop signals, requeue on exit 75.
#   run_steps.sh ENTRY CONFIG [key=value ...]      (called by slurm/*.sbatch inside the allocation)
set -uo pipefail
ENTRY=$1; CONFIG=${2:?usage: sbatch slurm/<script>.sbatch CONFIG.yaml [key=value ...]}; shift 2
cd "${SLURM_SUBMIT_DIR:-.}"
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
MAX_REQUEUES=${MAX_REQUEUES:-50}
RESTARTS=${SLURM_RESTART_COUNT:-0}
echo "[slurm] job ${SLURM_JOB_ID} (restart ${RESTARTS}) on ${SLURM_JOB_NODELIST}: ${ENTRY} ${CONFIG} $*"

# The batch shell gets USR1 from --signal=B:... or `scancel --signal=USR1 --batch`, and TERM on preemption:
# pass it on to every task of the step; the ranks checkpoint at the next step boundary and exit 75.
forward() { echo "[slurm] $1 received: asking the ranks to checkpoint"; scancel --signal=USR1 "${SLURM_JOB_ID}" 2>/dev/null \
            || kill -USR1 "$SRUN_PID" 2>/dev/null; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# A rank that stops after a checkpoint exits 0 and rank 0 (first node, as this script) leaves this file;
# exit codes stay for real failures, which --kill-on-bad-exit turns into a quick end of the whole step.
export BERTLAUNCH_REQUEUE_FILE="${TMPDIR:-/tmp}/bertlaunch-requeue-${SLURM_JOB_ID}-${RESTARTS}"
rm -f "$BERTLAUNCH_REQUEUE_FILE"
# srun's own reports of failed tasks ("srun: error: node2: task 1: Killed") are noted on the side: the first
# one names the rank that brought the step down (the others were ended by --kill-on-bad-exit)
SRUN_ERRORS="${TMPDIR:-/tmp}/bertlaunch-srun-${SLURM_JOB_ID}-${RESTARTS}"
: > "$SRUN_ERRORS"
srun --kill-on-bad-exit=1 --export=ALL "$PY" "$ENTRY" --config "$CONFIG" "$@" \
    2> >(tee >(grep --line-buffered -E '^srun: error: [^:]+: tasks? [0-9,-]+: ' >> "$SRUN_ERRORS") >&2) &
SRUN_PID=$!
while true; do  # `wait` returns early when a trapped signal arrives: keep waiting for srun itself
    wait "$SRUN_PID"; CODE=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
if [ -f "$BERTLAUNCH_REQUEUE_FILE" ]; then rm -f "$BERTLAUNCH_REQUEUE_FILE"; CODE=75; fi
echo "[slurm] ranks exited with code ${CODE}"
if [ "$CODE" -ne 0 ] && [ "$CODE" -ne 75 ]; then
    for _ in 1 2 3 4 5 6 7 8 9 10; do [ -s "$SRUN_ERRORS" ] && break; sleep 0.2; done
    FIRST=$(sed -nE '1s/^srun: error: ([^:]+): tasks? ([0-9,-]+): (.*)$/\1|\2|\3/p' "$SRUN_ERRORS")
    NODE=${FIRST%%|*}; REST=${FIRST#*|}; RANK=${REST%%|*}; HOW=${REST#*|}
    case "$HOW" in
        "") ;;
        "Exited with exit code "*) echo "[slurm] rank ${RANK} on ${NODE} failed first (${HOW}): see its lines above" ;;
        *)  # killed by a signal (SIGKILL, the OOM killer, a segfault): exit 4, like a rank the watchdog finds dead
            echo "[slurm] rank ${RANK} on ${NODE} died (${HOW}); the other ranks were stopped: exit 4." \
                 "A crash is not requeued: resubmit the same command to resume from the last checkpoint"
            CODE=4 ;;
    esac
fi
rm -f "$SRUN_ERRORS"
if [ "$CODE" -eq 75 ]; then
    if [ "$RESTARTS" -ge "$MAX_REQUEUES" ]; then
        echo "[slurm] checkpointed, but ${RESTARTS} requeues reached MAX_REQUEUES=${MAX_REQUEUES}: not requeueing"
        exit 75
    fi
    echo "[slurm] checkpointed: requeueing job ${SLURM_JOB_ID} to resume"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
fi
exit "$CODE"
