"""Co-registered T1w/T2w/PDw brain volumes synthesised from the real ICBM152 anatomy.

No multi-contrast MRI data set can be downloaded here (docs/design.md, "Data: multi-contrast
brain MRI made from real anatomy"), so galip makes its own from the ICBM152 2009a
template that ships inside the nilearn wheel: tissue fractions (GM, WM, CSF) -> per
subject a smooth warp, jittered tissue parameters, a bias field and Rician noise ->
spin-echo signal for each sequence. Plain numpy/scipy/nibabel: nilearn is never
imported, only its data files are read.

Conventions: volumes are ``(X, Y, Z)`` float32 arrays in the template's RAS+ voxel
order; affines are ``(4, 4)`` voxel -> MNI mm; signal is in units of the equilibrium
magnetisation of pure water (PD = 1), so a noise-free pure-WM T1w voxel is ~0.44.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from galip.runtime.domains import DOMAINS
from galip.runtime.errors import ConfigError

from . import head as head_layers

TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"  # {t1, gm, wm}, uint8

# BrainWeb 1.5 T tissue values: T1 ms, T2 ms, PD (relative to water).
TISSUES: dict[str, dict[str, float]] = {
    "CSF": {"T1_ms": 2569.0, "T2_ms": 329.0, "PD": 1.0},
    "GM": {"T1_ms": 833.0, "T2_ms": 83.0, "PD": 0.86},
    "WM": {"T1_ms": 500.0, "T2_ms": 70.0, "PD": 0.77},
}
# Spin-echo protocols (TR ms, TE ms), keyed by the domain's file suffix (runtime/domains.py).
SEQUENCES: dict[str, tuple[float, float]] = {
    DOMAINS["T1"].suffix: (540.0, 10.0),
    DOMAINS["T2"].suffix: (3000.0, 100.0),
    DOMAINS["PD"].suffix: (3000.0, 12.0),
}
# The contrast order every subject keeps (brightest first), by at least CONTRAST_MARGIN.
TEXTBOOK_ORDER = {"T1w": ("WM", "GM", "CSF"), "T2w": ("CSF", "GM", "WM"), "PDw": ("GM", "WM")}
CONTRAST_MARGIN = 1.03

MASK_THRESHOLD = 0.2   # brain mask: template T1 (scaled to [0, 1]) above this
JITTER = 0.10          # each tissue parameter x U(1 - JITTER, 1 + JITTER) per subject
WARP_RMS_MM = 2.0      # RMS displacement per axis of the random warp
WARP_ORDER = 3         # highest cosine order of the warp (wavelength >= 2/3 of the FOV)
BIAS_RMS = 0.10        # RMS of log(bias field): roughly +-10-20 % gain across the head
BIAS_ORDER = 2
SPACING_RANGE = (1.0, 8.0)  # mm; the template is 1 mm, finer grids would only interpolate


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so it can key a cache
class Anatomy:
    """Tissue fraction maps on one grid.

    ``fractions``: ``"CSF"``, ``"GM"``, ``"WM"`` and ``"brain"`` (the brain mask as a
    fraction), each ``(X, Y, Z)`` float32 in [0, 1]. ``affine``: ``(4, 4)`` voxel -> MNI
    mm. ``spacing``: voxel size in mm. ``fov``: the template's shape in 1 mm voxels,
    which fixes the physical extent that warps and bias fields are defined over.
    """

    fractions: dict[str, np.ndarray]
    affine: np.ndarray
    spacing: float
    fov: tuple[int, int, int]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.fractions["brain"].shape


@dataclass(frozen=True, eq=False)
class Subject:
    """One synthetic subject on the output grid.

    ``images``: ``"T1w"``, ``"T2w"``, ``"PDw"`` -> ``(X, Y, Z)`` float32 signal and
    ``"mask"`` -> ``(X, Y, Z)`` uint8 brain mask, ``"head"`` -> uint8 head mask (brain
    plus the layers around it); ``fractions``: the warped ``"CSF"``,
    ``"GM"``, ``"WM"`` maps (float32, [0, 1]) the images were made from; ``affine``:
    shared by all of them; ``tissues``: the jittered parameters used (like ``TISSUES``).
    """

    id: str
    images: dict[str, np.ndarray]
    fractions: dict[str, np.ndarray]
    affine: np.ndarray
    tissues: dict[str, dict[str, float]]
    head_fractions: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def volumes(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``images`` as ``name -> (data, affine)`` pairs, ready for ``nib.Nifti1Image``."""
        return {name: (data, self.affine) for name, data in self.images.items()}


def subject_id(index: int) -> str:
    return f"sub-{index:03d}"


def template_paths() -> dict[str, Path]:
    """Paths of the ICBM152 ``t1``, ``gm``, ``wm`` files inside the installed nilearn."""
    spec = find_spec("nilearn")  # its data files only: importing nilearn takes seconds
    if spec is None or spec.origin is None:
        raise ConfigError(
            "galip-data needs the ICBM152 template shipped with nilearn, which is not "
            "installed; install it with: pip install 'galip[data]'"
        )
    folder = Path(spec.origin).parent / "datasets" / "data"
    paths = {name: folder / TEMPLATE.format(name) for name in ("t1", "gm", "wm")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ConfigError(
            f"nilearn at {folder.parent.parent} lacks the ICBM152 2009a files ({missing[0]}); "
            "install a nilearn that ships them: pip install -U 'galip[data]'"
        )
    return paths


@functools.lru_cache(maxsize=1)
def load_anatomy() -> Anatomy:
    """The 1 mm ICBM152 tissue fractions (197 x 233 x 189), loaded once per process."""
    paths = template_paths()
    images = {name: nib.load(path) for name, path in paths.items()}
    # 1. uint8 -> [0, 1]; the T1 is scaled by its own maximum before thresholding.
    data = {name: np.asarray(img.dataobj, dtype=np.float32) for name, img in images.items()}
    gm, wm = data["gm"] / 255.0, data["wm"] / 255.0
    brain = (data["t1"] / data["t1"].max() > MASK_THRESHOLD).astype(np.float32)
    # 2. CSF = clip(1 - GM - WM, 0, 1) inside the brain mask (the template is skull-stripped).
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    affine = images["t1"].affine.copy()
    fractions = {"CSF": csf, "GM": gm, "WM": wm, "brain": brain}
    return Anatomy(fractions, affine, 1.0, tuple(int(n) for n in brain.shape))


def check_spacing(spacing: float) -> float:
    lo, hi = SPACING_RANGE
    if not np.isfinite(spacing) or not lo <= spacing <= hi:
        raise ConfigError(
            f"spacing must be between {lo:g} and {hi:g} mm (the template is 1 mm), got {spacing!r}"
        )
    return float(spacing)


def grid_for(anatomy: Anatomy, spacing: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the isotropic ``spacing`` mm grid over ``anatomy``'s extent.

    Output voxel i covers source voxels [s*i - 0.5, s*(i+1) - 0.5] (s = spacing /
    anatomy.spacing), so its centre sits at s*i + (s-1)/2 and the grid never leaves the
    template; the affine is the template's, scaled and shifted accordingly.
    """
    s = spacing / anatomy.spacing
    shape = tuple(int(np.floor(n / s + 1e-9)) for n in anatomy.shape)
    to_source = np.diag([s, s, s, 1.0])
    to_source[:3, 3] = (s - 1.0) / 2.0
    return shape, anatomy.affine @ to_source


@functools.lru_cache(maxsize=4)
def resample_anatomy(anatomy: Anatomy, spacing: float) -> Anatomy:
    """``anatomy``'s fractions averaged onto a ``spacing`` mm grid (cached).

    Fractions are resampled, not labels, so a coarse voxel keeps its partial-volume mix.
    Done once per spacing and before the warp, so each subject's work scales with the
    output grid, not with the 1 mm template.
    """
    s = spacing / anatomy.spacing
    if abs(s - 1.0) < 1e-9:
        return anatomy
    shape, affine = grid_for(anatomy, spacing)
    # Gaussian with the variance of an s-voxel box minus the 1-voxel box already there:
    # the area average of a coarse voxel, and no aliasing of the thin cortex.
    sigma = np.sqrt(max(s * s - 1.0, 0.0) / 12.0)
    fractions = {
        name: ndimage.affine_transform(
            ndimage.gaussian_filter(vol, sigma, mode="constant"),
            [s, s, s], offset=(s - 1.0) / 2.0, output_shape=shape, order=1, mode="constant",
        ).clip(0.0, 1.0)
        for name, vol in anatomy.fractions.items()
    }
    return Anatomy(fractions, affine, float(spacing), anatomy.fov)


def spin_echo(tissue: dict[str, float], tr_ms: float, te_ms: float) -> float:
    """Spin-echo signal of one pure tissue: PD * (1 - exp(-TR/T1)) * exp(-TE/T2)."""
    return (
        tissue["PD"]
        * (1.0 - np.exp(-tr_ms / tissue["T1_ms"]))
        * np.exp(-te_ms / tissue["T2_ms"])
    )


def tissue_signals(tissues: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``contrast -> tissue -> signal`` for every sequence in ``SEQUENCES``."""
    return {
        contrast: {name: spin_echo(t, tr, te) for name, t in tissues.items()}
        for contrast, (tr, te) in SEQUENCES.items()
    }


def keeps_textbook_order(tissues: dict[str, dict[str, float]]) -> bool:
    signals = tissue_signals(tissues)
    return all(
        signals[c][a] > CONTRAST_MARGIN * signals[c][b]
        for c, order in TEXTBOOK_ORDER.items()
        for a, b in zip(order, order[1:])
    )


def draw_tissues(rng: np.random.Generator, max_tries: int = 1000) -> dict[str, dict[str, float]]:
    """Each BrainWeb parameter times U(0.9, 1.1), rounded to what the index records.

    Independent +-10 % on nine parameters inverts a contrast in ~12 % of draws (PDw GM
    and WM differ by only 12 %) and nearly ties one in another ~10 %; a real protocol's
    contrast never inverts, so such a draw is redrawn until every contrast keeps its
    textbook order by >= 3 % (about 1 draw in 4 is redrawn).
    """
    for _ in range(max_tries):
        factors = rng.uniform(1.0 - JITTER, 1.0 + JITTER, size=(len(TISSUES), 3))
        tissues = {
            name: {
                "T1_ms": round(base["T1_ms"] * f[0], 1),
                "T2_ms": round(base["T2_ms"] * f[1], 1),
                "PD": round(base["PD"] * f[2], 4),
            }
            for (name, base), f in zip(TISSUES.items(), factors)
        }
        if keeps_textbook_order(tissues):
            return tissues
    raise RuntimeError("no tissue draw kept the textbook contrast order")  # pragma: no cover


def cosine_bases(anatomy: Anatomy, order: int) -> list[np.ndarray]:
    """Per axis ``(n, order + 1)`` float32 DCT-II bases cos(pi k u) over the template FOV.

    u is the voxel centre's position in the template's extent (0..1), so one set of
    coefficients gives the same physical field at every spacing.
    """
    s = anatomy.spacing
    bases = []
    for n, fov in zip(anatomy.shape, anatomy.fov):
        u = (s * (np.arange(n) + 0.5)) / fov
        bases.append(np.cos(np.pi * np.outer(u, np.arange(order + 1))).astype(np.float32))
    return bases


def smooth_coefficients(rng: np.random.Generator, order: int, rms: float, constant: bool) -> np.ndarray:
    """``(order+1,)*3`` cosine coefficients of a random smooth field with RMS ``rms``.

    Amplitudes fall as 1 / (1 + kx + ky + kz); the cosines are orthogonal over the FOV
    (mean square 1 for k = 0, 1/2 otherwise), so the RMS is set from the coefficients
    alone, the same at every spacing (exact where the grid spans the whole FOV).
    """
    k = np.arange(order + 1)
    kx, ky, kz = np.meshgrid(k, k, k, indexing="ij")
    coef = rng.standard_normal(kx.shape) / (1.0 + kx + ky + kz)
    if not constant:
        coef[0, 0, 0] = 0.0
    power = np.where(kx > 0, 0.5, 1.0) * np.where(ky > 0, 0.5, 1.0) * np.where(kz > 0, 0.5, 1.0)
    return (coef * rms / np.sqrt(np.sum(coef**2 * power))).astype(np.float32)


def eval_field(coef: np.ndarray, bases: list[np.ndarray], z: slice = slice(None)) -> np.ndarray:
    """Field sum_k coef[k] bx[x, kx] by[y, ky] bz[z, kz] on the grid (optionally a z slab)."""
    bx, by, bz = bases
    return np.einsum("ijk,xi,yj,zk->xyz", coef, bx, by, bz[z], optimize=True)


def warp_fractions(anatomy: Anatomy, coefs: np.ndarray, slab: int = 24) -> dict[str, np.ndarray]:
    """Fractions pulled through the displacement field ``coefs`` (3 cosine coefficient sets, mm).

    Linear interpolation keeps fractions in [0, 1] (cubic would overshoot); tissue moved
    in from outside the template is empty. Evaluated in z slabs so a 1 mm grid never
    holds more than one slab of coordinates (memory stays ~100 MB).
    """
    bases = cosine_bases(anatomy, coefs.shape[-1] - 1)
    shape = anatomy.shape
    out = {name: np.empty(shape, np.float32) for name in anatomy.fractions}
    for z0 in range(0, shape[2], slab):
        z = slice(z0, min(z0 + slab, shape[2]))
        grid = np.mgrid[0 : shape[0], 0 : shape[1], z].astype(np.float32)
        coords = np.stack([g + eval_field(c, bases, z) / anatomy.spacing for g, c in zip(grid, coefs)])
        for name, vol in anatomy.fractions.items():
            out[name][:, :, z] = ndimage.map_coordinates(vol, coords, order=1, mode="constant")
    return out


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise of std ``sigma`` per channel."""
    if sigma <= 0:
        return signal
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.hypot(real, imag)


def make_subject(anatomy: Anatomy, index: int, seed: int, spacing: float, noise: float,
                 head: bool = True) -> Subject:
    """Synthesise subject ``index`` of the data set ``seed`` on an isotropic ``spacing`` mm grid.

    ``anatomy``: usually ``load_anatomy()``; ``noise``: Rician sigma as a fraction of
    the subject's pure-WM signal in each contrast (0 = noise-free); ``head``: wrap the
    brain in skull, scalp fat, muscle and skin (:mod:`galip.train.head`). Deterministic
    in (seed, index, spacing, noise, head); warp, tissues and bias do not depend on
    ``noise`` or ``head``.
    """
    grid = resample_anatomy(anatomy, check_spacing(spacing))
    # Independent streams per ingredient (seeded by (seed, index)), so e.g. a different
    # noise level leaves the anatomy and tissue parameters of a subject unchanged. Child
    # i of a SeedSequence does not depend on how many are spawned, so the head's streams
    # (4, 5) leave a brain-only subject exactly as it was.
    warp_rng, tissue_rng, bias_rng, noise_rng, shape_rng, head_tissue_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(6)
    )
    # 1. Smooth random warp, one for all contrasts so they stay co-registered.
    coefs = np.stack([smooth_coefficients(warp_rng, WARP_ORDER, WARP_RMS_MM, True) for _ in range(3)])
    fractions = warp_fractions(grid, coefs)
    # 2. +-10 % tissue-parameter jitter.
    tissues = draw_tissues(tissue_rng)
    maps = {t: fractions[t] for t in TISSUES}
    extent, layers = fractions["brain"], {}
    if head:
        # 2b. layers around the brain, their own jittered tissues (bone stays at PD 0)
        thickness = head_layers.thickness_fields(
            shape_rng, cosine_bases(grid, head_layers.THICKNESS_ORDER), eval_field)
        layers = head_layers.layer_fractions(fractions["brain"], sum(maps.values()), spacing, thickness)
        tissues = tissues | head_layers.draw_head_tissues(head_tissue_rng, JITTER)
        maps = {t: maps.get(t, 0.0) + layers.get(t, 0.0) for t in (*maps, *layers)}
        extent = extent + sum(layers.values())
    signals = tissue_signals(tissues)
    # 3. Low-order multiplicative bias field (a receive-coil property: shared by contrasts).
    log_bias = smooth_coefficients(bias_rng, BIAS_ORDER, BIAS_RMS, False)
    bias = np.exp(eval_field(log_bias, cosine_bases(grid, BIAS_ORDER)))
    images: dict[str, np.ndarray] = {}
    for contrast, per_tissue in signals.items():
        # 4. S = sum_tissue f * PD * (1 - e^(-TR/T1)) * e^(-TE/T2), times the bias.
        clean = sum(np.float32(per_tissue[t]) * maps[t] for t in maps) * bias
        # 5. Rician noise, independent per contrast, sigma relative to pure WM.
        sigma = noise * per_tissue["WM"]
        images[contrast] = rician(clean.astype(np.float32), sigma, noise_rng).astype(np.float32)
    images["mask"] = (fractions["brain"] >= 0.5).astype(np.uint8)
    images["head"] = (extent >= 0.5).astype(np.uint8)      # brain-only: equal to the mask
    return Subject(
        id=subject_id(index),
        images=images,
        fractions={t: fractions[t] for t in TISSUES},
        affine=grid.affine.copy(),
        tissues=tissues,
        head_fractions=layers,
    )

