"""iddpm: Improved Denoising Diffusion Probabilistic Models (Nichol & Dhariwal, 2021), exact to the original.

Rooms, each importing only the rooms before it (``tests/unit/test_layering.py`` checks every import):

- ``iddpm.config``: the typed settings of every command (frozen dataclasses; each default defined once);
- ``iddpm.diffusion`` (maths over any ``model(x, t, **kwargs)`` callable: schedules, losses, loops, solvers,
  guidance), ``iddpm.models`` (networks), ``iddpm.data`` (images in, tensors out), ``iddpm.runtime`` (process
  concerns: distributed context, sinks, seeding, atomic writes, locks);
- ``iddpm.build``: RunConfig -> model and diffusion;
- ``iddpm.checkpoints``: run directories, model files, the original's ``.pt``, the diffusers bridge;
- ``iddpm.sample`` (generation), ``iddpm.eval`` (NLL, FID/KID/IS/precision-recall), ``iddpm.train`` (the loop);
- ``iddpm.api``: the one wiring hub (train, sample, upsample, nll, evaluate, load_run);
- ``iddpm.cli``: the command line (parse flags, call the API, print).
"""

__version__ = "0.1.0"
