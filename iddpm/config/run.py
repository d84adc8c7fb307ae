"""``RunConfig``: what a training run is made of (model + diffusion + data + train sections).

Flag names and meanings follow OpenAI's ``improved-diffusion`` scripts (``model_and_diffusion_defaults`` /
``image_train.py`` / ``super_res_train.py``), with their script defaults (``rescale_timesteps=True``,
``rescale_learned_sigmas=True``; see :mod:`iddpm.config`).  ``validate()`` gives one-line errors.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any

from iddpm.config.core import (
    ConfigError,
    check_finite,
    parse_float_list,
    parse_int_list,
    replace_checked,
    section_from_dict,
)

__all__ = ["ModelConfig", "DiffusionConfig", "DataConfig", "TrainConfig", "RunConfig", "SECTIONS", "section_of",
           "apply_overrides"]


@dataclass(frozen=True)
class ModelConfig:
    """U-Net settings (the original's model flags plus in_channels / num_classes / channel_mult)."""

    image_size: int = 64
    in_channels: int = 3
    num_channels: int = 128
    num_res_blocks: int = 2
    num_heads: int = 4
    num_heads_upsample: int = -1
    attention_resolutions: str = "16,8"
    channel_mult: str = ""  # "" -> the original's choice for image_size
    dropout: float = 0.0
    class_cond: bool = False
    num_classes: int = 1000
    # classifier-free guidance: each training label is replaced by the "no label" index num_classes with this
    # probability (0 = the original's model and state_dict; > 0 adds one label-embedding row)
    class_dropout: float = 0.0
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True
    # super-resolution (super_res_train.py): large_size is image_size; small_size > 0 enables it
    small_size: int = 0

    @property
    def super_res(self) -> bool:
        return self.small_size > 0

    def validate(self) -> None:
        check_finite(self)
        if self.image_size < 1:
            raise ConfigError(f"--image_size {self.image_size}: must be a positive integer")
        if self.in_channels < 1:
            raise ConfigError(f"--in_channels {self.in_channels}: must be >= 1 (1 grayscale, 3 RGB)")
        if self.num_channels < 32 or self.num_channels % 32:
            raise ConfigError(
                f"--num_channels {self.num_channels}: must be a positive multiple of 32 (GroupNorm uses 32 groups)"
            )
        if self.num_res_blocks < 1:
            raise ConfigError(f"--num_res_blocks {self.num_res_blocks}: must be >= 1")
        if self.num_heads < 1:
            raise ConfigError(f"--num_heads {self.num_heads}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout {self.dropout}: must be in [0, 1)")
        parse_int_list(self.attention_resolutions, "attention_resolutions")
        parse_int_list(self.channel_mult, "channel_mult")
        if self.class_cond and self.num_classes < 1:
            raise ConfigError(f"--num_classes {self.num_classes}: must be >= 1 with --class_cond")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"--class_dropout {self.class_dropout}: must be in [0, 1) (0 = no label dropout)")
        if self.class_dropout > 0 and not self.class_cond:
            raise ConfigError(f"--class_dropout {self.class_dropout}: needs --class_cond True (labels to drop)")
        if self.small_size and self.small_size >= self.image_size:
            raise ConfigError(
                f"--small_size {self.small_size}: must be smaller than --large_size/--image_size {self.image_size}"
            )


@dataclass(frozen=True)
class DiffusionConfig:
    """Diffusion settings with the original's flag names (script defaults)."""

    diffusion_steps: int = 1000
    noise_schedule: str = "linear"
    timestep_respacing: str = ""
    learn_sigma: bool = False
    sigma_small: bool = False
    use_kl: bool = False
    predict_xstart: bool = False
    rescale_timesteps: bool = True
    rescale_learned_sigmas: bool = True

    def validate(self) -> None:
        if self.diffusion_steps < 2:
            raise ConfigError(f"--diffusion_steps {self.diffusion_steps}: must be >= 2 (a diffusion needs at least "
                              "two noise levels; the original's scripts use 1000-4000)")
        if self.noise_schedule not in ("linear", "cosine"):
            raise ConfigError(f"--noise_schedule {self.noise_schedule!r}: choose linear or cosine")
        if self.noise_schedule == "linear" and self.diffusion_steps < 21:
            raise ConfigError(
                f"--diffusion_steps {self.diffusion_steps}: the linear schedule (beta_T = 0.02*1000/T) needs T >= 21; "
                "use more steps or --noise_schedule cosine"
            )


@dataclass(frozen=True)
class DataConfig:
    """Where images come from.  ``data_dir`` empty -> the bundled scikit-learn digits."""

    data_dir: str = ""  # image folder, .npz file, or "" / "digits" for the embedded default
    labels: str = "prefix"  # prefix (original: filename before first '_') | dirname | none
    random_flip: bool = False
    num_workers: int = 0
    deterministic: bool = field(default=False, metadata={"help": (
        "reproducible training: read the data in order (no shuffling) and select torch's deterministic "
        "algorithms for the run (torch.use_deterministic_algorithms(True, warn_only=True): an op without one "
        "warns; on CUDA also CUBLAS_WORKSPACE_CONFIG=:4096:8 when unset); slower on GPU")})

    def validate(self) -> None:
        if self.labels not in ("prefix", "dirname", "none"):
            raise ConfigError(f"--labels {self.labels!r}: choose prefix, dirname or none")
        if self.num_workers < 0:
            raise ConfigError(f"--num_workers {self.num_workers}: must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Training loop settings: the original's image_train flags plus iddpm's own."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_anneal_steps: int = 0
    warmup_steps: int = 0
    batch_size: int = 1
    microbatch: int = -1  # -1 disables microbatches
    ema_rate: str = "0.9999"  # comma-separated list of EMA rates
    log_interval: int = 10
    save_interval: int = 10000
    resume_checkpoint: str = ""
    resume: bool = False
    overwrite: bool = field(default=False, metadata={"help": (
        "start a new run in a --run_dir that holds another run's config.json / metrics.csv / tb / samples "
        "(but no checkpoint): they are replaced; checkpoints are never deleted")})
    use_fp16: bool = False  # the original's flag; same as --precision fp16
    fp16_scale_growth: float = 1e-3
    schedule_sampler: str = "uniform"  # uniform | loss-second-moment
    run_dir: str = ""  # "" -> $OPENAI_LOGDIR or runs/<timestamp>
    max_steps: int = 0  # 0 = no limit (lr_anneal_steps also stops the run)
    max_minutes: float = 0.0
    seed: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_clip: float = 0.0  # 0 = off
    sample_every: int = 0  # 0 = off
    keep_last: int = 3
    fast: bool = True  # use iddpm.models.optimize(model, "train")
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # sample quality measured while training (iddpm.train.evaluation)
    eval_every: int = field(default=0, metadata={"help": (
        "every N steps and at the end: FID (bootstrap s.e.), KID, precision, recall of --eval_samples images per "
        "EMA rate against --eval_ref; results in eval.csv, metrics.csv, TensorBoard (0 = off)")})
    eval_samples: int = field(default=1000, metadata={"help": "images per evaluation and EMA rate (>= 2)"})
    eval_sampler: str = field(default="ancestral", metadata={"help": (
        "ancestral | ddim | a few-step solver of iddpm sample --sampler (dpm++2m, ...)")})
    eval_steps: int = field(default=50, metadata={"help": "sampling steps (model evaluations) per image"})
    eval_ref: str = field(default="", metadata={"help": (
        "reference: '' = the training data; an image folder, .npz of images or saved statistics, or digits-test; "
        "its statistics are cached in RUN_DIR/ref_stats.npz")})
    eval_batch_size: int = field(default=256, metadata={"help": (
        "images per sampling batch of an evaluation (batches are shared out between processes)")})
    keep_best: bool = field(default=False, metadata={"help": (
        "keep RUN_DIR/checkpoints/best_ema_<rate>/, the weights with the best FID so far (needs --eval_every)")})

    @property
    def ema_rates(self) -> tuple[float, ...]:
        return parse_float_list(self.ema_rate, "ema_rate")

    @property
    def effective_precision(self) -> str:
        return "fp16" if self.use_fp16 else self.precision

    def validate(self) -> None:
        check_finite(self)
        if self.lr <= 0:
            raise ConfigError(f"--lr {self.lr}: must be > 0")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size {self.batch_size}: must be >= 1")
        if self.microbatch != -1 and self.microbatch < 1:
            raise ConfigError(f"--microbatch {self.microbatch}: use -1 (off) or a positive size")
        for r in self.ema_rates:
            if not 0.0 < r < 1.0:
                raise ConfigError(f"--ema_rate {self.ema_rate!r}: every rate must be in (0, 1)")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"--precision {self.precision!r}: choose fp32, bf16 or fp16")
        if self.use_fp16 and self.precision not in ("fp32", "fp16"):
            raise ConfigError(f"--use_fp16 with --precision {self.precision}: pick one of the two")
        if self.schedule_sampler not in ("uniform", "loss-second-moment"):
            raise ConfigError(
                f"--schedule_sampler {self.schedule_sampler!r}: choose uniform or loss-second-moment"
            )
        if self.keep_last < 1:
            raise ConfigError(f"--keep_last {self.keep_last}: must be >= 1")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad_clip {self.grad_clip}: must be >= 0 (0 = off)")
        for name in ("save_interval", "max_steps", "max_minutes", "lr_anneal_steps", "warmup_steps", "sample_every",
                     "weight_decay", "log_interval"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be >= 0 (0 = off)")
        self._validate_eval()

    def _validate_eval(self) -> None:
        """The settings of the periodic evaluation (the sampler and feature network are checked at the start of
        the run, by :func:`iddpm.train.evaluation.prepare_evaluation`)."""
        if self.eval_every < 0:
            raise ConfigError(f"--eval_every {self.eval_every}: must be >= 0 (0 = off)")
        if self.eval_samples < 2:
            raise ConfigError(f"--eval_samples {self.eval_samples}: must be >= 2 (FID needs the covariance of at "
                              "least two sample features; 1000 or more give stable numbers)")
        if self.eval_steps < 1:
            raise ConfigError(f"--eval_steps {self.eval_steps}: must be >= 1")
        if self.eval_batch_size < 1:
            raise ConfigError(f"--eval_batch_size {self.eval_batch_size}: must be >= 1")
        if self.keep_best and self.eval_every <= 0:
            raise ConfigError("--keep_best: needs --eval_every N (the best checkpoint is chosen by the FID measured "
                              "every N steps)")


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run is made of.  Saved as ``config.json`` in the run directory."""

    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = ""

    def validate(self) -> RunConfig:
        """Check every section; raise :class:`ConfigError` with a one-line message.  Returns self."""
        self.model.validate()
        self.diffusion.validate()
        self.data.validate()
        self.train.validate()
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> RunConfig:
        """Build from a (possibly partial) nested dict; unknown keys are an error naming ``source``."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of config sections, got {type(d).__name__}")
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key == "preset":
                kwargs["preset"] = str(value)
                continue
            if key not in SECTIONS:
                raise ConfigError(f"{source}: unknown section {key!r}; expected one of {sorted(SECTIONS)} or preset")
            kwargs[key] = section_from_dict(SECTIONS[key], value, f"{source}: [{key}]")
        return cls(**kwargs)

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)


# The one map from section name to its dataclass (flags, files and JSON all go through it).
SECTIONS: dict[str, type] = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig,
                             "train": TrainConfig}
_SECTION_OF_FLAG = {f.name: sec for sec, cls in SECTIONS.items() for f in fields(cls)}


def section_of(flag: str) -> str | None:
    """Which section a flat flag name belongs to (``"lr"`` -> ``"train"``), or None."""
    return _SECTION_OF_FLAG.get(flag)


def apply_overrides(cfg: RunConfig, flat: dict[str, Any], source: str = "flags") -> RunConfig:
    """Return ``cfg`` with flat ``{flag: value}`` overrides applied to the right sections."""
    nested: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        sec = section_of(k)
        if sec is None:
            raise ConfigError(f"{source}: unknown setting {k!r}")
        nested.setdefault(sec, {})[k] = v
    updates = {sec: replace_checked(getattr(cfg, sec), values, f"{source}: [{sec}]") for sec, values in nested.items()}
    return dataclasses.replace(cfg, **updates)
