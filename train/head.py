"""The head around the template's brain: CSF rim, skull, diploe, muscle, fat and skin.

The ICBM152 template is skull-stripped, but real scans show skull, scalp and fat, so a
model trained on brain-only phantoms has never seen a head. This module wraps the
(warped) brain of one subject in layers built outward from its brain mask, each with a
seeded, smoothly varying thickness, and gives them BrainWeb's 1.5 T tissue values.

Layers, inside out (thickness range in mm): CSF rim, inner table of the skull, diploe
(fatty marrow), outer table, temporalis/galea muscle, subcutaneous fat, skin. Bone has
no MR signal (PD 0). A voxel's layer fractions come from its distance to the brain
surface with a one-voxel linear ramp, so layer edges have partial volume like the
brain's own tissue fractions; they fill only the part of a voxel that is not brain.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

# BrainWeb 1.5 T: T1 ms, T2 ms, PD. Skull has no signal; skin uses BrainWeb's values.
HEAD_TISSUES: dict[str, dict[str, float]] = {
    "fat": {"T1_ms": 350.0, "T2_ms": 70.0, "PD": 1.0},
    "muscle": {"T1_ms": 900.0, "T2_ms": 47.0, "PD": 1.0},
    "skin": {"T1_ms": 2569.0, "T2_ms": 329.0, "PD": 1.0},
    "skull": {"T1_ms": 1.0, "T2_ms": 1.0, "PD": 0.0},
}
# (layer, tissue, min mm, max mm), from the brain surface outward.
LAYERS: tuple[tuple[str, str, float, float], ...] = (
    ("csf_rim", "CSF", 1.5, 4.0),
    ("inner_table", "skull", 1.5, 3.0),
    ("diploe", "fat", 1.5, 4.0),
    ("outer_table", "skull", 1.5, 3.0),
    ("muscle", "muscle", 1.0, 6.0),
    ("fat", "fat", 2.0, 6.0),
    ("skin", "skin", 1.5, 3.0),
)
THICKNESS_ORDER = 3   # cosine order of each layer's thickness field over the FOV


def draw_head_tissues(rng: np.random.Generator, jitter: float) -> dict[str, dict[str, float]]:
    """Each head-tissue parameter times U(1 - jitter, 1 + jitter), rounded as the brain's.

    Bone keeps PD 0 (no signal whatever its relaxation times).
    """
    factors = rng.uniform(1.0 - jitter, 1.0 + jitter, size=(len(HEAD_TISSUES), 3))
    return {
        name: {
            "T1_ms": round(base["T1_ms"] * f[0], 1),
            "T2_ms": round(base["T2_ms"] * f[1], 1),
            "PD": round(base["PD"] * f[2], 4),
        }
        for (name, base), f in zip(HEAD_TISSUES.items(), factors)
    }


def thickness_fields(rng: np.random.Generator, bases: list[np.ndarray], field) -> list[np.ndarray]:
    """One ``(X, Y, Z)`` thickness map (mm) per layer, smooth over the FOV.

    ``field(coef, bases)`` evaluates a cosine expansion (phantom.eval_field); a standard
    field is squashed with tanh into the layer's [min, max] range, so thicknesses vary
    around the head (thick temporalis at the sides, thin scalp elsewhere) and between
    subjects.
    """
    order = bases[0].shape[1] - 1
    k = np.arange(order + 1)
    kx, ky, kz = np.meshgrid(k, k, k, indexing="ij")
    maps = []
    for _, _, lo, hi in LAYERS:
        coef = (rng.standard_normal(kx.shape) / (1.0 + kx + ky + kz)).astype(np.float32)
        coef *= 1.5 / np.sqrt(np.sum(coef**2))           # field of order-1 amplitude
        maps.append(lo + (hi - lo) * 0.5 * (1.0 + np.tanh(field(coef, bases))))
    return maps


def layer_fractions(brain: np.ndarray, occupied: np.ndarray, spacing: float,
                    thickness: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Fractions of the head tissues (keys of ``HEAD_TISSUES`` plus ``"CSF"``) around ``brain``.

    ``brain``: ``(X, Y, Z)`` brain-mask fraction in [0, 1] (the layers grow from its
    surface); ``occupied``: the summed brain tissue fractions (the layers fill only
    ``1 - occupied``); ``thickness``: per layer, mm. Outside the last layer is air. Per
    tissue, the fractions of its layers are summed.
    """
    # 1. distance (mm) from each voxel centre to the brain surface, half a voxel inside
    #    the first outside voxel's centre distance; 0 in the brain.
    outside = brain < 0.5
    distance = ndimage.distance_transform_edt(outside, sampling=spacing).astype(np.float32)
    distance = np.maximum(distance - 0.5 * spacing, 0.0)
    # 2. share of a voxel within c mm of the surface: a linear ramp one voxel wide.
    def within(c: np.ndarray) -> np.ndarray:
        return np.clip((c - distance) / spacing + 0.5, 0.0, 1.0)

    free = np.clip(1.0 - occupied, 0.0, 1.0)             # the part of a voxel left for the head
    out: dict[str, np.ndarray] = {t: np.zeros_like(brain) for t in ("CSF", *HEAD_TISSUES)}
    reach, inner = np.zeros_like(distance), np.zeros_like(distance)
    for (_, tissue, _, _), t in zip(LAYERS, thickness):
        reach = reach + t
        outer = within(reach)
        out[tissue] += free * (outer - inner)
        inner = outer
    return out


def head_mask(brain: np.ndarray, layers: dict[str, np.ndarray]) -> np.ndarray:
    """``(X, Y, Z)`` uint8: voxels at least half brain or head tissue."""
    return ((brain + sum(layers.values())) >= 0.5).astype(np.uint8)
