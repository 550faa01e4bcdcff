// Host (CPU) entry of the LMI kernel: OpenMP over pixels, per-pixel math from lmi.cuh.
// Built on first use by galip.runtime.lmi_native (g++ -O3 -march=native -fopenmp -shared).
#include "lmi.cuh"

#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

// Validates the run-time parameters; 0 when they are usable.
static int galip_lmi_check(int N, int H, int W, int patch, int radius, int bins, float sigma) {
  if (N < 0 || H < 1 || W < 1) return 1;
  if (patch < 1 || patch % 2 == 0) return 2;
  if (radius < 0) return 3;
  if (bins < 2) return 4;
  if (!(sigma > 0.0f)) return 5;
  return 0;
}

extern "C" {

// Truncation radius K and window size S used for (bins, sigma); see lmi.cuh.
int galip_lmi_support_radius_host(int bins, float sigma) {
  return galip_lmi_support_radius(bins, sigma);
}

// LMI of x against y. x, y: (N, H, W) float32, C order. Outputs (N, H, W): lmi float32,
// y_at float32, offset_index int32 (row-major offset index, 0 = (-r, -r)). num_threads <= 0
// uses the OpenMP default. Returns 0 on success, a positive code for bad parameters, -1 when
// out of memory.
int galip_lmi_host(const float* x, const float* y, int N, int H, int W, int patch, int radius,
                   int bins, float sigma, int normalize, int num_threads, float* lmi,
                   float* y_at, int* offset_index) {
  const int bad = galip_lmi_check(N, H, W, patch, radius, bins, sigma);
  if (bad) return bad;
  if (N == 0) return 0;
  GalipLmiShape s;
  s.H = H; s.W = W; s.patch = patch; s.radius = radius; s.bins = bins;
  s.support = galip_lmi_support(bins, sigma);
  s.normalize = normalize ? 1 : 0;
  const int S = s.support;
  const long npix = (long)N * H * W;
  const double c = galip_lmi_bin_c(bins, sigma);

  // Step 1-2: every pixel's window (first bin + S normalised weights), once per image.
  int* starts = (int*)malloc(sizeof(int) * 2 * npix);
  double* weights = (double*)malloc(sizeof(double) * 2 * npix * S);
  if (!starts || !weights) {
    free(starts);
    free(weights);
    return -1;
  }
  int failed = 0;
#ifdef _OPENMP
  if (num_threads <= 0) num_threads = omp_get_max_threads();
#pragma omp parallel num_threads(num_threads)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (long k = 0; k < 2 * npix; ++k) {
      const float v = k < npix ? x[k] : y[k - npix];
      const int st = galip_lmi_first_bin(v, bins, S);
      starts[k] = st;
      galip_lmi_soft_bin(v, bins, S, c, st, weights + k * S);
    }
    // Step 3-4: one pixel per iteration; each thread owns one work area.
    double* work = (double*)malloc(sizeof(double) * galip_lmi_work_size(bins, radius));
    if (!work) {
#ifdef _OPENMP
#pragma omp atomic write
#endif
      failed = 1;
    }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 64)
#endif
    for (long k = 0; k < npix; ++k) {
      if (!work) continue;
      const long nb = k / ((long)H * W);
      const int pix = (int)(k - nb * H * W);
      const int h = pix / W, w = pix % W;
      const long off = nb * H * W;
      GalipLmiPlanes sx = {starts + off, weights + off * S, W, S};
      GalipLmiPlanes sy = {starts + npix + off, weights + (npix + off) * S, W, S};
      float v;
      int tau;
      galip_lmi_pixel(sx, sy, s, h, w, work, &v, &tau);
      lmi[k] = v;
      offset_index[k] = tau;
      y_at[k] = galip_lmi_y_at(y + off, H, W, radius, h, w, tau);
    }
    free(work);
  }
  free(starts);
  free(weights);
  return failed ? -1 : 0;
}

}  // extern "C"
