"""The training run: the loop (loop.run_train), its run folder and lock (rundir), stop requests (preempt),
metrics and trackers (tracking), `cso-dist export` of a checkpoint (export) and the dry-run check (preflight).
The engines that hold, checkpoint and write out the model sit beside it (cso_dist.engines). Names load on first use, so
reading a run folder does not import torch."""

from cso_dist.util.lazy import lazy_exports

__getattr__ = lazy_exports(
    __name__, {"run_train": "loop", "make_layout": "loop", "plan_steps": "loop", "micro_batches": "loop"}
)
