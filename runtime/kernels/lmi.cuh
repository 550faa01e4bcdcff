// Local-wise mutual information (LMI), MIDiffusion paper Sec. 4.2 (Def. 3, Eq. 8, Prop. 1),
// galip contract in docs/design.md, "The LMI operator" (one contract, three implementations).
//
// One header, three consumers: the host build (lmi_host.cpp, g++ + OpenMP), nvcc -> PTX for
// the TensorRT plugin, and CuPy on a GPU machine. The per-pixel math is one __host__ __device__
// inline function (galip_lmi_pixel) that compiles with g++ (no __CUDACC__) and nvcc.
//
// Contract, per pixel i and offset tau in [-r, r]^2 (row-major from (-r, -r)):
//   w_a(v)      = exp(-(v - c_a)^2 / 2 sigma^2) / sum_b exp(-(v - c_b)^2 / 2 sigma^2),
//                 c_a = a / (B - 1)
//   P_tau(a, b) = mean over valid pairs j in the p x p patch around i of w_a(X_j) w_b(Y_j+tau),
//                 valid: both X_j and Y_j+tau inside the image (no valid pair: MI := 0)
//   MI_tau(i)   = sum P log(P / (P_X P_Y)), 0 log 0 = 0 (paper Eq. 2); NMI = 2 MI / (H_X + H_Y)
//                 (0 where H_X + H_Y <= 1e-12)
//   LMI(i)      = MI at tau* = the first offset whose MI is within GALIP_LMI_TIE_TOL of the
//                 max (paper Eq. 11: max over tau; the tolerance makes float ties deterministic)
//
// Sparse accumulation: sigma = 8/255 is ~0.8 bin widths at B = 27, so each sample keeps only a
// window of S = min(2K + 1, B) bins around its nearest centre (shifted inside [0, B)),
// normalised over that window; K (Step 0a) makes the result differ from the dense definition
// by ~1e-7 at most.
//
// Two per-pixel paths over the same math: galip_lmi_pixel (host, lmi_host.cpp) accumulates the
// joint as a B x B block from precomputed weight planes; galip_lmi_pixel_rows (CUDA kernel)
// keeps only the p^2 pairs' windows and builds the joint one row at a time, so a GPU thread
// needs ~2 KB of local memory instead of a B x B block (9.6 KB with the double scratch it had),
// and it runs in float throughout unless (bins, sigma) need float64 (Step 0b).
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define GALIP_HD __host__ __device__
#else
#define GALIP_HD
#endif

// Host loops to vectorise (sums may be reassociated); nothing under nvcc.
#if defined(_OPENMP) && !defined(__CUDACC__)
#define GALIP_STR(x) #x
#define GALIP_SIMD_SUM(var) _Pragma(GALIP_STR(omp simd reduction(+ : var)))
#define GALIP_SIMD _Pragma("omp simd")
#else
#define GALIP_SIMD_SUM(var)
#define GALIP_SIMD
#endif

// Two MI values closer than this are a tie (the first offset in row-major order wins).
#define GALIP_LMI_TIE_TOL 1e-6
// Omitted normalised soft-bin mass allowed by the truncation.
#define GALIP_LMI_TRUNC_EPS 1e-9
// float32 accumulation when every local entropy is at least this (nats), else float64.
#define GALIP_LMI_FLOAT_MIN_ENTROPY 0.25
// Fixed-size local arrays of the CUDA kernel (the host build allocates per thread): windows of
// up to MAX_SUPPORT floats for the pairs of a patch of side <= MAX_PATCH, a row and the column
// sums of up to MAX_BINS bins (float64 settings fit half as many reals), 49 MI values.
#ifndef GALIP_LMI_DEVICE_MAX_BINS
#define GALIP_LMI_DEVICE_MAX_BINS 32
#define GALIP_LMI_DEVICE_MAX_RADIUS 3
#define GALIP_LMI_DEVICE_MAX_PATCH 3
#define GALIP_LMI_DEVICE_MAX_SUPPORT 16
#endif
#define GALIP_LMI_DEVICE_SCRATCH                                                              \
  (2 * GALIP_LMI_DEVICE_MAX_PATCH * GALIP_LMI_DEVICE_MAX_PATCH * GALIP_LMI_DEVICE_MAX_SUPPORT + \
   2 * GALIP_LMI_DEVICE_MAX_BINS)

struct GalipLmiShape {
  int H, W;       // image size
  int patch;      // odd patch side p
  int radius;     // search radius r: (2r + 1)^2 offsets
  int bins;       // B, centres linspace(0, 1, B)
  int support;    // S = min(2K + 1, B) bins kept per sample
  int window;     // L >= S reals per stored window (zero padded so rows vectorise)
  int normalize;  // 1: NMI, 0: MI
};

GALIP_HD inline int galip_imin(int a, int b) { return a < b ? a : b; }
GALIP_HD inline int galip_imax(int a, int b) { return a > b ? a : b; }

GALIP_HD inline int galip_lmi_support(int bins, float sigma);

// The shape record of one call (window = support: no padding).
GALIP_HD inline GalipLmiShape galip_lmi_shape(int H, int W, int patch, int radius, int bins,
                                              float sigma, int normalize) {
  GalipLmiShape s;
  s.H = H; s.W = W; s.patch = patch; s.radius = radius; s.bins = bins;
  s.support = galip_lmi_support(bins, sigma);
  s.window = s.support;
  s.normalize = normalize ? 1 : 0;
  return s;
}

// Rows [ha, hb] and columns [wa, wb] of the patch [h0, h1] x [w0, w1] whose pair (X_j,
// Y_{j+tau}) lies inside the image for tau = (dy, dx); empty() when there is none.
struct GalipLmiBox {
  int ha, hb, wa, wb;
  GALIP_HD bool empty() const { return ha > hb || wa > wb; }
};

// Step 4a of offset t: (dy, dx) and the box of valid pairs; false after setting MI := 0 (and
// best >= 0) when there is no valid pair.
GALIP_HD inline bool galip_lmi_offset(const GalipLmiShape& s, int h0, int h1, int w0, int w1,
                                      int t, int* dy, int* dx, GalipLmiBox* b, double* mi,
                                      double* best) {
  const int D = 2 * s.radius + 1;
  *dy = t / D - s.radius, *dx = t % D - s.radius;
  b->ha = galip_imax(h0, -*dy), b->hb = galip_imin(h1, s.H - 1 - *dy);
  b->wa = galip_imax(w0, -*dx), b->wb = galip_imin(w1, s.W - 1 - *dx);
  if (!b->empty()) return true;
  mi[t] = 0.0;
  *best = *best > 0.0 ? *best : 0.0;
  return false;
}

// c = h^2 / 2 sigma^2 with h = 1/(B - 1): the Gaussian exponent per squared bin distance.
GALIP_HD inline double galip_lmi_bin_c(int bins, float sigma) {
  const double h = 1.0 / (bins - 1);
  return h * h / (2.0 * (double)sigma * (double)sigma);
}

// Step 0a: truncation radius K (in bins) of the soft binning.
// With the value at most h/2 from its nearest centre, the omitted bins at distance >= K+1 from
// that centre carry, relative to the nearest bin, at most exp(-m(m+1) c) each (m = K, K+1,
// ...), on two sides: eps(K) <= 2 e^{-K(K+1)c} / (1 - e^{-2(K+1)c}). We take the smallest K
// with eps(K) <= 1e-9. Then every weight vector moves by <= 2 eps in L1, every joint/marginal
// by <= 4 eps, and each of the three entropy sums by <= 4 eps (log(B^2 / 4 eps) + 1) < 1.2e-7
// (concavity of -p log p), so |MI_trunc - MI_dense| is ~1e-7 in the worst case (a value exactly
// between two centres) and far below that typically. Defaults (B = 27, sigma = 8/255):
// c = 0.7515, K = 5, S = 11.
GALIP_HD inline int galip_lmi_support_radius(int bins, float sigma) {
  const double c = galip_lmi_bin_c(bins, sigma);
  for (int k = 0; k < bins; ++k) {
    const double eps = 2.0 * exp(-k * (k + 1.0) * c) / (1.0 - exp(-2.0 * (k + 1.0) * c));
    if (eps <= GALIP_LMI_TRUNC_EPS) return k;
  }
  return bins - 1;
}

GALIP_HD inline int galip_lmi_support(int bins, float sigma) {
  return galip_imin(2 * galip_lmi_support_radius(bins, sigma) + 1, bins);
}

// Step 0b: precision. Every local entropy H_X, H_Y is >= the entropy of one sample's weights
// (concavity), smallest for a value on the edge centre. When that is >= 0.25 nats, float32
// rounding (~1e-7 relative) moves NMI by < 1e-6 and float32 is used; otherwise (e.g. B = 8 at
// sigma = 8/255: ~1e-3 nats, almost hard binning) the joint is accumulated in float64.
GALIP_HD inline int galip_lmi_needs_double(int bins, float sigma) {
  const double c = galip_lmi_bin_c(bins, sigma);
  double z = 0.0, zlogw = 0.0;  // weights exp(-c a^2) of v = 0, normalised below
  for (int a = 0; a < bins; ++a) {
    const double e = c * a * a;
    z += exp(-e);
    zlogw += exp(-e) * e;
  }
  const double entropy = zlogw / z + log(z);  // -sum p log p, p = exp(-e) / z
  return entropy < GALIP_LMI_FLOAT_MIN_ENTROPY;
}

// Natural log of a positive normal number. Host: branch-free (exponent split at sqrt(1/2) as
// in musl, then log m = 2 atanh s, s = (m-1)/(m+1), |s| <= 0.1716) so that g++ vectorises the
// entropy loops; double: series to s^11, abs. error <= 5e-11; float: to s^7, rel. <= 2.2e-7.
// Device: log / logf.
GALIP_HD inline double galip_lmi_log(double x) {
#if defined(__CUDA_ARCH__)
  return log(x);
#else
  unsigned long long u = __builtin_bit_cast(unsigned long long, x);
  u += 0x3ff0000000000000ull - 0x3fe6a09e667f3bcdull;
  const double e = (double)((long long)(u >> 52) - 0x3ff);
  u = (u & 0x000fffffffffffffull) + 0x3fe6a09e667f3bcdull;
  const double m = __builtin_bit_cast(double, u);  // m in [sqrt(1/2), sqrt(2))
  const double s = (m - 1.0) / (m + 1.0), z = s * s;
  const double p = 2.0 / 3 + z * (2.0 / 5 + z * (2.0 / 7 + z * (2.0 / 9 + z * (2.0 / 11))));
  return e * 0.69314718055994530942 + 2.0 * s + s * z * p;
#endif
}

// x = m 2^e with m in [sqrt(1/2), sqrt(2)) for a positive normal float; returns m, sets e.
GALIP_HD inline float galip_lmi_log_split(float x, float* e) {
  unsigned int u = __builtin_bit_cast(unsigned int, x);
  u += 0x3f800000u - 0x3f3504f3u;
  *e = (float)((int)(u >> 23) - 0x7f);
  u = (u & 0x007fffffu) + 0x3f3504f3u;
  return __builtin_bit_cast(float, u);
}

GALIP_HD inline float galip_lmi_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  float e;
  const float m = galip_lmi_log_split(x, &e);
  const float s = (m - 1.0f) / (m + 1.0f), z = s * s;
  const float p = 2.0f / 3 + z * (2.0f / 5 + z * (2.0f / 7));
  return e * 0.693147180559945f + 2.0f * s + s * z * p;
#endif
}

GALIP_HD inline float galip_exp(float x) { return expf(x); }
GALIP_HD inline double galip_exp(double x) { return exp(x); }

// Step 1: first bin of a sample's window: nearest centre minus K, shifted inside [0, B - S].
GALIP_HD inline int galip_lmi_nearest(float v, int bins) {  // nearest centre; NaN -> 0
  return (int)fminf(fmaxf(rintf(v * (float)(bins - 1)), 0.0f), (float)(bins - 1));
}

GALIP_HD inline int galip_lmi_first_bin(float v, int bins, int support) {
  return galip_imin(galip_imax(galip_lmi_nearest(v, bins) - support / 2, 0), bins - support);
}

// Step 2: normalised Gaussian soft-bin weights of v over bins [start, start + S) (docs/design.md
// "soft-bin every pixel with Gaussian weights normalised over bins"). With delta = v/h - a0
// (a0 the nearest centre), bin a0 + k has weight exp(-c (k^2 - 2 k delta)) relative to bin
// a0; neighbouring ratios form a geometric sequence, so one sample costs two exp calls (in
// `calc` precision: float64 on the host, `real` in the CUDA kernel). Taking a0 as the reference
// (weight 1) means values outside [0, 1] cannot underflow the sum: they bin like the nearest
// edge.
template <class real, class calc>
GALIP_HD inline void galip_lmi_soft_bin(float v, int bins, int support, calc c, int start,
                                        real* w) {
  const int a0 = galip_lmi_nearest(v, bins);  // inside the window by construction
  const calc one = 1, two = 2;
  const calc delta = (calc)v * (bins - 1) - a0;
  const calc q = galip_exp(-two * c);
  const calc g_up = galip_exp(-c * (one - two * delta)), g_down = galip_exp(-c * (one + two * delta));
  const int k0 = a0 - start;
  calc inv = 0;
  for (int pass = 0; pass < 2; ++pass) {  // pass 0: normaliser; pass 1: weights
    calc sum = one, cur = one, g = g_up;
    if (pass) w[k0] = (real)inv;
    for (int k = k0 + 1; k < support; ++k) {  // upwards: ratio exp(-c (2k + 1 - 2 delta))
      cur *= g;
      g *= q;
      sum += cur;
      if (pass) w[k] = (real)(cur * inv);
    }
    cur = one;
    g = g_down;
    for (int k = k0 - 1; k >= 0; --k) {  // downwards: ratio exp(-c (2k + 1 + 2 delta))
      cur *= g;
      g *= q;
      sum += cur;
      if (pass) w[k] = (real)(cur * inv);
    }
    inv = one / sum;
  }
}

// Weight source reading precomputed planes (host: each window computed once per call).
template <class real>
struct GalipLmiPlanes {
  const int* start;     // (H, W) first bin
  const real* weights;  // (H, W, L) window weights, zero beyond S
  int W, L;
  GALIP_HD int first_bin(int h, int w) const { return start[h * W + w]; }
  GALIP_HD const real* weights_at(int h, int w, real*) const {
    return weights + (long)(h * W + w) * L;
  }
};

// -sum p log p over p_k = v_k * scale, 0 log 0 = 0 (masses below the smallest normal number
// count as 0); one flat loop, vectorised on the host.
template <class real>
GALIP_HD inline real galip_lmi_entropy(const real* v, int n, real scale) {
  const real tiny = sizeof(real) == 4 ? (real)1.17549435e-38f : (real)2.2250738585072014e-308;
  real h = 0;
  GALIP_SIMD_SUM(h)
  for (int k = 0; k < n; ++k) {
    const real p = v[k] * scale;
    h -= p * galip_lmi_log(p > tiny ? p : tiny);  // p = 0 adds 0 * log(tiny) = 0
  }
  return h;
}

// MI = H_X + H_Y - H_XY, or NMI = 2 MI / (H_X + H_Y) (0 where H_X + H_Y <= 1e-12).
GALIP_HD inline double galip_lmi_mi_value(double hx, double hy, double hxy, int normalize) {
  const double mi = hx + hy - hxy;
  if (!normalize) return mi;
  return hx + hy > 1e-12 ? 2.0 * mi / (hx + hy) : 0.0;
}

// Step 4d: LMI = max over offsets (paper Eq. 11); ties -> first offset in row-major order.
GALIP_HD inline int galip_lmi_argmax(const double* mi, int offsets, double best) {
  int tstar = 0;
  while (tstar < offsets - 1 && !(mi[tstar] >= best - GALIP_LMI_TIE_TOL)) ++tstar;
  return tstar;
}

// Step 3: MI (or NMI) of the un-normalised joint J (bx x by box, row stride by), paper Eq. 2.
// P = J / T with T = sum J (= the number of pairs up to rounding; dividing by the actual sum
// keeps tiny entropies exact in float64): MI = H_X + H_Y - H_XY, NMI = 2 MI / (H_X + H_Y).
// rs, cs: >= bx, by reals of scratch.
template <class real>
GALIP_HD inline double galip_lmi_mi_of_joint(const real* J, int bx, int by, int normalize,
                                             real* rs, real* cs) {
  // 3a: marginals from the joint (row and column sums) and the total mass.
  for (int b = 0; b < by; ++b) cs[b] = 0;
  real total = 0;
  for (int a = 0; a < bx; ++a) {
    const real* row = J + a * by;
    real r = 0;
    GALIP_SIMD_SUM(r)
    for (int b = 0; b < by; ++b) {
      r += row[b];
      cs[b] += row[b];
    }
    rs[a] = r;
    total += r;
  }
  // 3b: entropies of the joint and of both marginals.
  const real inv_t = (real)1 / total;
  const double hxy = galip_lmi_entropy(J, bx * by, inv_t);
  const double hx = galip_lmi_entropy(rs, bx, inv_t), hy = galip_lmi_entropy(cs, by, inv_t);
  return galip_lmi_mi_value(hx, hy, hxy, normalize);
}

// J[a * stride + b] += wx[a] * wy[b] for a < S, b < L (one pair's contribution, Step 4b;
// wy is zero beyond S). SC, LC > 0 fix S, L at compile time (host defaults: 11 and 12, so a
// row update is one 8-wide plus one 4-wide unmasked FMA).
template <class real, int SC, int LC>
GALIP_HD inline void galip_lmi_outer_add(real* __restrict__ J, int stride,
                                         const real* __restrict__ wx,
                                         const real* __restrict__ wy, int S, int L) {
  const int rows = SC > 0 ? SC : S, cols = LC > 0 ? LC : L;
  for (int a = 0; a < rows; ++a) {
    const real u = wx[a];
    real* __restrict__ row = J + a * stride;
    GALIP_SIMD
    for (int b = 0; b < cols; ++b) row[b] += u * wy[b];
  }
}

// Work area of galip_lmi_pixel in reals: joint B x (B + L - S), 2 windows, 2 marginals.
GALIP_HD inline int galip_lmi_work_size(int bins, int pad) {
  return bins * (bins + pad) + 4 * (bins + pad);
}

// Step 4: LMI of one pixel (h, w): MI for every offset, then the tie-aware arg-max.
// work: galip_lmi_work_size(B, L - S) reals; mi: (2r+1)^2 doubles. Writes the LMI value and the
// offset index t* = (dy + r)(2r + 1) + (dx + r).
template <class real, int SC, int LC, class Src>
GALIP_HD inline void galip_lmi_pixel(const Src& sx, const Src& sy, const GalipLmiShape& s, int h,
                                     int w, real* work, double* mi, float* out_lmi,
                                     int* out_tau) {
  const int B = s.bins, S = SC > 0 ? SC : s.support, L = LC > 0 ? LC : s.window;
  const int R = s.radius, D = 2 * R + 1, half = s.patch / 2, BL = B + L - S;
  real *J = work, *wx_buf = J + B * BL, *wy_buf = wx_buf + BL, *rs = wy_buf + BL, *cs = rs + BL;
  const int h0 = galip_imax(h - half, 0), h1 = galip_imin(h + half, s.H - 1);
  const int w0 = galip_imax(w - half, 0), w1 = galip_imin(w + half, s.W - 1);
  double best = -1e300;
  for (int t = 0; t < D * D; ++t) {
    // 4a: valid pairs (X_j and Y_{j+tau} inside the image) and the joint's bounding box.
    int dy, dx;
    GalipLmiBox box;
    if (!galip_lmi_offset(s, h0, h1, w0, w1, t, &dy, &dx, &box, mi, &best)) continue;
    const int ha = box.ha, hb = box.hb, wa = box.wa, wb = box.wb;
    int xlo = B, xhi = 0, ylo = B, yhi = 0;
    for (int jh = ha; jh <= hb; ++jh) {
      for (int jw = wa; jw <= wb; ++jw) {
        const int bx0 = sx.first_bin(jh, jw), by0 = sy.first_bin(jh + dy, jw + dx);
        xlo = galip_imin(xlo, bx0), xhi = galip_imax(xhi, bx0);
        ylo = galip_imin(ylo, by0), yhi = galip_imax(yhi, by0);
      }
    }
    const int bx = xhi - xlo + S, by = yhi - ylo + L;  // by - (L - S) columns are zero
    for (int k = 0; k < bx * by; ++k) J[k] = 0;
    // 4b: sparse joint: each pair adds the S x S outer product of its windows.
    for (int jh = ha; jh <= hb; ++jh) {
      for (int jw = wa; jw <= wb; ++jw) {
        const real* wxp = sx.weights_at(jh, jw, wx_buf);
        const real* wyp = sy.weights_at(jh + dy, jw + dx, wy_buf);
        real* base =
            J + (sx.first_bin(jh, jw) - xlo) * by + (sy.first_bin(jh + dy, jw + dx) - ylo);
        galip_lmi_outer_add<real, SC, LC>(base, by, wxp, wyp, S, L);
      }
    }
    // 4c: MI / NMI of P = J / sum J (paper Eq. 2).
    mi[t] = galip_lmi_mi_of_joint(J, bx, by, s.normalize, rs, cs);
    best = mi[t] > best ? mi[t] : best;
  }
  // 4d: LMI = max over offsets, ties to the first.
  const int tstar = galip_lmi_argmax(mi, D * D, best);
  *out_lmi = (float)mi[tstar];
  *out_tau = tstar;
}

// ---------------------------------------------------------------------------- dense-window path
// The same MI, arranged for SIMD (issue 14): every pixel's soft-bin window is stored as a dense
// GALIP_LMI_DENSE_BINS-float vector over all bins (zero outside its S bins), so row a of the
// joint, J(a, .) = sum_j wx_j(a) wy_j(.), is a few broadcast FMAs per pair into registers (no
// joint in memory: nothing to zero, store or reload), only over the rows and 8-column blocks the
// windows reach. Entropies use sum p log p = (sum J log J) / T - log T (p = J / T), so each joint
// entry costs one division-free polynomial log (galip_lmi_log_poly). Where the pair box is the
// whole p x p patch, H_X and H_Y come from per-pixel maps made once per call (the marginal of the
// patch around i, and around i + tau); elsewhere (image borders) from the box's own marginals.
// Used for float accumulation with B <= GALIP_LMI_DENSE_BINS and p^2 <= GALIP_LMI_DENSE_PAIRS.
#define GALIP_LMI_DENSE_BINS 32
#define GALIP_LMI_DENSE_PAIRS 64

// Natural log of a positive normal float without a division: x = m 2^e with m in
// [sqrt(1/2), sqrt(2)), log(1 + f) = f + f^2 q(f), q a degree-6 least-squares fit on that range
// (abs. error <= 1.6e-7 in float, below the 1e-6 the contract tests allow by far). Device: logf.
GALIP_HD inline float galip_lmi_log_poly(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  float e;
  const float f = galip_lmi_log_split(x, &e) - 1.0f;
  float q = -1.043454566e-01f;
  q = q * f + 1.608053880e-01f;
  q = q * f - 1.710213789e-01f;
  q = q * f + 1.991819466e-01f;
  q = q * f - 2.498344557e-01f;
  q = q * f + 3.333435486e-01f;
  q = q * f - 5.000008562e-01f;
  return e * 0.693147180559945f + f + f * f * q;
#endif
}

// GALIP_LMI_LANES floats: a GCC vector in the plain host build (one AVX-512 register where the
// CPU has it, else one AVX register or two SSE ones), an array elsewhere (nvcc, other
// compilers), behind the same few operations.
#if !defined(__CUDACC__) && defined(__GNUC__)
#if defined(__AVX512F__)
#define GALIP_LMI_LANES 16
#else
#define GALIP_LMI_LANES 8
#endif
typedef float GalipVec __attribute__((vector_size(4 * GALIP_LMI_LANES)));
typedef int GalipIVec __attribute__((vector_size(4 * GALIP_LMI_LANES)));
GALIP_HD inline GalipVec galip_vec(float u) { return u - GalipVec{}; }
GALIP_HD inline GalipVec galip_vec_load(const float* p) {  // p: aligned to the vector
  return *(const GalipVec*)__builtin_assume_aligned(p, 4 * GALIP_LMI_LANES);
}
GALIP_HD inline float galip_vec_sum(GalipVec v) {
  float s = 0.0f;
  for (int l = 0; l < GALIP_LMI_LANES; ++l) s += v[l];
  return s;
}
// x log x per lane (x <= 0 gives 0), galip_lmi_log_poly's arithmetic on every lane.
GALIP_HD inline GalipVec galip_vec_xlogx(GalipVec x) {
  const GalipVec tiny = galip_vec(1.17549435e-38f);
  const GalipVec xc = x > tiny ? x : tiny;
  GalipIVec u = (GalipIVec)xc + (0x3f800000 - 0x3f3504f3);
  const GalipVec e = __builtin_convertvector((u >> 23) - 0x7f, GalipVec);
  u = (u & 0x007fffff) + 0x3f3504f3;
  const GalipVec f = (GalipVec)u - 1.0f;
  GalipVec q = f * -1.043454566e-01f + 1.608053880e-01f;
  q = q * f - 1.710213789e-01f;
  q = q * f + 1.991819466e-01f;
  q = q * f - 2.498344557e-01f;
  q = q * f + 3.333435486e-01f;
  q = q * f - 5.000008562e-01f;
  return x * (e * 0.693147180559945f + f + f * f * q);
}
#else
#define GALIP_LMI_LANES 8
struct GalipVec {
  float v[GALIP_LMI_LANES];
  GALIP_HD GalipVec operator*(float u) const {
    GalipVec r;
    for (int l = 0; l < GALIP_LMI_LANES; ++l) r.v[l] = v[l] * u;
    return r;
  }
  GALIP_HD GalipVec& operator+=(const GalipVec& o) {
    for (int l = 0; l < GALIP_LMI_LANES; ++l) v[l] += o.v[l];
    return *this;
  }
};
GALIP_HD inline GalipVec operator*(float u, const GalipVec& a) { return a * u; }
GALIP_HD inline GalipVec galip_vec(float u) {
  GalipVec r;
  for (int l = 0; l < GALIP_LMI_LANES; ++l) r.v[l] = u;
  return r;
}
GALIP_HD inline GalipVec galip_vec_load(const float* p) {
  GalipVec r;
  for (int l = 0; l < GALIP_LMI_LANES; ++l) r.v[l] = p[l];
  return r;
}
GALIP_HD inline float galip_vec_sum(const GalipVec& a) {
  float s = 0.0f;
  for (int l = 0; l < GALIP_LMI_LANES; ++l) s += a.v[l];
  return s;
}
GALIP_HD inline GalipVec galip_vec_xlogx(const GalipVec& x) {
  GalipVec r;
  for (int l = 0; l < GALIP_LMI_LANES; ++l)
    r.v[l] = x.v[l] * galip_lmi_log_poly(x.v[l] > 1.17549435e-38f ? x.v[l] : 1.17549435e-38f);
  return r;
}
#endif

// sum v log v over n floats, n a multiple of GALIP_LMI_LANES (v = 0 adds 0).
GALIP_HD inline float galip_lmi_xlogx(const float* v, int n) {
  GalipVec s = galip_vec(0.0f);
  for (int k = 0; k < n; k += GALIP_LMI_LANES) s += galip_vec_xlogx(galip_vec_load(v + k));
  return galip_vec_sum(s);
}

// Step 4b on dense windows: sum J log J over rows [a0, a1) and NB lane blocks from cb0 of
// J(a, .) = sum_j wx_j(a) wy_j(.), built in registers by broadcast FMAs, four rows at a time
// (independent FMA chains; rows past a1 are zero rows of the 32-float windows: J log J = 0).
template <int NB>
GALIP_HD inline float galip_lmi_joint_xlogx(const float* const* wx, const float* const* wy, int n,
                                            int a0, int a1, int cb0) {
  const int L = GALIP_LMI_LANES;
  GalipVec acc = galip_vec(0.0f);
  for (int a = a0; a < a1; a += 4) {
    GalipVec row[4][NB];
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NB; ++c) row[r][c] = galip_vec(0.0f);
    for (int j = 0; j < n; ++j) {
      const float* u = wx[j] + a;
      for (int c = 0; c < NB; ++c) {
        const GalipVec v = galip_vec_load(wy[j] + (cb0 + c) * L);
        for (int r = 0; r < 4; ++r) row[r][c] += u[r] * v;
      }
    }
    for (int r = 0; r < 4; ++r)
      for (int c = 0; c < NB; ++c) acc += galip_vec_xlogx(row[r][c]);
  }
  return galip_vec_sum(acc);
}

// -sum p log p of p = r / T for the marginal r (n floats) of total mass T.
GALIP_HD inline double galip_lmi_entropy_of_mass(const float* r, int n, double total) {
  return log(total) - (double)galip_lmi_xlogx(r, n) / total;
}

// Dense windows of one image: value (H*W) its pixels, win (H*W, 32) floats, first (H*W) first bins, mass (H*W) window
// sums, hfull (H*W) entropy of the full p x p patch's marginal (NaN where the patch leaves the
// image).
struct GalipLmiDense {
  const float* value;  // the image itself (H*W)
  const float* win;
  const int* first;
  const float* mass;
  const float* hfull;
  int W;
  GALIP_HD const float* at(int h, int w) const { return win + (long)(h * W + w) * GALIP_LMI_DENSE_BINS; }
  GALIP_HD int idx(int h, int w) const { return h * W + w; }
};

// Marginal r (32 floats) = sum over the pairs of win_j * weight_j; returns its mass.
GALIP_HD inline double galip_lmi_dense_marginal(const float* const* win, const float* weight, int n,
                                                float* r) {
  for (int b = 0; b < GALIP_LMI_DENSE_BINS; ++b) r[b] = 0.0f;
  double total = 0.0;
  for (int j = 0; j < n; ++j) {
    const float* v = win[j];
    const float u = weight ? weight[j] : 1.0f;
    GALIP_SIMD
    for (int b = 0; b < GALIP_LMI_DENSE_BINS; ++b) r[b] += u * v[b];
  }
  for (int b = 0; b < GALIP_LMI_DENSE_BINS; ++b) total += r[b];
  return total;
}

// Step 4 on dense windows: MI for every offset, then the tie-aware arg-max (as galip_lmi_pixel).
GALIP_HD inline void galip_lmi_pixel_dense(const GalipLmiDense& sx, const GalipLmiDense& sy,
                                           const GalipLmiShape& s, int h, int w, double* mi,
                                           float* out_lmi, int* out_tau) {
  const int R = s.radius, D = 2 * R + 1, half = s.patch / 2, S = s.support, P = s.patch;
  const int h0 = galip_imax(h - half, 0), h1 = galip_imin(h + half, s.H - 1);
  const int w0 = galip_imax(w - half, 0), w1 = galip_imin(w + half, s.W - 1);
  const float* wx[GALIP_LMI_DENSE_PAIRS];
  const float* wy[GALIP_LMI_DENSE_PAIRS];
  float mx[GALIP_LMI_DENSE_PAIRS], my[GALIP_LMI_DENSE_PAIRS];
  alignas(64) float rx[GALIP_LMI_DENSE_BINS];
  alignas(64) float ry[GALIP_LMI_DENSE_BINS];
  double best = -1e300;
  for (int t = 0; t < D * D; ++t) {
    int dy, dx;
    GalipLmiBox box;
    if (!galip_lmi_offset(s, h0, h1, w0, w1, t, &dy, &dx, &box, mi, &best)) continue;
    // 4a: the valid pairs' windows, the rows and 8-column blocks they reach, the total mass.
    int n = 0, xlo = GALIP_LMI_DENSE_BINS, xhi = 0, ylo = GALIP_LMI_DENSE_BINS, yhi = 0;
    double total = 0.0;
    const float x0 = sx.value[sx.idx(box.ha, box.wa)], y0 = sy.value[sy.idx(box.ha + dy, box.wa + dx)];
    bool x_const = true, y_const = true;
    for (int jh = box.ha; jh <= box.hb; ++jh) {
      for (int jw = box.wa; jw <= box.wb; ++jw, ++n) {
        const int ix = sx.idx(jh, jw), iy = sy.idx(jh + dy, jw + dx);
        x_const = x_const && sx.value[ix] == x0, y_const = y_const && sy.value[iy] == y0;
        wx[n] = sx.at(jh, jw), wy[n] = sy.at(jh + dy, jw + dx);
        mx[n] = sx.mass[ix], my[n] = sy.mass[iy];
        xlo = galip_imin(xlo, sx.first[ix]), xhi = galip_imax(xhi, sx.first[ix]);
        ylo = galip_imin(ylo, sy.first[iy]), yhi = galip_imax(yhi, sy.first[iy]);
        total += (double)mx[n] * my[n];
      }
    }
    // One image constant over the pairs: identical windows, so P = P_X (x) P_Y and MI = 0
    // exactly (float rounding would only add noise around it).
    if (x_const || y_const) {
      mi[t] = 0.0;
      best = best > 0.0 ? best : 0.0;
      continue;
    }
    // 4b: sum J log J over the rows and 8-column blocks the windows reach.
    const int L = GALIP_LMI_LANES, cb0 = ylo / L, a1 = xhi + S;
    double jlogj;
    switch ((yhi + S + L - 1) / L - cb0) {
      case 1: jlogj = galip_lmi_joint_xlogx<1>(wx, wy, n, xlo, a1, cb0); break;
      case 2: jlogj = galip_lmi_joint_xlogx<2>(wx, wy, n, xlo, a1, cb0); break;
      case 3: jlogj = galip_lmi_joint_xlogx<3>(wx, wy, n, xlo, a1, cb0); break;
      default: jlogj = galip_lmi_joint_xlogx<4>(wx, wy, n, xlo, a1, cb0); break;
    }
    const double hxy = log(total) - jlogj / total;
    // 4c: marginal entropies: the per-pixel maps for a whole patch, else this box's marginals.
    double hx, hy;
    if (n == P * P && sx.hfull[sx.idx(h, w)] == sx.hfull[sx.idx(h, w)] &&
        sy.hfull[sy.idx(h + dy, w + dx)] == sy.hfull[sy.idx(h + dy, w + dx)]) {
      hx = sx.hfull[sx.idx(h, w)], hy = sy.hfull[sy.idx(h + dy, w + dx)];
    } else {
      hx = galip_lmi_entropy_of_mass(rx, GALIP_LMI_DENSE_BINS, galip_lmi_dense_marginal(wx, my, n, rx));
      hy = galip_lmi_entropy_of_mass(ry, GALIP_LMI_DENSE_BINS, galip_lmi_dense_marginal(wy, mx, n, ry));
    }
    mi[t] = galip_lmi_mi_value(hx, hy, hxy, s.normalize);
    best = mi[t] > best ? mi[t] : best;
  }
  const int tstar = galip_lmi_argmax(mi, D * D, best);
  *out_lmi = (float)mi[tstar];
  *out_tau = tstar;
}

// 1 when the dense-window path handles these settings (float accumulation, B <= 32, p^2 <= 64).
GALIP_HD inline int galip_lmi_dense_supported(int patch, int bins, float sigma) {
  return bins <= GALIP_LMI_DENSE_BINS && patch * patch <= GALIP_LMI_DENSE_PAIRS &&
         !galip_lmi_needs_double(bins, sigma);
}

// Scratch of galip_lmi_pixel_rows in reals: two windows per pair of a patch, a row, column sums.
GALIP_HD inline int galip_lmi_rows_scratch(int patch, int support, int bins) {
  return 2 * patch * patch * support + 2 * bins;
}

// Step 4, CUDA kernel path: as galip_lmi_pixel, but with the joint built one row at a time.
// X's windows (the same for every offset) are computed once per pixel, Y's once per offset;
// row a of J is the sum over pairs j of wx_j(a) * wy_j (same pair order, so the same sums as
// the block path), and its entropy terms and the marginals are taken as it is made. P = J / T
// with T = sum_j |wx_j| |wy_j| (= sum J up to rounding). x, y: (H, W) images; c: Step 2's
// constant in `real`; scratch: galip_lmi_rows_scratch(patch, S, B) reals; start: 2 p^2 ints;
// mi: (2r+1)^2 doubles.
template <class real>
GALIP_HD inline void galip_lmi_pixel_rows(const float* x, const float* y, const GalipLmiShape& s,
                                          real c, int h, int w, real* scratch, int* start,
                                          double* mi, float* out_lmi, int* out_tau) {
  const int B = s.bins, S = s.support, R = s.radius, D = 2 * R + 1, half = s.patch / 2;
  const int h0 = galip_imax(h - half, 0), h1 = galip_imin(h + half, s.H - 1);
  const int w0 = galip_imax(w - half, 0), w1 = galip_imin(w + half, s.W - 1);
  const int pw = w1 - w0 + 1, n = (h1 - h0 + 1) * pw;
  real *wx = scratch, *wy = wx + n * S, *row = wy + n * S, *cs = row + B;
  int *sx = start, *sy = start + n;
  for (int j = 0; j < n; ++j) {  // 4a': X's windows, once per pixel
    const float v = x[(h0 + j / pw) * s.W + w0 + j % pw];
    sx[j] = galip_lmi_first_bin(v, B, S);
    galip_lmi_soft_bin(v, B, S, c, sx[j], wx + j * S);
  }
  double best = -1e300;
  for (int t = 0; t < D * D; ++t) {
    int dy, dx;
    GalipLmiBox box;
    if (!galip_lmi_offset(s, h0, h1, w0, w1, t, &dy, &dx, &box, mi, &best)) continue;
    const int ha = box.ha, hb = box.hb, wa = box.wa, wb = box.wb;
    // 4a: Y's windows of the valid pairs, the joint's bounding box and its total mass.
    int xlo = B, xhi = 0, ylo = B, yhi = 0;
    real total = 0;
    for (int jh = ha; jh <= hb; ++jh) {
      for (int jw = wa; jw <= wb; ++jw) {
        const int j = (jh - h0) * pw + (jw - w0);
        const float v = y[(jh + dy) * s.W + jw + dx];
        sy[j] = galip_lmi_first_bin(v, B, S);
        galip_lmi_soft_bin(v, B, S, c, sy[j], wy + j * S);
        xlo = galip_imin(xlo, sx[j]), xhi = galip_imax(xhi, sx[j]);
        ylo = galip_imin(ylo, sy[j]), yhi = galip_imax(yhi, sy[j]);
        real mx = 0, my = 0;
        for (int k = 0; k < S; ++k) mx += wx[j * S + k], my += wy[j * S + k];
        total += mx * my;
      }
    }
    // 4b-c: rows of J, their entropy terms and both marginals' entropies (paper Eq. 2).
    const int bx = xhi - xlo + S, by = yhi - ylo + S;
    const real inv_t = (real)1 / total;
    for (int b = 0; b < by; ++b) cs[b] = 0;
    double hxy = 0.0, hx = 0.0;
    for (int a = xlo; a < xlo + bx; ++a) {
      for (int b = 0; b < by; ++b) row[b] = 0;
      for (int jh = ha; jh <= hb; ++jh) {
        for (int jw = wa; jw <= wb; ++jw) {
          const int j = (jh - h0) * pw + (jw - w0), k = a - sx[j];
          if (k < 0 || k >= S) continue;
          const real u = wx[j * S + k];
          real* r = row + (sy[j] - ylo);
          const real* v = wy + j * S;
          for (int b = 0; b < S; ++b) r[b] += u * v[b];
        }
      }
      real rsum = 0;
      for (int b = 0; b < by; ++b) rsum += row[b], cs[b] += row[b];
      hxy += galip_lmi_entropy(row, by, inv_t);
      hx += galip_lmi_entropy(&rsum, 1, inv_t);
    }
    mi[t] = galip_lmi_mi_value(hx, galip_lmi_entropy(cs, by, inv_t), hxy, s.normalize);
    best = mi[t] > best ? mi[t] : best;
  }
  const int tstar = galip_lmi_argmax(mi, D * D, best);
  *out_lmi = (float)mi[tstar];
  *out_tau = tstar;
}

// 1 when the CUDA kernel's fixed local arrays hold these settings (float64 ones take twice the
// room), 0 otherwise (the kernel then writes NaN / -1).
GALIP_HD inline int galip_lmi_device_supported(int patch, int radius, int bins, float sigma) {
  if (bins < 2 || bins > GALIP_LMI_DEVICE_MAX_BINS || radius < 0 ||
      radius > GALIP_LMI_DEVICE_MAX_RADIUS || patch < 1 || patch > GALIP_LMI_DEVICE_MAX_PATCH)
    return 0;
  const int reals = galip_lmi_rows_scratch(patch, galip_lmi_support(bins, sigma), bins);
  return reals * (galip_lmi_needs_double(bins, sigma) ? 2 : 1) <= GALIP_LMI_DEVICE_SCRATCH;
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
// Settings outside galip_lmi_device_supported write NaN / -1.
extern "C" __global__ void galip_lmi_kernel(const float* x, const float* y, int N, int H, int W,
                                            int patch, int radius, int bins, float sigma,
                                            int normalize, float* lmi, float* y_at,
                                            int* offset_index) {
  const int pix = blockIdx.x * blockDim.x + threadIdx.x;
  const int nb = blockIdx.y;
  if (pix >= H * W || nb >= N) return;
  const long o = (long)nb * H * W + pix;
  const int D = GALIP_LMI_DEVICE_MAX_RADIUS * 2 + 1;
  double scratch[GALIP_LMI_DEVICE_SCRATCH / 2];  // float or double reals, 8-byte aligned
  int start[2 * GALIP_LMI_DEVICE_MAX_PATCH * GALIP_LMI_DEVICE_MAX_PATCH];
  double mi[D * D];
  if (!galip_lmi_device_supported(patch, radius, bins, sigma)) {
    lmi[o] = NAN;
    y_at[o] = NAN;
    offset_index[o] = -1;
    return;
  }
  const GalipLmiShape s = galip_lmi_shape(H, W, patch, radius, bins, sigma, normalize);
  const float* xn = x + (long)nb * H * W;
  const float* yn = y + (long)nb * H * W;
  const double c = galip_lmi_bin_c(bins, sigma);
  const int h = pix / W, w = pix % W;
  float v;
  int tau;
  if (galip_lmi_needs_double(bins, sigma))
    galip_lmi_pixel_rows<double>(xn, yn, s, c, h, w, scratch, start, mi, &v, &tau);
  else
    galip_lmi_pixel_rows<float>(xn, yn, s, (float)c, h, w, (float*)scratch, start, mi, &v, &tau);
  lmi[o] = v;
  offset_index[o] = tau;
  y_at[o] = galip_lmi_y_at(yn, H, W, radius, h, w, tau);
}
#endif
