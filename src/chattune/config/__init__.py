"""The one typed config tree: YAML + key=value overrides -> RunConfig.

Defaults live in the schema (schema.py); every field has one line of help (`chattune keys`
lists every key with its default and help). Validation happens once, in loading.py, and
reports every problem at once with its key path and a suggestion.
"""

from chattune.config.loading import dump, iter_keys, load, override_keys, problems, read_raw, validate, yaml_error
from chattune.config.schema import (DataConfig, LoraConfig, ModelConfig, RunConfig, SwanlabConfig, SweepConfig,
                                    TrackingConfig, TrainConfig, TrainSource)

__all__ = ["dump", "iter_keys", "load", "override_keys", "problems", "read_raw", "validate", "yaml_error",
           "DataConfig", "LoraConfig", "ModelConfig", "RunConfig", "SwanlabConfig", "SweepConfig", "TrackingConfig",
           "TrainConfig", "TrainSource"]
