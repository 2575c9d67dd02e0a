"""The typed config: one dataclass per section (schema), how a YAML file and `--key value` overrides become one
(file), the command-line flags derived from it (flags), the sections of the tools (tools) and the reference page
(reference). `from cso_dist.config import load_config` is the entry users write."""
# ruff: noqa: F401 -- the names users import from cso_dist.config

from cso_dist.config.file import choices, help_of, parse_overrides, read_yaml
from cso_dist.config.schema import (
    FAMILIES,
    TRAINING_SECTIONS,
    Config,
    DataConfig,
    DistConfig,
    EvalConfig,
    ModelConfig,
    PackConfig,
    RefCacheConfig,
    RunConfig,
    ScorerConfig,
    TrackConfig,
    TrainConfig,
    TrainingConfig,
    load_config,
)
from cso_dist.config.study import STUDY_OWNED, StudyConfig
from cso_dist.config.tools import MctsConfig, PlanConfig, SlurmConfig
