// Local-wise mutual information (LMI), MIDiffusion paper Sec. 4.2 (Def. 3, Eq. 8, Prop. 1),
// galip contract in DESIGN.md "The LMI operator: one contract, three implementations".
//
// One header, three consumers: the host build (lmi_host.cpp, g++ + OpenMP), nvcc -> PTX for
// the TensorRT plugin, and CuPy on a GPU machine. The per-pixel math is one
// __host__ __device__ inline function (galip_lmi_pixel); everything here is plain C99-ish
// C++ so that it compiles unchanged with g++ (where __CUDACC__ is undefined) and nvcc.
//
// Contract, per pixel i and offset tau in [-r, r]^2 (row-major from (-r, -r)):
//   w_a(v)      = exp(-(v - c_a)^2 / 2 sigma^2) / sum_b exp(-(v - c_b)^2 / 2 sigma^2),
//                 c_a = a / (B - 1)                        (soft binning, Gaussian KDE "K")
//   P_tau(a, b) = mean over valid pairs j in the p x p patch around i of w_a(X_j) w_b(Y_j+tau),
//                 a pair is valid when both X_j and Y_j+tau lie inside the image
//   MI_tau(i)   = sum P log(P / (P_X P_Y)), 0 log 0 = 0        (paper Eq. 2)
//   NMI         = 2 MI / (H_X + H_Y)  (0 where H_X + H_Y = 0)
//   MI_tau(i)   = 0 where the pixel/offset has no valid pair
//   LMI(i)      = MI at tau* = the first offset whose MI is within GALIP_LMI_TIE_TOL of the
//                 max (paper Eq. 11: max over tau; the tolerance makes float ties deterministic)
//
// Sparse accumulation: sigma = 8/255 is ~0.8 bin widths at B = 27, so a sample's weights
// are negligible a few bins from its nearest centre. Each sample keeps only a window of
// S = min(2K + 1, B) bins around its nearest centre (shifted inside [0, B)), normalised over
// that window (the dense softmax conditioned on the window). K is the smallest radius whose
// omitted normalised mass is <= 1e-9 (galip_lmi_support_radius; K = 5 at the defaults); the
// resulting MI/NMI differs from the dense definition by < 1e-7 (see galip_lmi_support_radius).
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define GALIP_HD __host__ __device__
#else
#define GALIP_HD
#endif

// Two MI values closer than this are a tie (the first offset in row-major order wins).
#define GALIP_LMI_TIE_TOL 1e-6f
// Omitted normalised soft-bin mass allowed by the truncation.
#define GALIP_LMI_TRUNC_EPS 1e-9
// Fixed-size local arrays of the CUDA kernel (the host build allocates per thread).
#ifndef GALIP_LMI_DEVICE_MAX_BINS
#define GALIP_LMI_DEVICE_MAX_BINS 32
#endif
#ifndef GALIP_LMI_DEVICE_MAX_RADIUS
#define GALIP_LMI_DEVICE_MAX_RADIUS 3
#endif

struct GalipLmiShape {
  int H, W;       // image size
  int patch;      // odd patch side p
  int radius;     // search radius r: (2r + 1)^2 offsets
  int bins;       // B, centres linspace(0, 1, B)
  int support;    // S = min(2K + 1, B) bins kept per sample
  int normalize;  // 1: NMI, 0: MI
};

// Floats per pixel work area of galip_lmi_pixel: joint B*B, 2 weight windows, 2 log-marginals,
// one MI per offset.
GALIP_HD inline int galip_lmi_work_floats(int bins, int radius) {
  return bins * bins + 4 * bins + (2 * radius + 1) * (2 * radius + 1);
}

// Step 0: truncation radius K (in bins) of the soft binning.
// With c = h^2 / 2 sigma^2 (h = 1/(B-1)) and the value at most h/2 from its nearest centre,
// the omitted bins at distance >= K+1 from that centre carry, relative to the nearest bin,
// at most exp(-m(m+1) c) each (m = K, K+1, ...), on two sides: eps(K) <= 2 e^{-K(K+1)c} /
// (1 - e^{-2(K+1)c}). We take the smallest K with eps(K) <= 1e-9. Then every weight vector
// moves by <= 2 eps in L1, every joint/marginal by <= 4 eps in L1, and each of the three
// entropy sums by <= 4 eps (log(B^2 / 4 eps) + 1) < 1.2e-7 (concavity of -p log p), so
// |MI_trunc - MI_dense| <= ~1e-7 in the worst case (value exactly between two centres) and
// far below that typically. Defaults (B = 27, sigma = 8/255): c = 0.7515, K = 5, S = 11.
GALIP_HD inline int galip_lmi_support_radius(int bins, float sigma) {
  const double h = 1.0 / (bins - 1);
  const double c = h * h / (2.0 * (double)sigma * (double)sigma);
  for (int k = 0; k < bins; ++k) {
    const double eps = 2.0 * exp(-k * (k + 1.0) * c) / (1.0 - exp(-2.0 * (k + 1.0) * c));
    if (eps <= GALIP_LMI_TRUNC_EPS) return k;
  }
  return bins - 1;
}

GALIP_HD inline int galip_lmi_support(int bins, float sigma) {
  const int s = 2 * galip_lmi_support_radius(bins, sigma) + 1;
  return s < bins ? s : bins;
}

// Natural log of a positive normal double, accurate to ~2e-11 relative. Host: branch-free
// (exponent split + atanh series, log m = 2 atanh((m-1)/(m+1)), |s| <= 0.1716, terms up to s^11)
// so that g++ vectorises the entropy loops; device: log.
GALIP_HD inline double galip_lmi_log(double x) {
#if defined(__CUDA_ARCH__)
  return log(x);
#else
  unsigned long long u;
  __builtin_memcpy(&u, &x, 8);
  double e = (double)((long long)((u >> 52) & 0x7ffull) - 1022);
  u = (u & 0x800fffffffffffffull) | 0x3fe0000000000000ull;  // mantissa in [0.5, 1)
  double m;
  __builtin_memcpy(&m, &u, 8);
  const bool small = m < 0.70710678118654752440;
  e = small ? e - 1.0 : e;
  m = small ? m + m : m;  // m in [0.707, 1.414)
  const double s = (m - 1.0) / (m + 1.0), z = s * s;
  double p = 2.0 / 11.0;
  p = p * z + 2.0 / 9.0;
  p = p * z + 2.0 / 7.0;
  p = p * z + 2.0 / 5.0;
  p = p * z + 2.0 / 3.0;
  return e * 0.69314718055994530942 + 2.0 * s + s * z * p;
#endif
}

// Step 1: first bin of a sample's window: nearest centre minus K, shifted inside [0, B - S].
GALIP_HD inline int galip_lmi_first_bin(float v, int bins, int support) {
  float a = rintf(v * (float)(bins - 1));
  a = fminf(fmaxf(a, 0.0f), (float)(bins - 1));  // also maps NaN to 0
  int start = (int)a - support / 2;
  start = start < 0 ? 0 : start;
  return start > bins - support ? bins - support : start;
}

// Step 2: normalised Gaussian soft-bin weights of v over bins [start, start + S).
// The exponent is taken relative to the nearest centre, so the largest term is exp(0) and
// values outside [0, 1] cannot underflow the sum (they bin like the nearest edge).
GALIP_HD inline void galip_lmi_soft_bin(float v, int bins, int support, float inv_two_sigma2,
                                        int start, float* w) {
  const float h = 1.0f / (float)(bins - 1);
  float a0 = fminf(fmaxf(rintf(v * (float)(bins - 1)), 0.0f), (float)(bins - 1));
  const float d0 = v - a0 * h;
  float sum = 0.0f;
  for (int k = 0; k < support; ++k) {
    const float d = v - (float)(start + k) * h;
    const float wk = expf(-(d * d - d0 * d0) * inv_two_sigma2);
    w[k] = wk;
    sum += wk;
  }
  const float inv = 1.0f / sum;
  for (int k = 0; k < support; ++k) w[k] *= inv;
}

// Weight source reading precomputed planes (host: each pixel's window computed once and
// reused across offsets and patch positions).
struct GalipLmiPlanes {
  const int* start;      // (H, W) first bin
  const float* weights;  // (H, W, S) window weights
  int W, S;
  GALIP_HD int first_bin(int h, int w) const { return start[h * W + w]; }
  GALIP_HD const float* weights_at(int h, int w, float*) const {
    return weights + (long)(h * W + w) * S;
  }
};

// Weight source computing windows on the fly from the image (CUDA kernel: no extra pass).
struct GalipLmiImage {
  const float* img;  // (H, W)
  int W, bins, S;
  float inv_two_sigma2;
  GALIP_HD int first_bin(int h, int w) const { return galip_lmi_first_bin(img[h * W + w], bins, S); }
  GALIP_HD const float* weights_at(int h, int w, float* scratch) const {
    const float v = img[h * W + w];
    galip_lmi_soft_bin(v, bins, S, inv_two_sigma2, galip_lmi_first_bin(v, bins, S), scratch);
    return scratch;
  }
};

// Step 3: MI (or NMI) of the un-normalised joint J (bx x by box, row stride by) of n pairs.
// P = J/n, so log(P / (P_X P_Y)) = log J - (log rowsum_a - log n) - log colsum_b.
GALIP_HD inline float galip_lmi_mi_of_joint(const float* J, int bx, int by, int n, int normalize,
                                            float* lx, float* ly) {
  const float tiny = 1.17549435e-38f;  // FLT_MIN: smaller masses count as 0 (0 log 0 = 0)
  const float log_n = galip_lmi_log((float)n);
  float hx = 0.0f, hy = 0.0f;
  for (int b = 0; b < by; ++b) ly[b] = 0.0f;
  for (int a = 0; a < bx; ++a) {
    const float* row = J + a * by;
    float rs = 0.0f;
    for (int b = 0; b < by; ++b) {
      rs += row[b];
      ly[b] += row[b];
    }
    const float l = rs > tiny ? galip_lmi_log(rs) - log_n : 0.0f;
    lx[a] = l;
    hx -= rs * l;  // n * sum P_X log P_X
  }
  for (int b = 0; b < by; ++b) {
    const float cs = ly[b];
    const float l = cs > tiny ? galip_lmi_log(cs) : 0.0f;
    ly[b] = l;
    hy -= cs * (l - log_n);
  }
  float mi = 0.0f;
  for (int a = 0; a < bx; ++a) {
    const float* row = J + a * by;
    const float la = lx[a];
    float acc = 0.0f;
    for (int b = 0; b < by; ++b) {
      const float j = row[b];
      const float t = j * (galip_lmi_log(j > tiny ? j : 1.0f) - la - ly[b]);
      acc += j > tiny ? t : 0.0f;
    }
    mi += acc;
  }
  const float inv_n = 1.0f / (float)n;
  mi *= inv_n;
  if (!normalize) return mi;
  const float denom = (hx + hy) * inv_n;  // H_X + H_Y
  return denom > 1e-12f ? 2.0f * mi / denom : 0.0f;
}

// Step 4: LMI of one pixel (h, w): MI for every offset, then the tie-aware arg-max.
// `work` holds galip_lmi_work_floats(B, r) floats. Writes the LMI value and the offset
// index t* = (dy + r)(2r + 1) + (dx + r).
template <class Src>
GALIP_HD inline void galip_lmi_pixel(const Src& sx, const Src& sy, const GalipLmiShape& s, int h,
                                     int w, float* work, float* out_lmi, int* out_tau) {
  const int B = s.bins, S = s.support, R = s.radius, D = 2 * R + 1, half = s.patch / 2;
  float* J = work;
  float* wx_buf = J + B * B;
  float* wy_buf = wx_buf + B;
  float* lx = wy_buf + B;
  float* ly = lx + B;
  float* mi = ly + B;
  const int h0 = h - half > 0 ? h - half : 0, h1 = h + half < s.H - 1 ? h + half : s.H - 1;
  const int w0 = w - half > 0 ? w - half : 0, w1 = w + half < s.W - 1 ? w + half : s.W - 1;
  float best = -INFINITY;
  for (int t = 0; t < D * D; ++t) {
    const int dy = t / D - R, dx = t % D - R;
    // 4a: valid pairs (X_j and Y_{j+tau} inside the image) and the joint's bounding box.
    const int ha = h0 + dy < 0 ? -dy : h0, hb = h1 + dy > s.H - 1 ? s.H - 1 - dy : h1;
    const int wa = w0 + dx < 0 ? -dx : w0, wb = w1 + dx > s.W - 1 ? s.W - 1 - dx : w1;
    if (ha > hb || wa > wb) {
      mi[t] = 0.0f;  // no valid pair: MI := 0
      continue;
    }
    const int n = (hb - ha + 1) * (wb - wa + 1);
    int xlo = B, xhi = 0, ylo = B, yhi = 0;
    for (int jh = ha; jh <= hb; ++jh) {
      for (int jw = wa; jw <= wb; ++jw) {
        const int bx0 = sx.first_bin(jh, jw), by0 = sy.first_bin(jh + dy, jw + dx);
        xlo = bx0 < xlo ? bx0 : xlo;
        xhi = bx0 > xhi ? bx0 : xhi;
        ylo = by0 < ylo ? by0 : ylo;
        yhi = by0 > yhi ? by0 : yhi;
      }
    }
    const int bx = xhi - xlo + S, by = yhi - ylo + S;
    for (int k = 0; k < bx * by; ++k) J[k] = 0.0f;
    // 4b: sparse joint: each pair adds the S x S outer product of its windows.
    for (int jh = ha; jh <= hb; ++jh) {
      for (int jw = wa; jw <= wb; ++jw) {
        const float* wxp = sx.weights_at(jh, jw, wx_buf);
        const float* wyp = sy.weights_at(jh + dy, jw + dx, wy_buf);
        float* base = J + (sx.first_bin(jh, jw) - xlo) * by + (sy.first_bin(jh + dy, jw + dx) - ylo);
        for (int a = 0; a < S; ++a) {
          const float u = wxp[a];
          float* row = base + a * by;
          for (int b = 0; b < S; ++b) row[b] += u * wyp[b];
        }
      }
    }
    // 4c: MI / NMI of P = J / n (paper Eq. 2).
    mi[t] = galip_lmi_mi_of_joint(J, bx, by, n, s.normalize, lx, ly);
    best = mi[t] > best ? mi[t] : best;
  }
  // 4d: LMI = max over offsets (paper Eq. 11); ties -> first offset in row-major order.
  int tstar = 0;
  while (tstar < D * D - 1 && !(mi[tstar] >= best - GALIP_LMI_TIE_TOL)) ++tstar;
  *out_lmi = mi[tstar];
  *out_tau = tstar;
}

// Y at the chosen offset (0 where it falls outside the image).
GALIP_HD inline float galip_lmi_y_at(const float* y, int H, int W, int radius, int h, int w,
                                     int tau) {
  const int D = 2 * radius + 1;
  const int hy = h + tau / D - radius, wy = w + tau % D - radius;
  return (hy >= 0 && hy < H && wy >= 0 && wy < W) ? y[hy * W + wy] : 0.0f;
}

#ifdef __CUDACC__
// One thread per output pixel, blockIdx.y = batch index; launch grid ((H*W + bs - 1)/bs, N).
// x, y: (N, H, W) float32; lmi, y_at: (N, H, W) float32; offset_index: (N, H, W) int32.
// Requires bins <= GALIP_LMI_DEVICE_MAX_BINS and radius <= GALIP_LMI_DEVICE_MAX_RADIUS
// (otherwise writes NaN / -1).
extern "C" __global__ void galip_lmi_kernel(const float* x, const float* y, int N, int H, int W,
                                            int patch, int radius, int bins, float sigma,
                                            int normalize, float* lmi, float* y_at,
                                            int* offset_index) {
  const int pix = blockIdx.x * blockDim.x + threadIdx.x;
  const int nb = blockIdx.y;
  if (pix >= H * W || nb >= N) return;
  const long o = (long)nb * H * W + pix;
  const int D = GALIP_LMI_DEVICE_MAX_RADIUS * 2 + 1;
  float work[GALIP_LMI_DEVICE_MAX_BINS * GALIP_LMI_DEVICE_MAX_BINS +
             4 * GALIP_LMI_DEVICE_MAX_BINS + D * D];
  if (bins > GALIP_LMI_DEVICE_MAX_BINS || radius > GALIP_LMI_DEVICE_MAX_RADIUS || bins < 2) {
    lmi[o] = NAN;
    y_at[o] = NAN;
    offset_index[o] = -1;
    return;
  }
  GalipLmiShape s;
  s.H = H; s.W = W; s.patch = patch; s.radius = radius; s.bins = bins;
  s.support = galip_lmi_support(bins, sigma); s.normalize = normalize;
  const float inv2s2 = 1.0f / (2.0f * sigma * sigma);
  const float* xn = x + (long)nb * H * W;
  const float* yn = y + (long)nb * H * W;
  GalipLmiImage sx = {xn, W, bins, s.support, inv2s2};
  GalipLmiImage sy = {yn, W, bins, s.support, inv2s2};
  const int h = pix / W, w = pix % W;
  float v;
  int tau;
  galip_lmi_pixel(sx, sy, s, h, w, work, &v, &tau);
  lmi[o] = v;
  offset_index[o] = tau;
  y_at[o] = galip_lmi_y_at(yn, H, W, radius, h, w, tau);
}
#endif
