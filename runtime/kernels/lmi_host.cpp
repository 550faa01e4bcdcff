// Host (CPU) entry of the LMI kernel: OpenMP over pixels, per-pixel math from lmi.cuh.
// Built on first use by galip.runtime.lmi_native (g++ -O3 -march=native -fopenmp -shared).
#include "lmi.cuh"

#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef _OPENMP
#define GALIP_OMP_STR(x) #x
#define GALIP_OMP(directive) _Pragma(GALIP_OMP_STR(omp directive))
#else
#define GALIP_OMP(directive)
#endif

#ifndef GALIP_LMI_HOST_WINDOW
#define GALIP_LMI_HOST_WINDOW 12
#endif

// Step 4d's outputs of pixel k (image offset off, position (h, w)): LMI, offset index, Y there.
static inline void galip_lmi_store(long k, long off, int h, int w, float v, int tau, const float* y,
                                   const GalipLmiShape& s, float* lmi, float* y_at,
                                   int* offset_index) {
  lmi[k] = v;
  offset_index[k] = tau;
  y_at[k] = galip_lmi_y_at(y + off, s.H, s.W, s.radius, h, w, tau);
}

// Validates the run-time parameters; 0 when they are usable.
static int galip_lmi_check(int N, int H, int W, int patch, int radius, int bins, float sigma) {
  if (N < 0 || H < 1 || W < 1) return 1;
  if (patch < 1 || patch % 2 == 0) return 2;
  if (radius < 0) return 3;
  if (bins < 2) return 4;
  if (!(sigma > 0.0f)) return 5;
  return 0;
}

// Steps 1-4 for every pixel of every image, accumulating in `real` (float or double) with the
// window size S fixed at compile time when SC > 0.
template <class real, int SC, int LC>
static int galip_lmi_run(const float* x, const float* y, int N, const GalipLmiShape& s,
                         double c, int num_threads, float* lmi, float* y_at, int* offset_index) {
  const int H = s.H, W = s.W, S = s.support, L = s.window, B = s.bins, D = 2 * s.radius + 1;
  const long hw = (long)H * W, npix = (long)N * hw;
  // Step 1-2: every pixel's window (first bin + S normalised weights), once per call.
  int* starts = (int*)malloc(sizeof(int) * 2 * npix);
  real* weights = (real*)malloc(sizeof(real) * 2 * npix * L);
  if (!starts || !weights) {
    free(starts);
    free(weights);
    return -1;
  }
  int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(num_threads)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (long k = 0; k < 2 * npix; ++k) {
      const float v = k < npix ? x[k] : y[k - npix];
      starts[k] = galip_lmi_first_bin(v, B, S);
      galip_lmi_soft_bin(v, B, S, c, starts[k], weights + k * L);
      for (int b = S; b < L; ++b) weights[k * L + b] = 0;
    }
    // Step 3-4: one pixel per iteration; each thread owns one work area.
    real* work = (real*)malloc(sizeof(real) * galip_lmi_work_size(B, L - S));
    double* mi = (double*)malloc(sizeof(double) * D * D);
    if (!work || !mi) {
    GALIP_OMP(atomic write)
      failed = 1;
    }
    GALIP_OMP(for schedule(dynamic, 64))
    for (long k = 0; k < npix; ++k) {
      if (!work || !mi) continue;
      const long off = (k / hw) * hw;
      const int h = (int)((k - off) / W), w = (int)((k - off) % W);
      GalipLmiPlanes<real> sx = {starts + off, weights + off * L, W, L};
      GalipLmiPlanes<real> sy = {starts + npix + off, weights + (npix + off) * L, W, L};
      float v;
      int tau;
      galip_lmi_pixel<real, SC, LC>(sx, sy, s, h, w, work, mi, &v, &tau);
      galip_lmi_store(k, off, h, w, v, tau, y, s, lmi, y_at, offset_index);
    }
    free(work);
    free(mi);
  }
  free(starts);
  free(weights);
  return failed ? -1 : 0;
}

// Dense-window path (lmi.cuh, galip_lmi_pixel_dense): Steps 1-2 into dense 32-float windows and
// the per-pixel full-patch marginal entropies, then Step 3-4 per pixel. Float accumulation.
static int galip_lmi_run_dense(const float* x, const float* y, int N, const GalipLmiShape& s,
                               double c, int num_threads, float* lmi, float* y_at,
                               int* offset_index) {
  const int H = s.H, W = s.W, S = s.support, B = s.bins, D = 2 * s.radius + 1, half = s.patch / 2;
  const int NB = GALIP_LMI_DENSE_BINS;
  const long hw = (long)H * W, npix = (long)N * hw;
  // 64-byte aligned windows (whole cache lines, aligned vector loads); x's first, then y's.
  float* win = (float*)aligned_alloc(64, sizeof(float) * 2 * npix * NB);
  int* first = (int*)malloc(sizeof(int) * 2 * npix);
  float* mass = (float*)malloc(sizeof(float) * 2 * npix);
  float* hfull = (float*)malloc(sizeof(float) * 2 * npix);
  if (!win || !first || !mass || !hfull) {
    free(win);
    free(first);
    free(mass);
    free(hfull);
    return -1;
  }
  GALIP_OMP(parallel num_threads(num_threads))
  {
    GALIP_OMP(for schedule(static))
    for (long k = 0; k < 2 * npix; ++k) {  // Steps 1-2: every pixel's window, once per call
      const float v = k < npix ? x[k] : y[k - npix];
      float* row = win + k * NB;
      float w[GALIP_LMI_DENSE_BINS];
      for (int b = 0; b < NB; ++b) row[b] = 0.0f;
      first[k] = galip_lmi_first_bin(v, B, S);
      galip_lmi_soft_bin(v, B, S, c, first[k], w);
      float m = 0.0f;
      for (int b = 0; b < S; ++b) row[first[k] + b] = w[b], m += w[b];
      mass[k] = m;
    }
    GALIP_OMP(for schedule(static))
    for (long k = 0; k < 2 * npix; ++k) {  // H of each whole patch's marginal (NaN at borders)
      const long img = k / hw, off = img * hw;
      const int h = (int)((k - off) / W), w = (int)((k - off) % W);
      if (h < half || h >= H - half || w < half || w >= W - half) {
        hfull[k] = NAN;
        continue;
      }
      const float* wins[GALIP_LMI_DENSE_PAIRS];
      int n = 0;
      for (int jh = h - half; jh <= h + half; ++jh)
        for (int jw = w - half; jw <= w + half; ++jw) wins[n++] = win + (off + (long)jh * W + jw) * NB;
      alignas(64) float r[GALIP_LMI_DENSE_BINS];
      const double total = galip_lmi_dense_marginal(wins, nullptr, n, r);
      hfull[k] = (float)galip_lmi_entropy_of_mass(r, NB, total);
    }
    double mi[GALIP_LMI_DENSE_PAIRS * 4];  // (2r + 1)^2 <= 225 checked by the caller
    GALIP_OMP(for schedule(dynamic, 64))
    for (long k = 0; k < npix; ++k) {
      const long off = (k / hw) * hw;
      const int h = (int)((k - off) / W), w = (int)((k - off) % W);
      GalipLmiDense sx = {x + off, win + off * NB, first + off, mass + off, hfull + off, W};
      GalipLmiDense sy = {y + off, win + (npix + off) * NB, first + npix + off, mass + npix + off,
                          hfull + npix + off, W};
      float v;
      int tau;
      galip_lmi_pixel_dense(sx, sy, s, h, w, mi, &v, &tau);
      galip_lmi_store(k, off, h, w, v, tau, y, s, lmi, y_at, offset_index);
    }
  }
  free(win);
  free(first);
  free(mass);
  free(hfull);
  return 0;
}

// The CUDA kernel's per-pixel path (galip_lmi_pixel_rows) run on the host, so the algorithm
// the GPU runs is tested against the contract on machines without a GPU.
template <class real>
static int galip_lmi_run_rows(const float* x, const float* y, int N, const GalipLmiShape& s,
                              real c, float* lmi, float* y_at, int* offset_index) {
  const long hw = (long)s.H * s.W, npix = (long)N * hw;
  const int D = 2 * s.radius + 1;
  int failed = 0;
  GALIP_OMP(parallel)
  {
    real* scratch = (real*)malloc(sizeof(real) * galip_lmi_rows_scratch(s.patch, s.support, s.bins));
    int* start = (int*)malloc(sizeof(int) * 2 * s.patch * s.patch);
    double* mi = (double*)malloc(sizeof(double) * D * D);
    if (!scratch || !start || !mi) {
    GALIP_OMP(atomic write)
      failed = 1;
    }
    GALIP_OMP(for schedule(dynamic, 64))
    for (long k = 0; k < npix; ++k) {
      if (!scratch || !start || !mi) continue;
      const long off = (k / hw) * hw;
      const int h = (int)((k - off) / s.W), w = (int)((k - off) % s.W);
      float v;
      int tau;
      galip_lmi_pixel_rows<real>(x + off, y + off, s, c, h, w, scratch, start, mi, &v, &tau);
      galip_lmi_store(k, off, h, w, v, tau, y, s, lmi, y_at, offset_index);
    }
    free(scratch);
    free(start);
    free(mi);
  }
  return failed ? -1 : 0;
}

extern "C" {

// 1 when the CUDA kernel's local arrays hold (patch, radius, bins, sigma); see lmi.cuh.
int galip_lmi_device_supported_host(int patch, int radius, int bins, float sigma) {
  return galip_lmi_device_supported(patch, radius, bins, sigma);
}

// As galip_lmi_host, through the CUDA kernel's per-pixel path (float unless float64 is needed,
// no window padding). Same arguments and return codes; threads: the OpenMP default.
int galip_lmi_host_rows(const float* x, const float* y, int N, int H, int W, int patch,
                        int radius, int bins, float sigma, int normalize, float* lmi,
                        float* y_at, int* offset_index) {
  const int bad = galip_lmi_check(N, H, W, patch, radius, bins, sigma);
  if (bad) return bad;
  if (N == 0) return 0;
  GalipLmiShape s = galip_lmi_shape(H, W, patch, radius, bins, sigma, normalize);
  const double c = galip_lmi_bin_c(bins, sigma);
  if (galip_lmi_needs_double(bins, sigma))
    return galip_lmi_run_rows<double>(x, y, N, s, c, lmi, y_at, offset_index);
  return galip_lmi_run_rows<float>(x, y, N, s, (float)c, lmi, y_at, offset_index);
}

// Truncation radius K (bins) used for (bins, sigma); see lmi.cuh.
int galip_lmi_support_radius_host(int bins, float sigma) {
  return galip_lmi_support_radius(bins, sigma);
}

// 1 when (bins, sigma) accumulate in float64, 0 for float32; see lmi.cuh.
int galip_lmi_needs_double_host(int bins, float sigma) {
  return galip_lmi_needs_double(bins, sigma);
}

// As galip_lmi_host, choosing the per-pixel path: algorithm 0 the dense-window path where it
// applies (else 1), 1 the planes path (the kernel before issue 14, kept as the bench's baseline).
int galip_lmi_host_algorithm(const float* x, const float* y, int N, int H, int W, int patch,
                             int radius, int bins, float sigma, int normalize, int num_threads,
                             int algorithm, float* lmi, float* y_at, int* offset_index) {
  const int bad = galip_lmi_check(N, H, W, patch, radius, bins, sigma);
  if (bad) return bad;
  if (N == 0) return 0;
  GalipLmiShape s = galip_lmi_shape(H, W, patch, radius, bins, sigma, normalize);
  const double c = galip_lmi_bin_c(bins, sigma);
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#endif
  const int D = 2 * radius + 1;
  if (algorithm == 0 && galip_lmi_dense_supported(patch, bins, sigma) && D * D <= 4 * GALIP_LMI_DENSE_PAIRS)
    return galip_lmi_run_dense(x, y, N, s, c, num_threads, lmi, y_at, offset_index);
  if (galip_lmi_needs_double(bins, sigma))
    return galip_lmi_run<double, 0, 0>(x, y, N, s, c, num_threads, lmi, y_at, offset_index);
  if (s.support == 11) {  // the defaults (B = 27, sigma = 8/255): rows padded to WIN floats
    s.window = GALIP_LMI_HOST_WINDOW;
    return galip_lmi_run<float, 11, GALIP_LMI_HOST_WINDOW>(x, y, N, s, c, num_threads, lmi,
                                                           y_at, offset_index);
  }
  return galip_lmi_run<float, 0, 0>(x, y, N, s, c, num_threads, lmi, y_at, offset_index);
}

// LMI of x against y. x, y: (N, H, W) float32, C order. Outputs (N, H, W): lmi float32,
// y_at float32, offset_index int32 (row-major offset index, 0 = (-r, -r)). num_threads <= 0
// uses the OpenMP default. Returns 0 on success, a positive code for bad parameters, -1 when
// out of memory.
int galip_lmi_host(const float* x, const float* y, int N, int H, int W, int patch, int radius,
                   int bins, float sigma, int normalize, int num_threads, float* lmi,
                   float* y_at, int* offset_index) {
  return galip_lmi_host_algorithm(x, y, N, H, W, patch, radius, bins, sigma, normalize,
                                  num_threads, 0, lmi, y_at, offset_index);
}

}  // extern "C"
