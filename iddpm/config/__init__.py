"""One typed configuration tree for every command of iddpm (frozen dataclasses; each default defined once).

- :mod:`iddpm.config.run`: ``RunConfig`` = model + diffusion + data + train, what a training run is made of;
  validated at the boundary, saved as ``config.json`` in the run directory and inside every checkpoint, so
  that ``sample`` / ``nll`` / ``eval`` rebuild the model and diffusion from the run directory alone.
- :mod:`iddpm.config.commands`: ``SourceConfig`` (which weights), ``SampleConfig``, ``NLLConfig``,
  ``EvalConfig``: the commands after training.
- :mod:`iddpm.config.presets`: named presets, config files, and the resolution order of a training config.
- :mod:`iddpm.config.core`: the one-line :class:`ConfigError`, typed coercion and list / bool parsing.

Flag names and meanings follow OpenAI's ``improved-diffusion`` scripts.  Note the original's *scripts* default
``rescale_timesteps=True`` and ``rescale_learned_sigmas=True`` while its ``create_gaussian_diffusion`` keyword
defaults are both False; the config follows the scripts, the library factory keeps the keyword defaults.
"""

from iddpm.config.commands import EVAL_METRICS, EvalConfig, NLLConfig, SampleConfig, SourceConfig
from iddpm.config.core import (
    ConfigError,
    check_finite,
    coerce_field,
    parse_bool,
    parse_float_list,
    parse_int_list,
    replace_checked,
    section_from_dict,
    split_settings,
)
from iddpm.config.presets import (
    ALIASES,
    PRESETS,
    RELEASED_CHECKPOINTS,
    flatten_config_dict,
    load_config_file,
    preset,
    resolve_train_config,
    uses_embedded_default,
)
from iddpm.config.run import (
    SECTIONS,
    DataConfig,
    DiffusionConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    apply_overrides,
    section_of,
)

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DiffusionConfig",
    "DataConfig",
    "TrainConfig",
    "RunConfig",
    "SourceConfig",
    "SampleConfig",
    "NLLConfig",
    "EvalConfig",
    "EVAL_METRICS",
    "SECTIONS",
    "ALIASES",
    "PRESETS",
    "RELEASED_CHECKPOINTS",
    "preset",
    "resolve_train_config",
    "uses_embedded_default",
    "load_config_file",
    "flatten_config_dict",
    "apply_overrides",
    "section_of",
    "parse_bool",
    "parse_int_list",
    "parse_float_list",
    "check_finite",
    "coerce_field",
    "replace_checked",
    "section_from_dict",
    "split_settings",
]
