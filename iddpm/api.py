"""The one place that wires the rooms together.

``build_diffusion`` / ``build_model`` turn a :class:`~iddpm.config.RunConfig` into objects;
everything else (trainer, samplers, evaluation) receives those objects.
"""

from __future__ import annotations

from iddpm.config import DiffusionConfig, RunConfig, parse_int_list


def build_diffusion(dcfg: DiffusionConfig, timestep_respacing: str | None = None):
    """A :class:`~iddpm.diffusion.SpacedDiffusion` as the original's scripts build it.

    ``timestep_respacing`` overrides the config's (e.g. ``"ddim50"`` for sampling).
    """
    from iddpm.diffusion import create_gaussian_diffusion

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


def build_model(cfg: RunConfig):
    """The U-Net (or super-resolution U-Net) described by ``cfg.model`` / ``cfg.diffusion``."""
    from iddpm.models import create_model, sr_create_model

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
        num_classes=m.num_classes,
    )
    if m.super_res:
        return sr_create_model(large_size=m.image_size, small_size=m.small_size, **common)
    return create_model(image_size=m.image_size, **common)
