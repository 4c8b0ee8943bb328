"""Crops of the real image for the halo probe, normalised as the run will normalise them.

Random inputs open a network's paths only as far as random values do: a branch behind a
ReLU or a threshold that only realistic intensities cross would hide its reach from them.
So ``validate`` also probes a few crops of the actual image: its centre and seeded random
places, mirrored at the image border exactly like tiles are.
"""

from __future__ import annotations

import numpy as np
import torch

from .config import NormalizeConfig
from .geometry import Box
from .inference import normalise
from .io.images import ImageReader
from .mirror import MirrorMode
from .nonfinite import apply_policy

SAMPLES = 4


def probe_samples(
    image: ImageReader,
    normalize: NormalizeConfig,
    size: int,
    mirror: MirrorMode,
    fill_value: float | None,
    count: int = SAMPLES,
    seed: int = 0,
) -> list[tuple[str, torch.Tensor]]:
    """``count`` crops ``(name, (C, size, size))``: the centre first, then seeded random places
    (in a stack ``(z, y, x)``, of seeded random planes: a 2D network sees one plane at a time)."""
    rng = np.random.default_rng(seed)
    *planes, h, w = image.shape
    centres = [(h // 2, w // 2)] + [(int(rng.integers(h)), int(rng.integers(w))) for _ in range(count - 1)]
    samples = []
    for cy, cx in centres:
        lead = tuple(int(rng.integers(n)) for n in planes)
        box = Box(lead + (cy - size // 2, cx - size // 2), (1,) * len(lead) + (size, size))
        raw, _ = apply_policy(image.read_box(box, mirror), box, image.shape, fill_value, image.spec.path)
        raw = raw.reshape(raw.shape[:1] + raw.shape[1 + len(lead) :])
        x = normalise(raw, _crop_statistics(raw, normalize))
        where = ", ".join(map(str, (*lead, cy, cx)))
        samples.append((f"a crop of the image centred at ({where})", torch.from_numpy(x)))
    return samples


def _crop_statistics(raw: np.ndarray, cfg: NormalizeConfig) -> NormalizeConfig:
    """Fixed normalisation as is; image statistics (not computed before a run) from the crop."""
    if cfg.fixed:
        return cfg
    flat = raw.reshape(raw.shape[0], -1).astype(np.float64)
    if cfg.zscore:
        mean, std = flat.mean(axis=1), flat.std(axis=1)
    else:
        low, high = cfg.percentiles  # type: ignore[misc]
        mean = np.percentile(flat, low, axis=1)
        std = np.percentile(flat, high, axis=1) - mean
    std = np.where(std > 0, std, 1.0)
    return NormalizeConfig(mean=tuple(map(float, mean)), std=tuple(map(float, std)))
