"""One typed configuration tree for every room of iddpm.

``RunConfig`` (model + diffusion + data + train) is what a training run is made of; it is
validated once at the boundary (:meth:`RunConfig.validate`), saved as ``config.json`` in the
run directory and inside every checkpoint, so that ``sample`` / ``nll`` / ``eval`` can rebuild
the model and diffusion from the run directory alone.

Flag names and meanings follow OpenAI's ``improved-diffusion`` scripts
(``model_and_diffusion_defaults`` / ``image_train.py`` / ``super_res_train.py``).  Note the
original's *scripts* default ``rescale_timesteps=True`` and ``rescale_learned_sigmas=True``
while its ``create_gaussian_diffusion`` keyword defaults are both False; the config follows
the scripts (it is what the CLI and released CIFAR-10 / ImageNet-64 unconditional checkpoints
used); the library factory keeps the original's keyword defaults.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DiffusionConfig",
    "DataConfig",
    "TrainConfig",
    "RunConfig",
    "PRESETS",
    "preset",
    "parse_int_list",
    "parse_float_list",
]


class ConfigError(ValueError):
    """A bad setting; the message is one line naming the flag/file and the fix."""


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    """Parse ``"16,8"`` -> ``(16, 8)``; empty string -> ``()``."""
    text = str(text).strip()
    if not text:
        return ()
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--{flag} {text!r}: expected comma-separated integers, e.g. 16,8") from None


def parse_float_list(text: str, flag: str) -> tuple[float, ...]:
    """Parse ``"0.9999,0.999"`` -> ``(0.9999, 0.999)``."""
    text = str(text).strip()
    if not text:
        return ()
    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"--{flag} {text!r}: expected comma-separated numbers, e.g. 0.9999") from None


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
    use_checkpoint: bool = False
    use_scale_shift_norm: bool = True
    # super-resolution (super_res_train.py): large_size is image_size; small_size > 0 enables it
    small_size: int = 0

    @property
    def super_res(self) -> bool:
        return self.small_size > 0

    def validate(self) -> None:
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
        if self.diffusion_steps < 1:
            raise ConfigError(f"--diffusion_steps {self.diffusion_steps}: must be >= 1")
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
    deterministic: bool = False

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

    @property
    def ema_rates(self) -> tuple[float, ...]:
        return parse_float_list(self.ema_rate, "ema_rate")

    @property
    def effective_precision(self) -> str:
        return "fp16" if self.use_fp16 else self.precision

    def validate(self) -> None:
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
        sections = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            if key == "preset":
                kwargs["preset"] = str(value)
                continue
            if key not in sections:
                raise ConfigError(f"{source}: unknown section {key!r}; expected one of {sorted(sections)} or preset")
            kwargs[key] = _section_from_dict(sections[key], value, f"{source}: [{key}]")
        return cls(**kwargs)

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)


def _section_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    names = {f.name: f for f in fields(cls)}
    out = {}
    for k, v in (values or {}).items():
        if k not in names:
            raise ConfigError(f"{where}: unknown key {k!r}")
        out[k] = _coerce(names[k], v, where)
    return cls(**out)


def _coerce(f: dataclasses.Field, value: Any, where: str) -> Any:
    default = f.default
    typ = type(default)
    try:
        if typ is bool:
            if isinstance(value, str):
                low = value.strip().lower()
                if low in ("1", "true", "yes", "y", "t"):
                    return True
                if low in ("0", "false", "no", "n", "f"):
                    return False
                raise ValueError(value)
            return bool(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            if isinstance(value, (list, tuple)):
                return ",".join(str(v) for v in value)
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {f.name}={value!r} is not a valid {typ.__name__}") from None
    return value


def section_of(flag: str) -> str | None:
    """Which section a flat flag name belongs to (``"lr"`` -> ``"train"``), or None."""
    for name, cls in (("model", ModelConfig), ("diffusion", DiffusionConfig), ("data", DataConfig),
                      ("train", TrainConfig)):
        if flag in {f.name for f in fields(cls)}:
            return name
    return None


def apply_overrides(cfg: RunConfig, flat: dict[str, Any], source: str = "flags") -> RunConfig:
    """Return ``cfg`` with flat ``{flag: value}`` overrides applied to the right sections."""
    nested: dict[str, dict[str, Any]] = {}
    for k, v in flat.items():
        sec = section_of(k)
        if sec is None:
            raise ConfigError(f"{source}: unknown setting {k!r}")
        nested.setdefault(sec, {})[k] = v
    updates = {}
    for sec, values in nested.items():
        current = getattr(cfg, sec)
        names = {f.name: f for f in fields(current)}
        coerced = {k: _coerce(names[k], v, f"{source}: [{sec}]") for k, v in values.items()}
        updates[sec] = dataclasses.replace(current, **coerced)
    return dataclasses.replace(cfg, **updates)


# --------------------------------------------------------------------------------------------
# Presets.  Flat overrides on top of the defaults.  The five released models use the flags of
# the original README (see ../shared/reference/unet_keys.json); note their differing
# rescale_timesteps / rescale_learned_sigmas.
# --------------------------------------------------------------------------------------------
_RELEASED_COMMON = dict(learn_sigma=True, noise_schedule="cosine", diffusion_steps=4000, num_heads=4,
                        attention_resolutions="16,8", use_scale_shift_norm=True)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny CPU preset for the bundled 8x8 digits
    "digits": dict(image_size=8, in_channels=1, num_channels=64, num_res_blocks=2, channel_mult="1,2",
                   attention_resolutions="4", num_heads=4, dropout=0.0, learn_sigma=True,
                   noise_schedule="cosine", diffusion_steps=1000, class_cond=False, num_classes=10,
                   rescale_timesteps=True, rescale_learned_sigmas=True, lr=2e-4, batch_size=64,
                   ema_rate="0.999", use_scale_shift_norm=True),
    # 32x32x3, 64 channels, 2 res blocks, attention at 16 and 8, learned sigmas
    "cifar-small": dict(image_size=32, in_channels=3, num_channels=64, num_res_blocks=2, channel_mult="1,2,2,2",
                        attention_resolutions="16,8", num_heads=4, dropout=0.1, learn_sigma=True,
                        noise_schedule="cosine", diffusion_steps=4000, rescale_timesteps=True,
                        rescale_learned_sigmas=True, lr=1e-4, batch_size=32),
    "cifar10_uncond": dict(_RELEASED_COMMON, image_size=32, num_channels=128, num_res_blocks=3, dropout=0.3,
                           rescale_timesteps=True, rescale_learned_sigmas=True, lr=1e-4, batch_size=128),
    "imagenet64_uncond": dict(_RELEASED_COMMON, image_size=64, num_channels=128, num_res_blocks=3,
                              rescale_timesteps=True, rescale_learned_sigmas=True, lr=1e-4, batch_size=128),
    "imagenet64_cond": dict(_RELEASED_COMMON, image_size=64, num_channels=192, num_res_blocks=3, class_cond=True,
                            num_classes=1000, rescale_timesteps=False, rescale_learned_sigmas=False,
                            lr=3e-4, batch_size=2048),
    "upsample256": dict(_RELEASED_COMMON, image_size=256, small_size=64, num_channels=192, num_res_blocks=2,
                        noise_schedule="linear", class_cond=True, num_classes=1000, rescale_timesteps=False,
                        rescale_learned_sigmas=False, lr=3e-4, batch_size=256),
    "lsun_bedroom": dict(image_size=256, num_channels=128, num_res_blocks=2, num_heads=1, attention_resolutions="16",
                         learn_sigma=True, noise_schedule="linear", diffusion_steps=1000,
                         use_scale_shift_norm=False, dropout=0.0, rescale_timesteps=False,
                         rescale_learned_sigmas=False, lr=1e-4, batch_size=128),
}

# The released checkpoint file each preset loads.
RELEASED_CHECKPOINTS = {
    "cifar10_uncond": "cifar10_uncond_50M_500K.pt",
    "imagenet64_uncond": "imagenet64_uncond_100M_1500K.pt",
    "imagenet64_cond": "imagenet64_cond_270M_250K.pt",
    "upsample256": "upsample_cond_500K.pt",
    "lsun_bedroom": "lsun_uncond_100M_1200K_bs128.pt",
}


def preset(name: str, base: RunConfig | None = None) -> RunConfig:
    """The :class:`RunConfig` of a named preset (on top of ``base`` or the defaults)."""
    if name not in PRESETS:
        raise ConfigError(f"--preset {name!r}: unknown; choose one of {', '.join(sorted(PRESETS))}")
    cfg = apply_overrides(base or RunConfig(), PRESETS[name], source=f"preset {name}")
    return dataclasses.replace(cfg, preset=name)
