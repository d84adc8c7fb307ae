"""RunConfig -> objects: the network, the training diffusion and a respaced sampling diffusion.

The builder room sits below every consumer (checkpoints, sample, eval, train, api, benchmarks, tests)
and imports only :mod:`iddpm.config`, :mod:`iddpm.models` and :mod:`iddpm.diffusion`, so that none of
them has to import the wiring hub (:mod:`iddpm.api`) to turn a config into a model.
"""

from __future__ import annotations

import dataclasses

from iddpm.config import ConfigError, DiffusionConfig, RunConfig, parse_int_list
from iddpm.diffusion import SpacedDiffusion, create_gaussian_diffusion
from iddpm.models import UNetModel, create_model, sr_create_model

__all__ = ["build_model", "build_diffusion", "build_sampling_diffusion", "with_respacing", "guidance_capable",
           "null_label"]


def build_diffusion(dcfg: DiffusionConfig, timestep_respacing: str | None = None) -> SpacedDiffusion:
    """A :class:`~iddpm.diffusion.SpacedDiffusion` as the original's scripts build it.

    ``timestep_respacing`` overrides the config's (e.g. ``"ddim50"`` for sampling).  Raises the
    diffusion's own ValueError for a respacing that does not fit; :func:`build_sampling_diffusion`
    turns that into a one-line :class:`ConfigError`.
    """
    return create_gaussian_diffusion(
        steps=dcfg.diffusion_steps,
        learn_sigma=dcfg.learn_sigma,
        sigma_small=dcfg.sigma_small,
        noise_schedule=dcfg.noise_schedule,
        use_kl=dcfg.use_kl,
        predict_xstart=dcfg.predict_xstart,
        rescale_timesteps=dcfg.rescale_timesteps,
        rescale_learned_sigmas=dcfg.rescale_learned_sigmas,
        timestep_respacing=dcfg.timestep_respacing if timestep_respacing is None else timestep_respacing,
    )


def build_model(cfg: RunConfig) -> UNetModel:
    """The U-Net (or super-resolution U-Net) described by ``cfg.model`` / ``cfg.diffusion``.

    Built on the current default device (wrap in ``torch.device("meta")`` to get the layout without memory).
    The two factories mirror the original's two script signatures (``create_model`` / ``sr_create_model``).
    A class-conditional model trained with label dropout (``class_dropout > 0``, classifier-free guidance) gets
    ``label_emb`` of ``num_classes + 1`` rows: row ``num_classes`` is the "no label" input
    (:func:`null_label`).  ``class_dropout == 0`` keeps the original's layout (``num_classes`` rows), so released
    class-conditional checkpoints load strictly.
    """
    m = cfg.model
    common = dict(
        num_channels=m.num_channels,
        num_res_blocks=m.num_res_blocks,
        learn_sigma=cfg.diffusion.learn_sigma,
        class_cond=m.class_cond,
        use_checkpoint=m.use_checkpoint,
        attention_resolutions=m.attention_resolutions,
        num_heads=m.num_heads,
        num_heads_upsample=m.num_heads_upsample,
        use_scale_shift_norm=m.use_scale_shift_norm,
        dropout=m.dropout,
        channel_mult=parse_int_list(m.channel_mult, "channel_mult") or None,
        in_channels=m.in_channels,
        num_classes=m.num_classes + 1 if guidance_capable(cfg) else m.num_classes,
    )
    if m.super_res:
        return sr_create_model(large_size=m.image_size, small_size=m.small_size, **common)
    return create_model(image_size=m.image_size, **common)


def guidance_capable(cfg: RunConfig) -> bool:
    """Whether ``cfg``'s model was trained with label dropout (so it has a "no label" row and supports guidance)."""
    return bool(cfg.model.class_cond and cfg.model.class_dropout > 0)


def null_label(cfg: RunConfig) -> int:
    """The "no label" class index of a model trained with ``class_dropout > 0``: ``num_classes``."""
    if not guidance_capable(cfg):
        raise ConfigError("null label: the model has none (trained without --class_cond True and --class_dropout > 0)")
    return cfg.model.num_classes


def build_sampling_diffusion(cfg: RunConfig, timestep_respacing: str | None = None) -> SpacedDiffusion:
    """:func:`build_diffusion` with a sampling respacing; a respacing that does not fit is a one-line ConfigError."""
    try:
        return build_diffusion(cfg.diffusion, timestep_respacing)
    except ConfigError:
        raise
    except ValueError as exc:
        resp = cfg.diffusion.timestep_respacing if timestep_respacing is None else timestep_respacing
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if msg.startswith("timestep respacing") and ": " in msg:  # avoid repeating the flag's value
            msg = msg.split(": ", 1)[1]
        raise ConfigError(f"--timestep_respacing {resp}: {msg}") from None


def with_respacing(cfg: RunConfig, timestep_respacing: str | None) -> RunConfig:
    """``cfg`` recording a sampling respacing (None keeps the config's), so a config describes its diffusion."""
    if timestep_respacing is None:
        return cfg
    return cfg.replace(diffusion=dataclasses.replace(cfg.diffusion, timestep_respacing=str(timestep_respacing)))
