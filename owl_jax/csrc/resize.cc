// Bicubic resize of 8-bit RGB images, bit-exact with Pillow's `Image.resize(size, BICUBIC)`.
//
// Pillow (libImaging/Resample.c) resizes in two passes through an 8-bit intermediate, usually
// horizontal first (see owl_resize_bicubic_rgbx for when Pillow 13 goes vertical first; the two
// orders round differently). Each output sample is an integer sum of input bytes times 22-bit
// fixed-point weights, rounded and clipped. Integer sums do not depend on the order of the
// terms, so this file computes the same weights (the same double arithmetic: built with
// -ffp-contract=off so that no FMA changes a rounding) and the same sums, 8 outputs per AVX2
// instruction instead of one:
// - horizontal pass: 8 output pixels of a row at once; each tap gathers the 8 input pixels
//   (4 bytes each: Pillow stores RGB as RGBX) and splits them into R, G and B lanes;
// - vertical pass: 8 consecutive bytes of the intermediate rows at once.
// The source is Pillow's own pixel buffer (RGBX rows, any row stride, so a crop is a view).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kBits = 22;  // Pillow's PRECISION_BITS for 8-bit images

double Bicubic(double x) {  // Pillow's filter, a = -0.5, written as it does
  const double a = -0.5;
  if (x < 0.0) x = -x;
  if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
  if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
  return 0.0;
}

// Per output index: the first input index, the number of taps, and `ksize` fixed-point
// weights (zero past the taps). Pillow's precompute_coeffs + normalize_coeffs_8bpc.
struct Taps {
  int ksize = 0;
  std::vector<int> first, count;
  std::vector<int32_t> weight;  // [out][ksize]
};

Taps MakeTaps(int in_size, int out_size) {
  Taps t;
  const double scale = static_cast<double>(in_size) / out_size;
  const double filterscale = std::max(scale, 1.0);
  const double support = 2.0 * filterscale;
  t.ksize = static_cast<int>(std::ceil(support)) * 2 + 1;
  t.first.resize(out_size);
  t.count.resize(out_size);
  t.weight.assign(static_cast<size_t>(out_size) * t.ksize, 0);
  std::vector<double> k(t.ksize);
  for (int xx = 0; xx < out_size; ++xx) {
    const double center = (xx + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int xmin = static_cast<int>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int xmax = static_cast<int>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int x = 0; x < xmax; ++x) {
      k[x] = Bicubic((x + xmin - center + 0.5) * ss);
      ww += k[x];
    }
    for (int x = 0; x < xmax; ++x) {
      if (ww != 0.0) k[x] /= ww;
      const double f = k[x] * (1 << kBits);
      t.weight[static_cast<size_t>(xx) * t.ksize + x] =
          static_cast<int32_t>(k[x] < 0 ? -0.5 + f : 0.5 + f);
    }
    t.first[xx] = xmin;
    t.count[xx] = xmax;
  }
  return t;
}

// Per-thread scratch that only grows: no allocation, zeroing or page faults per image.
template <typename T>
T* Scratch(std::vector<T>& v, size_t n) {
  if (v.size() < n) v.resize(n);
  return v.data();
}

inline __m256i Clip8(__m256i acc) {  // Pillow's clip8: acc >> 22, clamped to 0..255
  acc = _mm256_srai_epi32(acc, kBits);
  return _mm256_min_epi32(_mm256_max_epi32(acc, _mm256_setzero_si256()),
                          _mm256_set1_epi32(255));
}

// rows x out_w RGBX pixels (X = 0) of `tmp` from rows of `src` (RGBX, `stride` bytes apart).
void Horizontal(const uint8_t* src, int64_t stride, int in_w, int rows, const Taps& t,
                int out_w, uint32_t* tmp) {
  const int blocks = (out_w + 7) / 8;
  // Per 8-pixel block and tap: the 8 input pixel indices (clamped in range; the weight of a
  // tap past an output's count is 0) and weights.
  thread_local std::vector<int32_t> index_buf, weight_buf;
  const size_t n = static_cast<size_t>(blocks) * t.ksize * 8;
  int32_t* index = Scratch(index_buf, n);
  int32_t* weight = Scratch(weight_buf, n);
  std::fill(index, index + n, 0);
  std::fill(weight, weight + n, 0);
  for (int b = 0; b < blocks; ++b)
    for (int k = 0; k < t.ksize; ++k)
      for (int j = 0; j < 8; ++j) {
        const int xx = b * 8 + j;
        const size_t at = (static_cast<size_t>(b) * t.ksize + k) * 8 + j;
        if (xx >= out_w) continue;
        index[at] = std::min(t.first[xx] + k, in_w - 1);
        weight[at] = t.weight[static_cast<size_t>(xx) * t.ksize + k];
      }
  const __m256i half = _mm256_set1_epi32(1 << (kBits - 1));
  const __m256i byte = _mm256_set1_epi32(0xff);
  for (int y = 0; y < rows; ++y) {
    const int* row = reinterpret_cast<const int*>(src + y * stride);
    uint32_t* out = tmp + static_cast<size_t>(y) * out_w;
    for (int b = 0; b < blocks; ++b) {
      __m256i r = half, g = half, bl = half;
      const int32_t* ib = index + static_cast<size_t>(b) * t.ksize * 8;
      const int32_t* wb = weight + static_cast<size_t>(b) * t.ksize * 8;
      for (int k = 0; k < t.ksize; ++k) {
        const __m256i px = _mm256_i32gather_epi32(
            row, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ib + k * 8)), 4);
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + k * 8));
        r = _mm256_add_epi32(r, _mm256_mullo_epi32(_mm256_and_si256(px, byte), w));
        g = _mm256_add_epi32(
            g, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(px, 8), byte), w));
        bl = _mm256_add_epi32(
            bl, _mm256_mullo_epi32(_mm256_and_si256(_mm256_srli_epi32(px, 16), byte), w));
      }
      const __m256i v = _mm256_or_si256(
          Clip8(r), _mm256_or_si256(_mm256_slli_epi32(Clip8(g), 8),
                                    _mm256_slli_epi32(Clip8(bl), 16)));
      const int n = std::min(8, out_w - b * 8);
      if (n == 8) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + b * 8), v);
      } else {
        alignas(32) uint32_t lane[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lane), v);
        std::memcpy(out + b * 8, lane, n * 4);
      }
    }
  }
}

// out_h rows of `width` RGBX pixels into `dst` (packed, width * 4 bytes a row) from RGBX rows of
// `src` (`stride` bytes apart).
void Vertical(const uint8_t* src, int64_t stride, int width, const Taps& t, int out_h,
              uint8_t* dst) {
  const int bytes = width * 4;  // a multiple of 8 or 8 + 4: at most one pixel after the vectors
  const __m256i half = _mm256_set1_epi32(1 << (kBits - 1));
  for (int yy = 0; yy < out_h; ++yy) {
    const int first = t.first[yy], count = t.count[yy];
    const int32_t* wk = t.weight.data() + static_cast<size_t>(yy) * t.ksize;
    uint8_t* out = dst + static_cast<size_t>(yy) * bytes;
    int j = 0;
    for (; j + 8 <= bytes; j += 8) {
      __m256i acc = half;
      for (int k = 0; k < count; ++k) {
        const __m128i b8 = _mm_loadl_epi64(
            reinterpret_cast<const __m128i*>(src + (first + k) * stride + j));
        acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(_mm256_cvtepu8_epi32(b8),
                                                       _mm256_set1_epi32(wk[k])));
      }
      const __m256i c = Clip8(acc);  // 8 lanes of 0..255 -> 8 bytes
      const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
      const __m128i packed = _mm_packus_epi16(_mm_packus_epi32(lo, hi), _mm_setzero_si128());
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + j), packed);
    }
    for (; j < bytes; ++j) {
      int32_t acc = 1 << (kBits - 1);
      for (int k = 0; k < count; ++k) acc += src[(first + k) * stride + j] * wk[k];
      out[j] = static_cast<uint8_t>(std::min(std::max(acc >> kBits, 0), 255));
    }
  }
}

}  // namespace

extern "C" {

// `src`: in_h rows of in_w RGBX pixels, `stride` bytes apart (Pillow's buffer of an RGB image,
// or a crop of it). `dst`: out_h x out_w x 3 bytes. Returns 0.
int owl_resize_bicubic_rgbx(const uint8_t* src, int64_t stride, int in_w, int in_h, int out_w,
                            int out_h, uint8_t* dst) {
  const bool horizontal = out_w != in_w, vertical = out_h != in_h;
  // Pillow 13 runs the vertical pass first when the height loses more than twice as many
  // pixels as the width (the two orders round differently)
  const bool horizontal_first = !(in_h - out_h > 0 && in_h - out_h > (in_w - out_w) * 2);
  Taps tv = MakeTaps(in_h, out_h);
  const Taps th = MakeTaps(in_w, out_w);
  thread_local std::vector<uint8_t> first_buf, second_buf;
  const uint8_t* cur = src;
  int64_t cur_stride = stride;
  if (horizontal_first) {
    if (horizontal) {  // only over the rows the vertical pass reads
      const int y0 = tv.first[0], y1 = tv.first[out_h - 1] + tv.count[out_h - 1];
      uint8_t* out = Scratch(first_buf, static_cast<size_t>(y1 - y0) * out_w * 4);
      Horizontal(src + y0 * stride, stride, in_w, y1 - y0, th, out_w,
                 reinterpret_cast<uint32_t*>(out));
      for (int& f : tv.first) f -= y0;
      cur = out;
      cur_stride = static_cast<int64_t>(out_w) * 4;
    }
    if (vertical) {
      uint8_t* out = Scratch(second_buf, static_cast<size_t>(out_h) * out_w * 4);
      Vertical(cur, cur_stride, out_w, tv, out_h, out);
      cur = out;
      cur_stride = static_cast<int64_t>(out_w) * 4;
    }
  } else {  // vertical is needed here
    uint8_t* out = Scratch(first_buf, static_cast<size_t>(out_h) * in_w * 4);
    Vertical(src, stride, in_w, tv, out_h, out);
    cur = out;
    cur_stride = static_cast<int64_t>(in_w) * 4;
    if (horizontal) {
      uint8_t* out = Scratch(second_buf, static_cast<size_t>(out_h) * out_w * 4);
      Horizontal(cur, cur_stride, in_w, out_h, th, out_w, reinterpret_cast<uint32_t*>(out));
      cur = out;
      cur_stride = static_cast<int64_t>(out_w) * 4;
    }
  }
  for (int y = 0; y < out_h; ++y)  // RGBX -> RGB
    for (int x = 0; x < out_w; ++x)
      std::memcpy(dst + (static_cast<size_t>(y) * out_w + x) * 3, cur + y * cur_stride + x * 4, 3);
  return 0;
}

}  // extern "C"
