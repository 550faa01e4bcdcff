"""The authors' LMI algorithm, re-implemented from its description, to time against galip's.

MIDiffusion (paper Sec. 4.2.2, Def. 4–5, Prop. 1) computes the local-wise mutual information
by *unfolding and expanding* the images so that every (pixel, offset) pair owns its own
patch pair, then running a dense kernel-density MI on all of them at once. docs/design.md lists
what that costs: ~11.5 s per 128² call on a 2-core machine, called at every sampling step.
This module does the same work, written from that description (numerical details such as
the kernel form, the 1e-10 guards and entropies in bits were checked by reading the public
MIDiffusion repository, not copied from it), so ``galip-bench`` *measures* the speed-up of
galip's operator instead of quoting it:

1. integer cast: both images become grey levels ``int(255 · v)`` (their histogram code works
   on 0…255 integers; this cast is what makes their LMI non-differentiable);
2. unfold: the p × p patch of X around every pixel i (zero padded), and for every offset
   τ ∈ [−r, r]² the p × p patch of Y around i + τ (zero padded: outside the image counts as
   intensity 0); X's patch is *expanded* (repeated) over the T = (2r + 1)² offsets;
3. expand to all bins: every sample gets a Gaussian kernel value for each of the B bin
   centres ``linspace(0, 255, B)`` (B = p³ = 27 for p = 3), width s = 255·σ grey levels,
   k_a(v) = exp(−½ ((v − c_a)/s)²), not normalised per sample;
4. dense histograms per (pixel, offset): marginals P_X = mean_j k(X_j) / Σ (+1e-10),
   P_Y likewise, joint P_XY = Σ_j k(X_j) k(Y_j)ᵀ (B × B) / Σ (+1e-10);
5. entropies in bits, H = −Σ P log2(P + 1e-10); MI = H_X + H_Y − H_XY; NMI =
   2 (MI + 1e-10) / (H_X + H_Y + 1e-10);
6. LMI(i) = max over the T offsets (first maximum in row-major order from (−r, −r), as a
   max-pool over the offset mosaic returns it), and Y at that offset (0 outside the image).

Differences from galip's contract (docs/design.md, "The LMI operator"), all inherited from the
algorithm on purpose: integer-cast intensities (a bin may move by one grey level),
un-normalised per-sample kernels, marginals taken from the kernels rather than from the
joint, the 1e-10 guards, and out-of-image samples counted as intensity 0 instead of being
absent. The authors' code also hard-codes 128 × 128 and takes the second unfold over the
offset mosaic; this version takes any H × W and the patch around i + τ in image space,
which costs the same. ``chunk`` only bounds memory (pixels per pass, default one 128² image
as in their code); every pixel does the same arithmetic whatever its value.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from galip.runtime.contract import DEFAULT_LMI

__all__ = ["lmi_authors"]

EPS = 1e-10           # the guard their entropy and normalisation terms use
GREY_LEVELS = 255     # integer-cast range


def _patches(image: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, 1, H, W) → (N, H·W, p²): the zero-padded p × p patch around every pixel."""
    half = patch // 2
    cols = F.unfold(F.pad(image, (half,) * 4), patch)          # (N, p², H·W)
    return cols.transpose(1, 2)


def _kernel(values: torch.Tensor, centres: torch.Tensor, width: float) -> torch.Tensor:
    """Gaussian kernel value of every sample at every bin centre: (..., S) → (..., S, B)."""
    return torch.exp(-0.5 * ((values.unsqueeze(-1) - centres) / width) ** 2)


def _entropy_bits(p: torch.Tensor, dims) -> torch.Tensor:
    return -(p * torch.log2(p + EPS)).sum(dims)


def _mi(kx: torch.Tensor, ky: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Dense kernel-density MI of patch pairs. kx, ky: (M, S, B) kernel values → (M,)."""
    # 4. marginal densities (mean over the S samples, normalised over bins) and the joint.
    px = kx.mean(1)
    px = px / (px.sum(1, keepdim=True) + EPS)
    py = ky.mean(1)
    py = py / (py.sum(1, keepdim=True) + EPS)
    joint = torch.bmm(kx.transpose(1, 2), ky)                    # (M, B, B)
    joint = joint / (joint.sum((1, 2), keepdim=True) + EPS)
    # 5. MI = H_X + H_Y − H_XY in bits; NMI = 2 MI / (H_X + H_Y).
    h_x, h_y = _entropy_bits(px, 1), _entropy_bits(py, 1)
    mi = h_x + h_y - _entropy_bits(joint, (1, 2))
    if normalize:
        mi = 2.0 * (mi + EPS) / (h_x + h_y + EPS)
    return mi


@torch.no_grad()
def lmi_authors(x: torch.Tensor, y: torch.Tensor, patch: int = DEFAULT_LMI.patch, radius: int | None = None,
                bins: int | None = None, sigma: float = DEFAULT_LMI.sigma, normalize: bool = DEFAULT_LMI.normalize,
                chunk: int = 128 * 128) -> tuple[torch.Tensor, torch.Tensor]:
    """LMI of ``x`` against ``y`` by the authors' unfold-and-expand algorithm (module docstring).

    Args:
        x, y: (N, 1, H, W) float tensors in [0, 1], any H, W (the reference and the image
            searched over offsets).
        patch: odd patch side p (default 3); radius: search radius r (default p // 2, the
            authors' search window equals the patch); bins: B (default p³ = 27, as theirs);
            sigma: kernel width in [0, 1] units (default 8/255, their ``sig = 2`` → 2·sig² = 8
            grey levels); normalize: NMI (default True, as theirs).
        chunk: pixels per pass (memory only: the dense joints take T · B² floats per pixel);
            the default, 128², is one call of the authors' code, so a 128² image runs in one
            pass as theirs does (~1.5 GB peak) and larger images as repeated 128² passes.

    Returns:
        lmi_map (N, 1, H, W) float32 and y_at (N, 1, H, W): y at the arg-max offset, 0 where
        that falls outside the image.
    """
    if x.dim() != 4 or x.shape[1] != 1 or x.shape != y.shape:
        raise ValueError(f"expected x and y of one shape (N, 1, H, W), got {tuple(x.shape)} and {tuple(y.shape)}")
    if patch < 1 or patch % 2 == 0:
        raise ValueError(f"patch must be an odd positive integer, got {patch}")
    radius = patch // 2 if radius is None else int(radius)
    bins = patch ** 3 if bins is None else int(bins)
    n, _, h, w = x.shape
    x, y = x.float(), y.float()
    # 1. integer cast to grey levels (truncation, as int() does for values >= 0).
    xi = (x * GREY_LEVELS).to(torch.int32).float()
    yi = (y * GREY_LEVELS).to(torch.int32).float()
    # 2. unfold and expand: X's patch per pixel, Y's patch around i + τ for every offset τ.
    d = 2 * radius + 1
    y_pad = F.pad(yi, (radius,) * 4)
    y_raw_pad = F.pad(y, (radius,) * 4)
    x_cols = _patches(xi, patch)                                    # (N, HW, S)
    y_cols, y_centre = [], []
    for dy in range(d):
        for dx in range(d):
            shifted = y_pad[:, :, dy:dy + h, dx:dx + w]
            y_cols.append(_patches(shifted, patch))                 # (N, HW, S)
            y_centre.append(y_raw_pad[:, 0, dy:dy + h, dx:dx + w].reshape(n, h * w))
    y_cols = torch.stack(y_cols, 2)                                 # (N, HW, T, S)
    y_centre = torch.stack(y_centre, 2)                             # (N, HW, T)
    centres = torch.linspace(0, GREY_LEVELS, bins)
    width = float(sigma) * GREY_LEVELS
    t, s = d * d, patch * patch
    best = torch.empty(n, h * w)
    index = torch.empty(n, h * w, dtype=torch.long)
    for start in range(0, h * w, chunk):
        stop = min(start + chunk, h * w)
        m = stop - start
        # 3. X's patch repeated over the offsets, then every sample expanded to all B bins.
        xs = x_cols[:, start:stop].unsqueeze(2).expand(n, m, t, s)
        kx = _kernel(xs, centres, width).reshape(-1, s, bins)       # (N·m·T, S, B)
        ky = _kernel(y_cols[:, start:stop], centres, width).reshape(-1, s, bins)
        # 4–5. one dense B × B joint and its MI per (pixel, offset).
        mi = _mi(kx, ky, normalize).view(n, m, t)
        # 6. max over offsets; argmax returns the first maximum (row-major from (−r, −r)).
        best[:, start:stop], index[:, start:stop] = mi.max(2)
    y_at = y_centre.gather(2, index.unsqueeze(2)).squeeze(2)
    return best.view(n, 1, h, w), y_at.view(n, 1, h, w)
