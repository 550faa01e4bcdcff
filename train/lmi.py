"""Local-wise mutual information (LMI), MIDiffusion paper Sec. 4.2 (Def. 3, Eq. 8, Prop. 1).

Contract (docs/design.md, "The LMI operator"): for every pixel i and offset tau in [-r, r]^2,
soft-bin every pixel with Gaussian weights normalised over B bins (centres linspace(0, 1, B)),
build the joint histogram P_tau of (X_j, Y_{j+tau}) over the p x p patch around i from the
pairs with both samples inside the image, and take MI_tau(i) = sum P log(P / (P_X P_Y))
(NMI: 2 MI / (H_X + H_Y)); LMI(i) = max_tau MI_tau(i), and y_at(i) = Y[i + tau*] (0 outside).
A pixel/offset without a valid pair has MI 0; ties (|dMI| <= 1e-6) go to the first offset in
row-major order from (-r, -r).

Two implementations with equal values and gradients:

* :func:`lmi_dense` -- the reference: vectorised, differentiable PyTorch over all offsets.
* :func:`lmi` -- what training uses: on CPU the native sparse kernel
  (:mod:`galip.runtime.lmi_native`) picks tau* per pixel and the backward pass recomputes MI
  densely at tau* only (the max passes its gradient to the chosen offset). Elsewhere (CUDA
  tensors, no C++ compiler) tau* comes from the dense path under ``no_grad``, then the same
  recomputation -- the values and gradients of :func:`lmi_dense` at a fraction of its memory.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from galip.runtime.contract.lmi import DEFAULT_LMI as _D
from galip.runtime.errors import ConfigError
from galip.runtime.lmi_native import (
    TIE_TOL,
    check_lmi_args,
    lmi_numpy,
    native_available,
    native_unavailable_reason,
    needs_float64,
)

__all__ = ["lmi", "lmi_dense", "soft_bins"]

_warned_fallback = False


def soft_bins(v: torch.Tensor, bins: int = _D.bins, sigma: float = _D.sigma) -> torch.Tensor:
    """Gaussian soft-bin weights: (N, 1, H, W) -> (N, B, H, W), normalised over the B bins.

    w_a(v) = exp(-(v - c_a)^2 / 2 sigma^2) / sum_b exp(-(v - c_b)^2 / 2 sigma^2),
    c = linspace(0, 1, B), computed as a softmax (no underflow for values outside [0, 1]).
    """
    centres = torch.linspace(0.0, 1.0, bins, dtype=v.dtype, device=v.device).view(1, -1, 1, 1)
    w = torch.softmax(-((v - centres) ** 2) / (2.0 * sigma**2), dim=1)
    # Weights below 1e-18 (1e-150 in float64) become 0: their products would be subnormal,
    # which is ~100x slower on x86, and they move MI by < 1e-16.
    tiny = 1e-150 if v.dtype == torch.float64 else 1e-18
    return torch.where(w > tiny, w, 0.0)


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    """p log p for p >= 0 with 0 log 0 = 0; the clamp keeps the gradient finite at p = 0."""
    return p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def _compute_dtype(dtype: torch.dtype, bins: int, sigma: float) -> torch.dtype:
    """float64 for float64 inputs and for almost-hard binning (see needs_float64), else float32."""
    return torch.float64 if dtype == torch.float64 or needs_float64(bins, sigma) else torch.float32


def _mi_at(wx: torch.Tensor, wy: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, patch: int,
           radius: int, normalize: bool) -> torch.Tensor:
    """MI (or NMI) per pixel, pairing X_j with Y_{j + tau(i)} over the patch around i.

    wx, wy: (N, B, H, W) soft-bin weights; dy, dx: (N, H, W) int64 offsets in [-radius, radius].
    Returns (N, H, W) in the dtype of wx.
    """
    n, b, h, w = wx.shape
    half, pad = patch // 2, patch // 2 + radius
    wp = w + 2 * pad
    ones = torch.ones(1, 1, h, w, dtype=wx.dtype, device=wx.device)
    wx_pad, mx_pad = F.pad(wx, (half,) * 4), F.pad(ones, (half,) * 4)
    wy_pad = F.pad(wy, (pad,) * 4).flatten(2)  # (N, B, Hp*Wp), zero outside the image
    my_pad = F.pad(ones, (pad,) * 4).flatten(2).expand(n, 1, -1)  # 1 inside, 0 outside
    rows = torch.arange(h, device=wx.device).view(1, h, 1) + pad + dy
    cols = torch.arange(w, device=wx.device).view(1, 1, w) + pad + dx
    xs, ys, valid = [], [], []
    # Step 1: the p x p pairs (X_j, Y_{j+tau}) with their validity (both inside the image).
    for a in range(-half, half + 1):
        for c in range(-half, half + 1):
            window = (slice(None), slice(None), slice(half + a, half + a + h),
                      slice(half + c, half + c + w))
            flat = ((rows + a) * wp + cols + c).view(n, 1, h * w)
            xs.append(wx_pad[window].flatten(2))
            ys.append(wy_pad.gather(2, flat.expand(n, b, -1)))
            valid.append(mx_pad[window].flatten(2) * my_pad.gather(2, flat))
    m = torch.stack(valid, -1).transpose(1, 2)  # (N, HW, 1, P)
    # Step 2: joint histogram = mean over the valid pairs of w(X_j) w(Y_j+tau)^T.
    xs = torch.stack(xs, -1).transpose(1, 2) * m  # (N, HW, B, P)
    ys = torch.stack(ys, -1).permute(0, 2, 3, 1)  # (N, HW, P, B)
    count = m.sum(-1, keepdim=True)  # (N, HW, 1, 1); 0 -> P = 0 -> MI = 0
    p = torch.matmul(xs, ys) / count.clamp_min(1.0)  # (N, HW, B, B)
    # Step 3: MI = H_X + H_Y - H_XY with marginals from the joint (paper Eq. 2).
    h_xy = -_xlogx(p).sum((2, 3))
    h_x = -_xlogx(p.sum(3)).sum(2)
    h_y = -_xlogx(p.sum(2)).sum(2)
    mi = h_x + h_y - h_xy
    if normalize:
        denom = h_x + h_y
        ok = denom > 1e-12
        mi = torch.where(ok, 2.0 * mi / torch.where(ok, denom, torch.ones_like(denom)), 0.0)
    return mi.view(n, h, w)


def _offsets(index: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-major offset index (N, H, W) -> (dy, dx), index 0 = (-r, -r)."""
    d = 2 * radius + 1
    return torch.div(index, d, rounding_mode="floor") - radius, index % d - radius


def _y_at(y: torch.Tensor, index: torch.Tensor, radius: int) -> torch.Tensor:
    """Y[i + tau(i)] (N, 1, H, W), 0 where that falls outside the image."""
    n, _, h, w = y.shape
    dy, dx = _offsets(index, radius)
    rows = torch.arange(h, device=y.device).view(1, h, 1) + radius + dy
    cols = torch.arange(w, device=y.device).view(1, 1, w) + radius + dx
    flat = (rows * (w + 2 * radius) + cols).view(n, h * w)
    return F.pad(y, (radius,) * 4).flatten(1).gather(1, flat).view(n, 1, h, w)


def _select(mi: torch.Tensor) -> torch.Tensor:
    """Arg-max, (N, T, H, W) -> (N, H, W): the first offset within TIE_TOL of the max."""
    near = mi >= mi.amax(1, keepdim=True) - TIE_TOL
    return torch.argmax(near.to(mi.dtype), dim=1)  # argmax returns the first maximal index


def _mi_all_offsets(x, y, patch, radius, bins, sigma, normalize) -> torch.Tensor:
    """MI for every offset, (N, (2r+1)^2, H, W), in the compute dtype."""
    dtype = _compute_dtype(x.dtype, bins, sigma)
    wx, wy = soft_bins(x.to(dtype), bins, sigma), soft_bins(y.to(dtype), bins, sigma)
    n, _, h, w = x.shape
    d = 2 * radius + 1
    mis = []
    for t in range(d * d):
        dy = torch.full((n, h, w), t // d - radius, device=x.device)
        dx = torch.full((n, h, w), t % d - radius, device=x.device)
        mis.append(_mi_at(wx, wy, dy, dx, patch, radius, normalize))
    return torch.stack(mis, 1)


def _mi_at_index(x, y, index, patch, radius, bins, sigma, normalize) -> torch.Tensor:
    """MI at each pixel's own offset index, (N, 1, H, W) in the dtype of x (differentiable)."""
    dtype = _compute_dtype(x.dtype, bins, sigma)
    wx, wy = soft_bins(x.to(dtype), bins, sigma), soft_bins(y.to(dtype), bins, sigma)
    dy, dx = _offsets(index, radius)
    return _mi_at(wx, wy, dy, dx, patch, radius, normalize).unsqueeze(1).to(x.dtype)


def lmi_dense(x: torch.Tensor, y: torch.Tensor, patch: int = _D.patch, radius: int = _D.radius,
              bins: int = _D.bins, sigma: float = _D.sigma, normalize: bool = _D.normalize
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference LMI in pure PyTorch (all offsets, autograd through everything).

    Args:
        x, y: (N, 1, H, W) float32/float64 tensors, values in [0, 1], any device.
        patch, radius, bins, sigma, normalize: :class:`~galip.runtime.contract.LmiParams`
            (defaults and meaning there).

    Returns:
        lmi_map (N, 1, H, W) and y_at_argmax (N, 1, H, W), both in the dtype of x. Memory:
        ~(2r+1)^2 * N * B^2 * H * W values are kept for the backward pass.
    """
    check_lmi_args(x.shape, y.shape, patch, radius, bins, sigma)
    mi = _mi_all_offsets(x, y, patch, radius, bins, sigma, normalize)
    index = _select(mi.detach())
    lmi_map = mi.gather(1, index.unsqueeze(1)).to(x.dtype)  # gradient to the chosen offset only
    return lmi_map, _y_at(y, index, radius)


class _Lmi(torch.autograd.Function):
    """Forward picks tau* (native kernel or dense no-grad); backward recomputes MI at tau*."""

    @staticmethod
    def forward(ctx, x, y, patch, radius, bins, sigma, normalize, native):
        if native:
            lmi32, y_at32, index = lmi_numpy(x.detach().numpy(), y.detach().numpy(), patch,
                                             radius, bins, sigma, normalize)
            index = torch.from_numpy(index[:, 0]).long()
        else:
            with torch.no_grad():
                index = _select(_mi_all_offsets(x, y, patch, radius, bins, sigma, normalize))
        if native and x.dtype == torch.float32:
            lmi_map, y_at = torch.from_numpy(lmi32), torch.from_numpy(y_at32)
        else:  # float64 (e.g. gradcheck) or dense: the value in the input dtype at tau*
            with torch.no_grad():
                lmi_map = _mi_at_index(x, y, index, patch, radius, bins, sigma, normalize)
                y_at = _y_at(y, index, radius)
        ctx.save_for_backward(x, y, index)
        ctx.params = (patch, radius, bins, sigma, normalize)
        return lmi_map, y_at

    @staticmethod
    def backward(ctx, grad_lmi, grad_y_at):
        x, y, index = ctx.saved_tensors
        patch, radius, bins, sigma, normalize = ctx.params
        with torch.enable_grad():
            xg, yg = x.detach().requires_grad_(), y.detach().requires_grad_()
            lmi_map = _mi_at_index(xg, yg, index, patch, radius, bins, sigma, normalize)
            y_at = _y_at(yg, index, radius)
            gx, gy = torch.autograd.grad((lmi_map, y_at), (xg, yg), (grad_lmi, grad_y_at),
                                         allow_unused=True)
        return gx, gy, None, None, None, None, None, None


def _native_ok(x: torch.Tensor) -> bool:
    """Use the native kernel for CPU float tensors when it builds; warn once when it cannot."""
    global _warned_fallback
    if x.device.type != "cpu":
        return False  # the CUDA path goes through the TensorRT plugin (export/)
    if native_available():
        return True
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"LMI falls back to the dense PyTorch path (slow): "
                      f"{native_unavailable_reason()}", RuntimeWarning, stacklevel=3)
    return False


def lmi(x: torch.Tensor, y: torch.Tensor, patch: int = _D.patch, radius: int = _D.radius, bins: int = _D.bins,
        sigma: float = _D.sigma, normalize: bool = _D.normalize) -> tuple[torch.Tensor, torch.Tensor]:
    """Local-wise (normalised) mutual information of x against y, differentiable.

    Args:
        x, y: (N, 1, H, W) float32/float64 tensors, values in [0, 1], any N, H, W.
        patch, radius, bins, sigma, normalize: :class:`~galip.runtime.contract.LmiParams`
            (defaults and meaning there).

    Returns:
        lmi_map (N, 1, H, W): max over offsets of MI/NMI (paper Eq. 11); y_at_argmax
        (N, 1, H, W): y at the arg-max offset, 0 where it falls outside the image. Both in the
        dtype of x; values and gradients equal those of :func:`lmi_dense`.
    """
    check_lmi_args(x.shape, y.shape, patch, radius, bins, sigma)
    if x.dtype not in (torch.float32, torch.float64) or y.dtype != x.dtype:
        raise ConfigError(f"lmi expects float32 or float64 x and y of one dtype, "
                          f"got {x.dtype} and {y.dtype}")
    native = _native_ok(x)
    return _Lmi.apply(x, y, patch, radius, bins, float(sigma), bool(normalize), native)
