"""The study (run.run_study: the paper's comparison as jobs of cso_dist.launch, phase by phase, and its report)
and the demo (demo.run_demo: the study with one loss and one seed, in this process)."""

from cso_dist.util.lazy import lazy_exports

__getattr__ = lazy_exports(__name__, {"run_study": "run", "run_demo": "demo"})
