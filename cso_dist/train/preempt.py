"""Stop requests for preemption and time limits.

A run is asked to stop by a signal -- Slurm's `--signal=USR1@90`, submitit's USR2, `scancel
--signal=...`, SIGTERM (what Slurm sends at the time limit or preemption, and torchrun forwards),
SIGINT (Ctrl-C; a second one aborts at once) -- or by a file `<run>/PREEMPT` (what the sbatch
templates' batch shell writes when it gets the signal, so no launcher in between -- torchrun, the
deepspeed launcher -- has to pass signals on). The loop looks at the request at each
optimizer-step boundary, all ranks agree, the run saves a checkpoint, writes `<run>/PREEMPTED`
and raises `Preempted`; the caller requeues (the batch script with `scontrol requeue`, submitit
through its own handler).
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

from cso_dist.util.errors import CsoError

STOP_FILE = "PREEMPT"
STOPPED_FILE = "PREEMPTED"
SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)  # whose previous handler (submitit's) requeues the job


class Preempted(CsoError):
    """The run stopped early on request, after saving a checkpoint."""

    exit_code = 3

    def __init__(self, step: int, checkpoint: Path, signum: int | None, previous):
        how = signal.Signals(signum).name if signum else f"a {STOP_FILE} file"
        super().__init__(f"stopped at step {step} on {how}: checkpoint {checkpoint}; resume with --resume")
        self.step, self.checkpoint, self.signum, self.previous = step, checkpoint, signum, previous


class StopRequest:
    """Catches USR1/USR2/TERM/INT (remembering whoever handled them before, e.g. submitit) and watches the stop
    file."""

    def __init__(self, run_dir: Path):
        self.file = Path(run_dir) / STOP_FILE
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def _on_signal(self, signum, frame) -> None:
        self.signum = signum
        if signum == signal.SIGINT:  # the next Ctrl-C interrupts at once
            signal.signal(signal.SIGINT, self.previous.get(signal.SIGINT, signal.default_int_handler))
            print("cso-dist: stopping at the next step boundary with a checkpoint (Ctrl-C again to abort)", flush=True)

    def __enter__(self) -> "StopRequest":
        """Install the handlers (the main thread only: a signal handler can live nowhere else)."""
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self.previous[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, typ, exc, tb) -> None:
        self.restore()  # the handlers that were there before, however the run ends

    def requested(self) -> bool:
        return self.signum is not None or self.file.exists()

    def restore(self) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)
        self.previous = {}

    def stopped(self, step: int, checkpoint: Path, main: bool) -> Preempted:
        """Record the stop (rank 0 writes PREEMPTED and removes the request file) and build the exception."""
        if main:
            self.file.unlink(missing_ok=True)
            (self.file.parent / STOPPED_FILE).write_text(
                json.dumps({"step": step, "checkpoint": str(checkpoint), "signal": self.signum})
            )
        previous = self.previous.get(self.signum) if self.signum in REQUEUE_SIGNALS else None
        self.restore()
        return Preempted(step, checkpoint, self.signum, previous)
