// CPU kernels for a decode step in fp32, registered with XLA's FFI (owl_jax/generate/cpu/decode_kernels.py).
//
// 1. owl_small_m_matmul: y[M, N] = x[M, K] @ w[K, N] for the few rows of a step (M = batch).
// 2. owl_cached_attention: softmax(q k^T / sqrt(D)) v for a few query rows against a KV cache.
// 3. owl_greedy_screen: the exact check of a greedy token picked from int8 or bf16 weights.
// 4. owl_int8_matmul: x @ w for int8 w and x quantized to int8 (the int8 draft model's).
//
// All four are streams over memory (weights, cache) with little arithmetic per byte, where XLA's
// library calls pay per-call packing or per-head overheads that cost more than the work.
//
// --- 1. matmul
//
// At small M a matmul is a stream over the weights: every byte of w is read once per token and
// used for only M multiply-adds. General GEMM kernels pack w into panels first, which costs more
// memory traffic than the matmul itself at M <= 8. This kernel reads w in place, row-major, in
// sweeps of KB rows at a time (KB concurrent sequential streams; each tile also requests its
// part of the next sweep), keeps a 32-column tile of every output row in registers across the
// sweep, and splits the columns (or, for narrow w, the rows) between threads (see Helpers).
//
// Each output element is summed over k in the same order whatever M is, so a row's result does
// not depend on which other rows share the batch. (The order does depend on the thread count
// for narrow w, whose rows the threads split.)
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSweepRows = 16;       // KB: rows of w per sweep
constexpr int64_t kRowSplitBelowN = 4096;  // narrower w: threads split its rows, not columns

inline __mmask16 TailMask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// 16 weights as floats: fp32, bf16 (uint16_t: the top half of an fp32, so a shift) or int8
// (exact as floats).
inline __m512 Load16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 Load16(__mmask16 m, const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512 Load16(__mmask16 m, const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

// y[:M, c0:c1] = xt[:K, :M]^T @ w[:K, c0:c1]: xt holds x k-major (row k's M values side by
// side), w and y rows have stride N. W is float, or uint16_t (bf16) or int8_t for the greedy
// screen's copy of the lm_head.
template <int M, bool Ahead, typename W>
void Columns(const float* xt, int64_t K, const W* w, int64_t N, float* y, int64_t c0,
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
      const W* wk = w + k0 * N + c;
      const float* xk = xt + k0 * M;
      // Narrow w (Ahead): each row also requests its part of the next sweep, a whole sweep
      // ahead. Its rows are too short streams for the hardware prefetcher to get going (M = 8,
      // 768-wide layers: a 12-layer step's matmuls 26.5 -> 22.5 ms in an A/B; M = 1 within the
      // noise). A wide w's long rows it follows well, and a sweep ahead would be evicted before
      // use (the 32000-wide lm_head: 27 -> 22 GB/s). The requests go between the rows' FMAs,
      // not in a loop of their own before them (which, with its bounds checks, made the
      // 12-layer chain 1-3% slower at batch 1, 5-7% at batch 8); past the last row they
      // request lines nobody reads, which is harmless (a prefetch never faults).
      auto row = [&](int64_t k) {
        if constexpr (Ahead) {
          _mm_prefetch(reinterpret_cast<const char*>(wk + (k + kSweepRows) * N), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(wk + (k + kSweepRows) * N + 16), _MM_HINT_T0);
        }
        const __m512 w0 = Load16(m0, wk + k * N);
        const __m512 w1 = Load16(m1, wk + k * N + 16);
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m512 xv = _mm512_set1_ps(xk[k * M + m]);
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

// One group of g <= 8 rows.
template <bool Ahead, typename W>
void Group(int64_t g, const float* xt, int64_t K, const W* w, int64_t N, float* y, int64_t c0,
           int64_t c1) {
  switch (g) {
    case 1: return Columns<1, Ahead>(xt, K, w, N, y, c0, c1);
    case 2: return Columns<2, Ahead>(xt, K, w, N, y, c0, c1);
    case 3: return Columns<3, Ahead>(xt, K, w, N, y, c0, c1);
    case 4: return Columns<4, Ahead>(xt, K, w, N, y, c0, c1);
    case 5: return Columns<5, Ahead>(xt, K, w, N, y, c0, c1);
    case 6: return Columns<6, Ahead>(xt, K, w, N, y, c0, c1);
    case 7: return Columns<7, Ahead>(xt, K, w, N, y, c0, c1);
    default: return Columns<8, Ahead>(xt, K, w, N, y, c0, c1);
  }
}

// All M rows, in groups of at most 8 (16 accumulators + 2 weight registers). Each group's x
// is first laid out k-major, so that the inner loop finds row k's values at constant offsets
// from one pointer. Read in place, x's rows needed one address register each, which the
// compiler spilled to the stack and reloaded for every broadcast: at M = 8 the kernel then ran
// at a third of the FMA peak on data in cache, and its arithmetic no longer hid under the
// stream of w.
template <typename W>
void AllRows(const float* x, int64_t ldx, int64_t M, int64_t K, const W* w, int64_t N,
             float* y, int64_t c0, int64_t c1, bool ahead) {
  thread_local std::vector<float> xt;
  for (int64_t m0 = 0; m0 < M; m0 += 8) {
    const int64_t g = std::min<int64_t>(8, M - m0);
    const float* xm = x + m0 * ldx;
    if (g > 1) {
      xt.resize(K * g);
      for (int64_t m = 0; m < g; ++m)
        for (int64_t k = 0; k < K; ++k) xt[k * g + m] = xm[m * ldx + k];
      xm = xt.data();
    }
    float* ym = y + m0 * N;
    if (ahead)
      Group<true>(g, xm, K, w, N, ym, c0, c1);
    else
      Group<false>(g, xm, K, w, N, ym, c0, c1);
  }
}

// A parallel loop: fn(p) for p in [0, parts). Whoever runs `Work` takes the next part not yet
// taken, so the calling thread alone finishes the job if no helper comes: it never waits on a
// part nobody has started.
struct Job {
  std::function<void(int64_t)> fn;
  int64_t parts;
  std::atomic<int64_t> next{0}, done{0};

  void Work() {
    for (int64_t p; (p = next.fetch_add(1, std::memory_order_relaxed)) < parts;) {
      fn(p);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// Helper threads that wait for jobs by spinning for a millisecond before they sleep. A decode
// step calls these kernels every 0.1-1 ms, and each call lasts about as long as waking a
// sleeping thread does (XLA's pool threads sleep between ops): with the pool, the caller often
// did the whole job alone. Created once, never destroyed (no join at process exit).
class Helpers {
 public:
  static Helpers& Get(int64_t threads) {
    static Helpers* helpers = new Helpers(threads);
    return *helpers;
  }
  void Offer(std::shared_ptr<Job> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = std::move(job);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
  }

 private:
  explicit Helpers(int64_t threads) {
    for (int64_t i = 0; i < threads; ++i) std::thread([this] { Loop(); }).detach();
  }
  void Loop() {
    uint64_t seen = 0;
    for (;;) {
      const auto start = std::chrono::steady_clock::now();
      for (int64_t spins = 0; gen_.load(std::memory_order_acquire) == seen; ++spins) {
        _mm_pause();
        if (spins % 256 == 0 &&
            std::chrono::steady_clock::now() - start > std::chrono::milliseconds(1)) {
          std::unique_lock<std::mutex> lock(mu_);
          cv_.wait(lock, [&] { return gen_.load(std::memory_order_relaxed) != seen; });
          break;
        }
      }
      std::shared_ptr<Job> job;
      {
        std::lock_guard<std::mutex> lock(mu_);
        job = job_;
        seen = gen_.load(std::memory_order_relaxed);
      }
      if (job) job->Work();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::shared_ptr<Job> job_;
};

// As many threads as XLA's intra-op pool has: the caller and threads - 1 helpers.
int64_t Threads(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

void ParallelFor(int64_t threads, int64_t parts, std::function<void(int64_t)> fn) {
  auto job = std::make_shared<Job>();
  job->fn = std::move(fn);
  job->parts = parts;
  if (parts > 1) Helpers::Get(std::max<int64_t>(1, threads - 1)).Offer(job);
  job->Work();
  while (job->done.load(std::memory_order_acquire) < parts) _mm_pause();
}

// --- 2. attention
//
// For each of N = kv heads x batch rows: R query rows q[n] [R, D], the cache k[n] and v[n]
// [S, D] (the layout of owl_jax.decoder.llama.init_cache), a mask [R, S]. As the XLA path:
// scores divided by sqrt(D), masked to the float minimum, an fp32 softmax, then p @ v.
// Slots past the last unmasked one get exactly zero weight, so they are not read: a decode step
// reads the written part of the cache only.

// exp on 16 lanes: 2^n exp(r) with n = round(x / ln 2), |r| <= ln(2) / 2, and a degree-7 Taylor
// polynomial for exp(r) (truncation error < 1e-8, below fp32's half ulp). Inputs below -104
// give 0, as exp does in fp32.
inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.f)), _mm512_set1_ps(88.7f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);  // ln 2 in two parts
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

inline float Dot(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = TailMask(n - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// o[d0:d0 + 16C] = sum_j p[j] v[j, d0:d0 + 16C] (v rows of stride D, clipped at D): one pass
// down the slots, the output in C registers.
template <int C>
void WeightedRows(const float* p, const float* v, int64_t len, int64_t D, int64_t d0, float* o) {
  __m512 acc[C];
  __mmask16 m[C];
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) {
    acc[c] = _mm512_setzero_ps();
    m[c] = TailMask(D - d0 - 16 * c);
  }
  for (int64_t j = 0; j < len; ++j) {
    for (int64_t b = 0; b < C * 64; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(v + (j + 8) * D + d0) + b, _MM_HINT_T0);
    const __m512 pj = _mm512_set1_ps(p[j]);
    const float* vj = v + j * D + d0;
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c)
      acc[c] = _mm512_fmadd_ps(pj, _mm512_maskz_loadu_ps(m[c], vj + 16 * c), acc[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(o + d0 + 16 * c, m[c], acc[c]);
}

void AttendOne(const float* q, const float* k, const float* v, const bool* mask, float* o,
               int64_t R, int64_t S, int64_t D, float* s) {
  const float lowest = std::numeric_limits<float>::lowest();
  const float root = std::sqrt(float(D));
  for (int64_t r = 0; r < R; ++r) {
    const float* qr = q + r * D;
    const bool* mr = mask + r * S;
    int64_t len = S;
    while (len > 0 && !mr[len - 1]) --len;
    if (len == 0) len = S;  // nothing unmasked: every slot equal, as the XLA path
    float top = lowest;
    for (int64_t j = 0; j < len; ++j) {
      // The loads below wait on memory unless the rows ahead are requested early.
      for (int64_t b = 0; b < D * 4; b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(k + (j + 8) * D) + b, _MM_HINT_T0);
      s[j] = mr[j] ? Dot(qr, k + j * D, D) / root : lowest;
      top = std::max(top, s[j]);
    }
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 m = TailMask(len - j);
      const __m512 e = Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + j), _mm512_set1_ps(top)));
      _mm512_mask_storeu_ps(s + j, m, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    const float total = _mm512_reduce_add_ps(sum);
    for (int64_t j = 0; j < len; ++j) s[j] /= total;
    for (int64_t d0 = 0; d0 < D; d0 += 128) {
      switch (std::min<int64_t>(8, (D - d0 + 15) / 16)) {
        case 1: WeightedRows<1>(s, v, len, D, d0, o + r * D); break;
        case 2: WeightedRows<2>(s, v, len, D, d0, o + r * D); break;
        case 3: WeightedRows<3>(s, v, len, D, d0, o + r * D); break;
        case 4: WeightedRows<4>(s, v, len, D, d0, o + r * D); break;
        case 5: WeightedRows<5>(s, v, len, D, d0, o + r * D); break;
        case 6: WeightedRows<6>(s, v, len, D, d0, o + r * D); break;
        case 7: WeightedRows<7>(s, v, len, D, d0, o + r * D); break;
        default: WeightedRows<8>(s, v, len, D, d0, o + r * D); break;
      }
    }
  }
}

}  // namespace

namespace {

template <typename W>
ffi::Error SmallMMatmul(ffi::ThreadPool& pool, const float* xp, int64_t x_count, const W* wp,
                        ffi::Span<const int64_t> wd, float* yp) {
  if (wd.size() != 2) return ffi::Error::InvalidArgument("small_m_matmul: w must be 2-D");
  const int64_t K = wd[0], N = wd[1];
  const int64_t M = K ? x_count / K : 0;
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t threads = Threads(pool);
  if (N < kRowSplitBelowN && K >= 64 * threads) {
    // Short output rows: the threads take row ranges of w (each over all N columns) into
    // partial outputs that are summed at the end. Split by columns, a thread's sweeps would
    // be too short for the prefetchers to get ahead (M = 8 on 768x768: 9-10 against 11-12
    // GB/s in an interleaved A/B).
    const int64_t parts = threads;
    std::vector<float> partial((parts - 1) * M * N);
    float* pp = partial.data();
    ParallelFor(threads, parts, [=](int64_t p) {
      const int64_t k0 = (K * p / parts) & ~int64_t{15};
      const int64_t k1 = p + 1 == parts ? K : (K * (p + 1) / parts) & ~int64_t{15};
      AllRows(xp + k0, K, M, k1 - k0, wp + k0 * N, N, p == 0 ? yp : pp + (p - 1) * M * N, 0, N,
              true);
    });
    for (int64_t p = 1; p < parts; ++p)
      for (int64_t i = 0; i < M * N; ++i) yp[i] += pp[(p - 1) * M * N + i];
    return ffi::Error::Success();
  }
  const int64_t parts = std::clamp<int64_t>(N / 64, 1, threads);
  ParallelFor(threads, parts, [=](int64_t p) {
    // Column ranges cut at multiples of 16 keep the parts' stores off each other's cache lines.
    const int64_t c0 = (N * p / parts) & ~int64_t{15};
    const int64_t c1 = p + 1 == parts ? N : (N * (p + 1) / parts) & ~int64_t{15};
    AllRows(xp, K, M, K, wp, N, yp, c0, c1, false);
  });
  return ffi::Error::Success();
}

}  // namespace

// The matmul handler for weights of type T (F32, or BF16 / S8 for the greedy screen's copy).
template <ffi::DataType T>
static ffi::Error SmallMMatmulOf(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                                 ffi::Buffer<T> w, ffi::ResultBuffer<ffi::F32> y) {
  return SmallMMatmul(pool, x.typed_data(), x.element_count(), w.typed_data(), w.dimensions(),
                      y->typed_data());
}

template <ffi::DataType T>
static auto SmallMMatmulBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(owl_small_m_matmul, SmallMMatmulOf<ffi::F32>,
                              SmallMMatmulBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(owl_small_m_matmul_bf16w, SmallMMatmulOf<ffi::BF16>,
                              SmallMMatmulBinding<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(owl_small_m_matmul_s8w, SmallMMatmulOf<ffi::S8>,
                              SmallMMatmulBinding<ffi::S8>());

// --- 4. int8 matmul for the int8 draft model (owl_jax/generate/cpu/self_draft.py)
//
// y[m, n] ~ x[m] @ (w[:, n] * scale[n]) with w int8 [K, N] row-major and x quantized per row to
// int8 (sx = max |x| / 127, xq = round(x / sx)): y = sx * scale[n] * sum_k xq[k] w[k, n], the
// sum in int32 with VNNI (vpdpbusd: 4 products of an unsigned and a signed byte per lane).
// Widening int8 weights to floats (owl_small_m_matmul_s8w) costs two conversions per 16
// weights and ran at 12 GB/s, below the memory's speed; this reads w at the memory's speed.
// vpdpbusd wants 4 consecutive k of one column in each 32-bit lane: two rounds of byte and
// word unpacks make them from 4 rows of 64 columns, with the columns in the order
// Lane(q, i) below; the sums are put back in column order at the end. The weights are the
// unsigned operand: w + 128 (a sign-bit flip), so the sum is off by 128 * sum_k xq[k], one
// number per row. Integer sums do not depend on their order, so threads may split K.
inline int64_t Lane(int64_t q, int64_t i) { return 16 * (i / 4) + 4 * q + i % 4; }

// acc[n - c0] (int32, lanes in Lane order per 64 columns) += xq[k0:k1] @ w[k0:k1, c0:c1], k0 and
// k1 multiples of 4 except k1 = K.
void Int8Columns(const int8_t* xq, const int8_t* w, int64_t K, int64_t N, int64_t k0, int64_t k1,
                 int64_t c0, int64_t c1, int32_t* acc) {
  constexpr int64_t kSweep = 32;  // rows of w per sweep (concurrent streams, as Columns)
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t s0 = k0; s0 < k1; s0 += kSweep) {
    const int64_t s1 = std::min(k1, s0 + kSweep);
    for (int64_t c = c0; c < c1; c += 64) {
      const __mmask64 mk = c1 - c >= 64 ? ~__mmask64(0) : (__mmask64(1) << (c1 - c)) - 1;
      int32_t* a = acc + (c - c0);
      __m512i a0 = _mm512_loadu_si512(a), a1 = _mm512_loadu_si512(a + 16),
              a2 = _mm512_loadu_si512(a + 32), a3 = _mm512_loadu_si512(a + 48);
      for (int64_t k = s0; k < s1; k += 4) {
        // Each row also requests its line a sweep ahead: a draft step 9.2 -> 7.7 ms (the 768-wide
        // layers' 768-byte rows are too short streams for the hardware prefetcher). Rows past
        // K are zeros: their 128s meet xq's zero padding.
        auto row = [&](int64_t r) {
          _mm_prefetch(reinterpret_cast<const char*>(w + (r + kSweep) * N + c), _MM_HINT_T0);
          return r < K ? _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, w + r * N + c), flip)
                       : _mm512_setzero_si512();
        };
        const __m512i r0 = row(k), r1 = row(k + 1), r2 = row(k + 2), r3 = row(k + 3);
        const __m512i lo01 = _mm512_unpacklo_epi8(r0, r1), hi01 = _mm512_unpackhi_epi8(r0, r1);
        const __m512i lo23 = _mm512_unpacklo_epi8(r2, r3), hi23 = _mm512_unpackhi_epi8(r2, r3);
        int32_t quad;
        std::memcpy(&quad, xq + k, 4);
        const __m512i xv = _mm512_set1_epi32(quad);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_unpacklo_epi16(lo01, lo23), xv);
        a1 = _mm512_dpbusd_epi32(a1, _mm512_unpackhi_epi16(lo01, lo23), xv);
        a2 = _mm512_dpbusd_epi32(a2, _mm512_unpacklo_epi16(hi01, hi23), xv);
        a3 = _mm512_dpbusd_epi32(a3, _mm512_unpackhi_epi16(hi01, hi23), xv);
      }
      _mm512_storeu_si512(a, a0);
      _mm512_storeu_si512(a + 16, a1);
      _mm512_storeu_si512(a + 32, a2);
      _mm512_storeu_si512(a + 48, a3);
    }
  }
}

using S8x2 = ffi::Buffer<ffi::S8, 2>;  // aliases: a comma inside the handler macro breaks it
using F32x1 = ffi::Buffer<ffi::F32, 1>;

static ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, S8x2 w, F32x1 scale,
                             ffi::ResultBuffer<ffi::F32> y) {
  const int64_t K = w.dimensions()[0], N = w.dimensions()[1];
  const int64_t M = K ? x.element_count() / K : 0;
  if (scale.dimensions()[0] != N)
    return ffi::Error::InvalidArgument("int8_matmul: scale must have w's column count");
  if (K > 66000)  // 255 * 127 * K must fit an int32 lane
    return ffi::Error::InvalidArgument("int8_matmul: K above 66000 could overflow the sums");
  if (M == 0 || N == 0) return ffi::Error::Success();
  const int64_t threads = Threads(pool);
  const int64_t Kp = (K + 3) & ~int64_t{3}, Np = (N + 63) & ~int64_t{63};
  // narrow w: threads split K (each its own sums, added at the end); wide w: the columns
  const int64_t parts = std::clamp<int64_t>(N < kRowSplitBelowN ? Kp / 64 : Np / 64, 1, threads);
  std::vector<int8_t> xq(Kp);
  std::vector<int32_t> acc(parts * Np);
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x.typed_data() + m * K;
    float top = 0;
    for (int64_t k = 0; k < K; ++k) top = std::max(top, std::abs(xm[k]));
    const float sx = top > 0 ? top / 127.f : 1.f;
    int64_t xsum = 0;
    for (int64_t k = 0; k < Kp; ++k) {
      xq[k] = k < K ? static_cast<int8_t>(std::nearbyint(xm[k] / sx)) : 0;
      xsum += xq[k];
    }
    std::fill(acc.begin(), acc.end(), 0);
    const int8_t* xp = xq.data();
    const int8_t* wp = w.typed_data();
    int32_t* ap = acc.data();
    ParallelFor(threads, parts, [=](int64_t p) {
      if (N < kRowSplitBelowN) {
        const int64_t k0 = (Kp * p / parts) & ~int64_t{3};
        const int64_t k1 = p + 1 == parts ? K : (Kp * (p + 1) / parts) & ~int64_t{3};
        Int8Columns(xp, wp, K, N, k0, k1, 0, N, ap + p * Np);
      } else {
        const int64_t c0 = (Np * p / parts) & ~int64_t{63};
        const int64_t c1 = p + 1 == parts ? N : (Np * (p + 1) / parts) & ~int64_t{63};
        Int8Columns(xp, wp, K, N, 0, K, c0, c1, ap + c0);
      }
    });
    if (N < kRowSplitBelowN)
      for (int64_t p = 1; p < parts; ++p)
        for (int64_t i = 0; i < Np; ++i) acc[i] += acc[p * Np + i];
    float* ym = y->typed_data() + m * N;
    const float* sp = scale.typed_data();
    for (int64_t c = 0; c < N; c += 64)
      for (int64_t q = 0; q < 4; ++q)
        for (int64_t i = 0; i < 16; ++i) {
          const int64_t n = c + Lane(q, i);
          if (n < N)
            ym[n] = static_cast<float>(int64_t{acc[c + 16 * q + i]} - 128 * xsum) * sx * sp[n];
        }
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(owl_int8_matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<S8x2>()
                                  .Arg<F32x1>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The greedy screen's check (owl_jax/generate/cpu/greedy_screen.py). For each row m: approx[m] = h[m] @ Q
// (the int8 or bf16 copy of w) and |fp32 logit_v - approx_v| <= ||h[m]|| * bound[v]. Columns
// whose upper bound reaches the largest lower bound are the candidates (the argmax is among
// them, and every other column is strictly below it); their logits are computed as the column
// path of owl_small_m_matmul sums them (one fused multiply-add per k, k ascending from zero:
// the same bits), and the first index of the largest is the token. safe[m] is false, and the
// caller computes the full logits, where more than kMaxCandidates columns qualify or anything
// is NaN. (With int8's looser bound, a limit of 16 sent 2.6% of a benchmark run's rows to the
// full fp32 head.)
constexpr int64_t kMaxCandidates = 64;

using F32x2 = ffi::Buffer<ffi::F32, 2>;
using S32x1 = ffi::Buffer<ffi::S32, 1>;
using PREDx1 = ffi::Buffer<ffi::PRED, 1>;

static ffi::Error GreedyScreen(F32x2 h, F32x2 w, F32x2 approx, F32x1 bound,
                               ffi::Result<S32x1> token, ffi::Result<PREDx1> safe) {
  const int64_t M = h.dimensions()[0], K = h.dimensions()[1], N = w.dimensions()[1];
  if (w.dimensions()[0] != K || approx.dimensions()[0] != M || approx.dimensions()[1] != N ||
      bound.dimensions()[0] != N)
    return ffi::Error::InvalidArgument("greedy_screen: shapes do not match");
  const float* wp = w.typed_data();
  const float* bp = bound.typed_data();
  for (int64_t m = 0; m < M; ++m) {
    const float* hm = h.typed_data() + m * K;
    const float* am = approx.typed_data() + m * N;
    double r2 = 0;
    for (int64_t k = 0; k < K; ++k) r2 += double(hm[k]) * hm[k];
    // |logit - approx| <= r * bound; the margin t = r * bound + |approx| * 2^-22 also covers
    // the fp32 rounding of the sums below (an ulp of |approx| at most)
    const __m512 r = _mm512_set1_ps(static_cast<float>(std::sqrt(r2) * (1 + 1e-6)));
    const __m512 rel = _mm512_set1_ps(0x1p-22f);
    auto margin = [&](__m512 a, int64_t v, __mmask16 mk) {
      return _mm512_fmadd_ps(r, _mm512_maskz_loadu_ps(mk, bp + v),
                             _mm512_mul_ps(_mm512_abs_ps(a), rel));
    };
    __m512 lo = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    __mmask16 bad = 0;
    for (int64_t v = 0; v < N; v += 16) {
      const __mmask16 mk = TailMask(N - v);
      const __m512 a = _mm512_maskz_loadu_ps(mk, am + v);
      bad |= _mm512_mask_cmp_ps_mask(mk, a, a, _CMP_UNORD_Q);
      lo = _mm512_mask_max_ps(lo, mk, lo, _mm512_sub_ps(a, margin(a, v, mk)));
    }
    const float lower = _mm512_reduce_max_ps(lo);
    int64_t cand[kMaxCandidates];
    int64_t n = 0;
    bool ok = !bad && std::isfinite(lower);
    const __m512 lower16 = _mm512_set1_ps(lower);
    for (int64_t v = 0; ok && v < N; v += 16) {
      const __mmask16 mk = TailMask(N - v);
      const __m512 a = _mm512_maskz_loadu_ps(mk, am + v);
      for (__mmask16 hit = _mm512_mask_cmp_ps_mask(mk, _mm512_add_ps(a, margin(a, v, mk)),
                                                   lower16, _CMP_GE_OQ);
           hit && ok; hit &= hit - 1) {
        if (n == kMaxCandidates) ok = false;
        else cand[n++] = v + __builtin_ctz(hit);
      }
    }
    int32_t best_v = 0;
    float best = 0;
    for (int64_t i = 0; ok && i < n; ++i) {  // candidates in ascending index order
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(hm[k], wp[k * N + cand[i]], acc);
      if (std::isnan(acc)) ok = false;
      if (i == 0 || acc > best) best = acc, best_v = static_cast<int32_t>(cand[i]);
    }
    token->typed_data()[m] = best_v;
    safe->typed_data()[m] = ok && n > 0;
  }
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(owl_greedy_screen, GreedyScreen,
                              ffi::Ffi::Bind()
                                  .Arg<F32x2>()
                                  .Arg<F32x2>()
                                  .Arg<F32x2>()
                                  .Arg<F32x1>()
                                  .Ret<S32x1>()
                                  .Ret<PREDx1>());

// A copy XLA cannot fuse through: the decode step's RoPE cos / sin go through it, so that XLA
// computes them once per step instead of inside each of the 2 x layers fusions that read them
// (where a broadcast over the heads made it evaluate each cos and sin once per head).
static ffi::Error Materialize(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y) {
  std::memcpy(y->untyped_data(), x.untyped_data(), x.size_bytes());
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(owl_materialize, Materialize,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());

using F32x3 = ffi::Buffer<ffi::F32, 3>;
using PREDx3 = ffi::Buffer<ffi::PRED, 3>;

static ffi::Error CachedAttention(ffi::ThreadPool pool, F32x3 q, F32x3 k, F32x3 v, PREDx3 mask,
                                  ffi::Result<F32x3> o) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const int64_t N = qd[0], R = qd[1], D = qd[2], S = kd[1];
  const float* qp = q.typed_data();
  const float* kp = k.typed_data();
  const float* vp = v.typed_data();
  const bool* mp = mask.typed_data();
  float* op = o->typed_data();
  const int64_t threads = Threads(pool);
  // One part per head and row, taken in turn by whichever thread is free: the threads then
  // stream neighbouring heads' k and v at the same time and finish together. Halves of the
  // heads per thread were 2-8% slower (A/B, 96 heads x 64-256 slots).
  ParallelFor(threads, N, [=](int64_t n) {
    thread_local std::vector<float> scores;
    scores.resize(S);
    AttendOne(qp + n * R * D, kp + n * S * D, vp + n * S * D, mp + n * R * S, op + n * R * D, R,
              S, D, scores.data());
  });
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(owl_cached_attention, CachedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32x3>()
                                  .Arg<F32x3>()
                                  .Arg<F32x3>()
                                  .Arg<PREDx3>()
                                  .Ret<F32x3>());
