"""Which loop draws the samples, on which diffusion: ``--sampler`` / ``--steps`` / ``--schedule`` resolved.

The diffusion's own loops (ancestral, DDIM) step a *respaced* diffusion: ``--steps N`` means
``--timestep_respacing N`` for them (N steps evenly spaced from T-1 to 0, the original's respacing of one
section).  The few-step solvers (:mod:`iddpm.diffusion.solvers`) step the *full* T-step diffusion on a grid of
their own (``--schedule``), evaluating the model at real t: a respaced diffusion is rebuilt at full T here.

Rules for the flags (one-line :class:`~iddpm.config.ConfigError` otherwise):

- ``--steps N`` together with ``--timestep_respacing`` is refused (two answers to one question);
- a solver with ``--steps 0`` takes the count of the respacing (``--timestep_respacing 50`` -> 50 solver steps on
  the solver's grid; none given -> the run's own respacing, i.e. T for a run trained without one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from iddpm.build import build_diffusion, with_respacing
from iddpm.config import ConfigError, RunConfig, SampleConfig
from iddpm.diffusion.solvers import DEFAULT_SCHEDULE

__all__ = ["SamplingPlan", "plan_sampling"]


@dataclass(frozen=True)
class SamplingPlan:
    """A resolved sampling method.

    sampler: ``ancestral`` | ``ddim`` | one of :data:`~iddpm.diffusion.solvers.SOLVERS`.
    steps: solver steps = NFE (0 until :meth:`bind` fixes it from the diffusion; always 0 for the loops, whose
        step count is the respaced diffusion's).
    schedule: the solver's grid (``""`` for the loops).
    timestep_respacing: what the loader builds the diffusion with (None = the run's own).
    """

    sampler: str
    steps: int = 0
    schedule: str = ""
    timestep_respacing: str | None = None

    @property
    def solver(self) -> bool:
        return self.sampler not in ("ancestral", "ddim")

    @property
    def use_ddim(self) -> bool:
        return self.sampler == "ddim"

    def loop_kwargs(self) -> dict:
        """The keywords of :func:`iddpm.sample.generate` / :func:`iddpm.sample.upsample` that pick the method."""
        return dict(use_ddim=self.use_ddim, sampler=self.sampler, steps=self.steps, schedule=self.schedule)

    def bind(self, diffusion, cfg: RunConfig | None):
        """``(plan, diffusion, cfg)`` ready for :func:`iddpm.sample.generate`: for a solver, ``steps`` fixed (0 ->
        the count of the diffusion as loaded) and a respaced diffusion replaced by the full T-step one built from
        ``cfg`` (``cfg`` then records no respacing).  Without ``cfg`` the diffusion must already be the full one."""
        if not self.solver:
            return self, diffusion, cfg
        plan = dataclasses.replace(self, steps=self.steps or int(diffusion.num_timesteps))
        if cfg is not None and _is_respaced(diffusion):
            diffusion, cfg = build_diffusion(cfg.diffusion, ""), with_respacing(cfg, "")
        return plan, diffusion, cfg

    def steps_kind(self, eta: float = 0.0) -> str:
        """What the loader's log line calls the steps of the diffusion it built (``"250 <steps_kind>"``)."""
        if not self.solver:
            return f"sampling steps ({f'DDIM eta={eta}' if self.use_ddim else 'ancestral'})"
        if self.steps:
            return f"timesteps as loaded; {self.sampler}, {self.steps} steps on its {self.schedule} grid of the full T"
        return f"{self.sampler} steps on its {self.schedule} grid of the full diffusion"

    def describe(self, nfe: int) -> str:
        """One phrase for logs: ``dpm++2m, 15 steps on the logsnr grid (NFE 15)``."""
        if self.solver:
            return f"{self.sampler}, {self.steps} steps on the {self.schedule} grid (NFE {nfe})"
        return f"{self.sampler}, {nfe} steps (NFE {nfe})"

    def info(self, nfe: int) -> dict:
        """The entries of ``sample_info.json`` that say how the samples were drawn."""
        return {"sampler": self.sampler, "schedule": self.schedule or None, "steps": int(nfe), "nfe": int(nfe)}


def plan_sampling(settings: SampleConfig, timestep_respacing: str | None) -> SamplingPlan:
    """The :class:`SamplingPlan` of validated ``settings`` and the ``--timestep_respacing`` given (None = none)."""
    name = settings.sampler_name
    if settings.steps and timestep_respacing is not None:
        raise ConfigError(f"--steps {settings.steps}: not with --timestep_respacing {timestep_respacing} (both set "
                          "the number of steps); give one of them")
    if name in ("ancestral", "ddim"):
        respacing = str(settings.steps) if settings.steps else timestep_respacing
        return SamplingPlan(name, timestep_respacing=respacing)
    schedule = settings.schedule or DEFAULT_SCHEDULE[name]
    return SamplingPlan(name, steps=settings.steps, schedule=schedule, timestep_respacing=timestep_respacing)


def _is_respaced(diffusion) -> bool:
    timestep_map = getattr(diffusion, "timestep_map", None)
    return timestep_map is not None and list(timestep_map) != list(range(diffusion.original_num_steps))
