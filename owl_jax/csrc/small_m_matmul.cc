// y[M, N] = x[M, K] @ w[K, N] in fp32 for the few rows of a decode step (M = batch).
//
// At small M a matmul is a stream over the weights: every byte of w is read once per token and
// used for only M multiply-adds. General GEMM kernels pack w into panels first, which costs more
// memory traffic than the matmul itself at M <= 8. This kernel reads w in place, row-major, in
// sweeps of KB rows at a time (KB concurrent sequential streams, which the hardware prefetcher
// follows), keeps a 32-column tile of every output row in registers across the sweep, and
// splits the columns between the threads of XLA's intra-op pool.
//
// Each output element is summed over k in the same order whatever M is, so a row's result does
// not depend on which other rows share the batch.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSweepRows = 16;  // KB: rows of w per sweep

inline __mmask16 TailMask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// y[:M, c0:c1] = x[:M] @ w[:, c0:c1]; x rows have stride K, y rows stride N.
template <int M>
void Columns(const float* x, int64_t K, const float* w, int64_t N, float* y, int64_t c0,
             int64_t c1) {
  for (int64_t k0 = 0; k0 < K; k0 += kSweepRows) {
    const int64_t rows = std::min(kSweepRows, K - k0);
    for (int64_t c = c0; c < c1; c += 32) {
      const __mmask16 m0 = TailMask(c1 - c), m1 = TailMask(c1 - c - 16);
      __m512 a0[M], a1[M];
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        if (k0 == 0) {
          a0[m] = _mm512_setzero_ps();
          a1[m] = _mm512_setzero_ps();
        } else {
          a0[m] = _mm512_maskz_loadu_ps(m0, y + m * N + c);
          a1[m] = _mm512_maskz_loadu_ps(m1, y + m * N + c + 16);
        }
      }
      const float* wk = w + k0 * N + c;
      const float* xk = x + k0;
      auto row = [&](int64_t k) {
        const __m512 w0 = _mm512_maskz_loadu_ps(m0, wk + k * N);
        const __m512 w1 = _mm512_maskz_loadu_ps(m1, wk + k * N + 16);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m512 xv = _mm512_set1_ps(xk[m * K + k]);
          a0[m] = _mm512_fmadd_ps(xv, w0, a0[m]);
          a1[m] = _mm512_fmadd_ps(xv, w1, a1[m]);
        }
      };
      if (rows == kSweepRows) {  // the common case, fully unrolled
#pragma GCC unroll 16
        for (int64_t k = 0; k < kSweepRows; ++k) row(k);
      } else {
        for (int64_t k = 0; k < rows; ++k) row(k);
      }
#pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        _mm512_mask_storeu_ps(y + m * N + c, m0, a0[m]);
        _mm512_mask_storeu_ps(y + m * N + c + 16, m1, a1[m]);
      }
    }
  }
}

// All M rows, in groups of at most 8 (16 accumulators + 2 weight registers).
void AllRows(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y,
             int64_t c0, int64_t c1) {
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const float* xm = x + m0 * K;
    float* ym = y + m0 * N;
    switch (std::min<int64_t>(8, M - m0)) {
      case 1: Columns<1>(xm, K, w, N, ym, c0, c1); break;
      case 2: Columns<2>(xm, K, w, N, ym, c0, c1); break;
      case 3: Columns<3>(xm, K, w, N, ym, c0, c1); break;
      case 4: Columns<4>(xm, K, w, N, ym, c0, c1); break;
      case 5: Columns<5>(xm, K, w, N, ym, c0, c1); break;
      case 6: Columns<6>(xm, K, w, N, ym, c0, c1); break;
      case 7: Columns<7>(xm, K, w, N, ym, c0, c1); break;
      default: Columns<8>(xm, K, w, N, ym, c0, c1); break;
    }
  }
}

// One matmul cut into column ranges. Whoever runs `Work` takes the next range not yet taken,
// so the calling thread alone finishes the job if no pool thread comes: it never waits on a
// task still in the queue (the pool may be busy with a concurrent op, or be this very thread).
struct Job {
  const float* x;
  const float* w;
  float* y;
  int64_t M, K, N, parts;
  std::atomic<int64_t> next{0}, done{0};

  void Work() {
    for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
      // Cuts at multiples of 16 columns keep the ranges' stores off each other's cache lines.
      const int64_t c0 = (N * p / parts) & ~int64_t{15};
      const int64_t c1 = p + 1 == parts ? N : (N * (p + 1) / parts) & ~int64_t{15};
      AllRows(x, M, K, w, N, y, c0, c1);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

}  // namespace

static ffi::Error SmallMMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                               ffi::Buffer<ffi::F32> w, ffi::ResultBuffer<ffi::F32> y) {
  auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("small_m_matmul: w must be 2-D");
  auto job = std::make_shared<Job>();
  job->x = x.typed_data();
  job->w = w.typed_data();
  job->y = y->typed_data();
  job->K = wd[0];
  job->N = wd[1];
  job->M = job->K ? x.element_count() / job->K : 0;
  if (job->M == 0 || job->N == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->parts = std::clamp<int64_t>(job->N / 64, 1, threads);  // >= 64 columns a range
  for (int64_t i = 1; i < job->parts; ++i) pool.Schedule([job] { job->Work(); });
  job->Work();
  while (job->done.load(std::memory_order_acquire) < job->parts) {
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(owl_small_m_matmul, SmallMMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
