"""A small CNN of our own for the 8x8 digits: the feature extractor behind digits FID/KID/IS.

Trained on the fixed digits *train* split (:func:`iddpm.data.digits.load_digits_split`) and
shipped as ``iddpm/assets/digits_classifier.safetensors`` (~0.25 MB).  Input: uint8 images
``[N, 8, 8]`` / ``[N, 8, 8, 1]`` mapped to ``v / 127.5 - 1`` (the model range of iddpm);
features: the 64-d penultimate layer (before its ReLU) divided by a stored constant (its RMS
on the train split); logits: 10 classes.

Retrain (deterministic on one machine; a few seconds on a CPU)::

    python -m iddpm.eval.digits_classifier --out iddpm/assets/digits_classifier.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from iddpm.config import ConfigError
from iddpm.data.digits import load_digits_split
from iddpm.runtime.atomic import atomic_write_bytes

__all__ = ["DigitsCNN", "train_digits_classifier", "load_digits_classifier", "default_weights_path", "accuracy"]

FORMAT = "iddpm-digits-classifier/1"
FEATURE_DIM = 64


class DigitsCNN(nn.Module):
    """conv32-conv32-pool-conv64-pool-fc64-fc10 on ``[N, 1, 8, 8]`` in [-1, 1] (about 62k weights)."""

    def __init__(self, width: int = 32, feature_dim: int = FEATURE_DIM, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 2 * 2, feature_dim)
        self.fc2 = nn.Linear(feature_dim, num_classes)
        # features are fc1 outputs / feature_scale, set after training to their RMS per coordinate on the
        # train split, so that the cubic KID kernel (x.y/d + 1)^3 sees O(1) values as with Inception features
        self.register_buffer("feature_scale", torch.ones(()))
        self.config = {"width": width, "feature_dim": feature_dim, "num_classes": num_classes}

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` float [N, 1, 8, 8] -> (features [N, feature_dim], logits [N, num_classes])."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)
        feats = self.fc1(h.flatten(1))
        return feats / self.feature_scale, self.fc2(F.relu(feats))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(x)[1]


def images_to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, 8, 8]`` or ``[N, 8, 8, 1]`` -> float32 ``[N, 1, 8, 8]`` in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    if x.ndim == 3:
        x = x[..., None]
    return x.permute(0, 3, 1, 2).to(torch.float32) / 127.5 - 1


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts by up to one pixel (zero = background -1 padding), per image."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (len(x),), generator=gen)
    dx = torch.randint(0, 3, (len(x),), generator=gen)
    return torch.stack([padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8] for i in range(len(x))])


@torch.no_grad()
def accuracy(model: DigitsCNN, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy of ``model`` on uint8 images [N, 8, 8] with int labels [N]."""
    model.eval()
    pred = model(images_to_input(images)).argmax(1).numpy()
    return float((pred == np.asarray(labels)).mean())


def train_digits_classifier(
    seed: int = 0, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, out: str | os.PathLike | None = None
) -> tuple[DigitsCNN, dict]:
    """Train :class:`DigitsCNN` on the digits train split; return it and ``{"test_accuracy", ...}``.

    Every random draw (initialisation, batch order, shift augmentation, dropout-free) uses
    generators seeded from ``seed``; the global torch RNG is saved and restored around
    initialisation.  With ``out`` the weights are written (safetensors, metadata included).
    """
    tr_x, tr_y = load_digits_split("train")
    te_x, te_y = load_digits_split("test")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitsCNN()
    gen = torch.Generator().manual_seed(seed + 1)
    x_all, y_all = images_to_input(tr_x), torch.from_numpy(tr_y)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * (len(x_all) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_all), generator=gen)
        for i in range(len(x_all) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            loss = F.cross_entropy(model(_augment(x_all[idx], gen)), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        raw = model.features_and_logits(x_all)[0]  # feature_scale is still 1 here
        model.feature_scale.fill_(float(raw.pow(2).mean().sqrt()))
    info = {
        "seed": seed, "epochs": epochs, "batch_size": batch_size, "lr": lr,
        "feature_scale": float(model.feature_scale),
        "train_accuracy": accuracy(model, tr_x, tr_y), "test_accuracy": accuracy(model, te_x, te_y),
    }
    if out is not None:
        save_digits_classifier(out, model, info)
    return model, info


def save_digits_classifier(path: str | os.PathLike, model: DigitsCNN, info: dict) -> None:
    meta = {"iddpm_format": FORMAT, "config": json.dumps(model.config), "info": json.dumps(info)}
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def default_weights_path() -> Path:
    """The shipped weights inside the installed package."""
    return Path(str(resources.files("iddpm") / "assets" / "digits_classifier.safetensors"))


def load_digits_classifier(path: str | os.PathLike | None = None) -> tuple[DigitsCNN, dict]:
    """Load weights (default: the shipped file) -> (model in eval mode, training info)."""
    p = Path(path) if path else default_weights_path()
    if not p.is_file():
        raise ConfigError(
            f"--digits_classifier {p}: no such file; retrain it with "
            "`python -m iddpm.eval.digits_classifier --out PATH` and pass --digits_classifier PATH"
        )
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        if meta.get("iddpm_format") != FORMAT:
            raise ValueError(f"iddpm_format={meta.get('iddpm_format')!r}")
        model = DigitsCNN(**json.loads(meta["config"]))
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ConfigError(
            f"--digits_classifier {p}: not a digits classifier file ({type(exc).__name__}: {exc})".splitlines()[0]
        ) from None
    return model.eval(), json.loads(meta.get("info", "{}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train the digits feature extractor on the digits train split")
    parser.add_argument("--out", required=True, help="output .safetensors path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    _, info = train_digits_classifier(seed=args.seed, epochs=args.epochs, out=args.out)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
