# The time-limit signal (--signal=B:USR1@N) reaches this batch shell only; it asks the trainer to stop
# through a file, so no launcher in between has to pass signals on. The trainer checkpoints at the next
# step boundary, writes $RUN_DIR/PREEMPTED and exits; this shell then requeues the job, and the
# requeued job resumes (--auto-resume) from that checkpoint.
trap 'echo "[cso_dist] $(date +%T) time-limit signal: asking the trainer to checkpoint"; touch "$RUN_DIR/PREEMPT"' USR1
rm -f "$RUN_DIR/PREEMPTED"
"${CSO_STEP[@]}" &
step=$!
rc=0
while :; do
  wait "$step" && rc=0 || rc=$?
  kill -0 "$step" 2>/dev/null || break   # still running: the wait was cut short by the trap
done
if [ -f "$RUN_DIR/PREEMPTED" ]; then
  echo "[cso_dist] $(date +%T) checkpoint saved ($(cat "$RUN_DIR/PREEMPTED")); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
