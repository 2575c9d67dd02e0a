"""The study (run.run_study: the paper's comparison as jobs of cso_dist.launch, phase by phase, and its report)
and the demo (demo.run_demo: the study with one loss and one seed, in this process). The choices of the study's
settings are defined here, once; the runners load on first use."""

from cso_dist.launch import CLUSTERS as LAUNCH_CLUSTERS, HERE
from cso_dist.losses import BASELINE
from cso_dist.models import PACKAGED
from cso_dist.util.lazy import lazy_exports

PHASES = ("data", BASELINE, "sweep", "valid", "select", "seeds", "test", "report")  # study --until
START_FROM = (BASELINE, "base")  # study.start_from: where a CSO arm starts (its reference too)
CLUSTERS = (*LAUNCH_CLUSTERS, HERE)  # study.cluster: launch's, or this process one run after another
MODELS = (*PACKAGED, "tiny")  # study.model when model.path is empty: a packaged real model, or a tiny random one

__getattr__ = lazy_exports(__name__, {"run_study": "run", "run_demo": "demo"})
