"""`cso-dist demo` (`make demo`), the main job: the study (cso_dist.study) with one loss, one seed and no sweep, in
this process (configs/demo.yaml): ESConv -> SmolLM2-135M-Instruct -> SFT -> CSO -> base / SFT / CSO side by side."""

from cso_dist.config import Config
from cso_dist.util.errors import CsoError
from cso_dist.study.run import run_study


def run_demo(cfg: Config) -> dict:
    st = cfg.study
    if len(st.losses) != 1 or len(st.seeds) != 1 or len(st.sources) != 1 or st.sweep:
        raise CsoError(
            "demo: one loss, one seed, one source, no sweep (study.losses, study.seeds, study.sources, study.sweep); "
            "see cso-dist study"
        )
    return run_study(cfg, command="demo", result="summary")
