"""The typed config: what one run reads (training: TrainingConfig, one dataclass per section), the whole file with
the tools' sections and how it loads (schema: Config, load_config), the study's section (study), the tools'
sections (tools), how a YAML file and `--key value` overrides are read (file), the command-line flags derived from
it (flags) and the reference page (reference). `from cso_dist.config import load_config` is the entry users
write."""
# ruff: noqa: F401 -- the names users import from cso_dist.config

from cso_dist.config.file import choices, help_of, parse_overrides, read_yaml
from cso_dist.config.schema import FAMILIES, Config, load_config
from cso_dist.config.study import STUDY_OWNED, StudyConfig
from cso_dist.config.tools import MctsConfig, PlanConfig, SlurmConfig
from cso_dist.config.training import (
    TRAINING_SECTIONS,
    DataConfig,
    DistConfig,
    EvalConfig,
    ModelConfig,
    PackConfig,
    RefCacheConfig,
    RunConfig,
    ScorerConfig,
    TinyModelConfig,
    TrackConfig,
    TrainConfig,
    TrainingConfig,
)
