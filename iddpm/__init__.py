"""iddpm: Improved Denoising Diffusion Probabilistic Models (Nichol & Dhariwal, 2021).

Rooms (imports only point down): ``iddpm.diffusion`` (maths), ``iddpm.models`` (networks),
``iddpm.data``, ``iddpm.checkpoints``, ``iddpm.train``, ``iddpm.sample``, ``iddpm.eval``;
``iddpm.api`` wires them together; ``iddpm.cli`` is the command line.
"""

__version__ = "0.1.0"
