// Multi-scale deformable attention on CPU, forward and backward, both parallel over (batch, query).
//
// Per query, the corners of all M*L*P samples are located first, in one branch-free loop that the compiler
// vectorises across samples; a corner outside the map points at a row of zeros instead of branching. The blend
// then runs over the contiguous channel dimension D in SIMD vectors, with the accumulators in registers when D is
// 1, 2 or 4 vectors (D = 32 in fp32 is two AVX-512 registers). The backward adds grad_value without atomics: a
// thread writes straight into the frames it owns and into private buffers for the (at most two) frames it shares.
#include "ms_deform_attn.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <utility>
#include <tuple>
#include <vector>

namespace av2ts {
namespace {

// Per-sample constants that repeat for every query: the sample's level size and where its rows start. Samples are
// ordered (head, level, point) as in the locations tensor.
template <typename acc_t>
struct SampleTable {
  std::vector<acc_t> width_f, height_f;
  std::vector<int32_t> width, height;
  std::vector<int64_t> base;  // element offset of (level start, head) in value[n]

  SampleTable(const MsdaShape& s, const int64_t* shapes, const int64_t* starts) {
    const int64_t count = s.num_heads * s.num_levels * s.num_points;
    width_f.resize(count), height_f.resize(count), width.resize(count), height.resize(count), base.resize(count);
    for (int64_t i = 0; i < count; ++i) {
      const int64_t l = i / s.num_points % s.num_levels, m = i / s.num_points / s.num_levels;
      height[i] = static_cast<int32_t>(shapes[2 * l]), width[i] = static_cast<int32_t>(shapes[2 * l + 1]);
      height_f[i] = static_cast<acc_t>(height[i]), width_f[i] = static_cast<acc_t>(width[i]);
      base[i] = (starts[l] * s.num_heads + m) * s.head_dim;
    }
  }
};

// The four bilinear corners of a run of samples, corner-major: (y0, x0), (y0, x1), (y1, x0), (y1, x1).
template <typename acc_t>
struct Corners {
  std::vector<uintptr_t> rows[4];    // addresses of the value rows, or of the zero row when outside the map
  std::vector<acc_t> weights[4];     // bilinear weights (times the attention weight in the forward)
  std::vector<int64_t> offsets[4];   // backward only: element offsets of the rows in value[n], -1 when outside
  std::vector<acc_t> frac_x, frac_y;  // backward only: position inside the cell

  explicit Corners(int64_t count) {
    for (int c = 0; c < 4; ++c) rows[c].resize(count), weights[c].resize(count), offsets[c].resize(count);
    frac_x.resize(count), frac_y.resize(count);
  }
};

// Locate the corners of samples [begin, end) of one query; loc: the query's [M*L*P, 2] locations, attn: its
// [M*L*P] weights (forward only). Branch-free, so the compiler vectorises it across samples.
template <bool kBackward, typename scalar_t, typename acc_t>
inline void locate(const SampleTable<acc_t>& table, int64_t row_stride, const scalar_t* value, const scalar_t* zeros,
                   const acc_t* __restrict loc, const acc_t* __restrict attn, int64_t begin, int64_t end,
                   Corners<acc_t>& out) {
  const acc_t* __restrict width_f = table.width_f.data() + begin;
  const acc_t* __restrict height_f = table.height_f.data() + begin;
  const int32_t* __restrict width = table.width.data() + begin;
  const int32_t* __restrict height = table.height.data() + begin;
  const int64_t* __restrict base = table.base.data() + begin;
  loc += 2 * begin;
  uintptr_t* __restrict r0 = out.rows[0].data();
  uintptr_t* __restrict r1 = out.rows[1].data();
  uintptr_t* __restrict r2 = out.rows[2].data();
  uintptr_t* __restrict r3 = out.rows[3].data();
  acc_t* __restrict w0 = out.weights[0].data();
  acc_t* __restrict w1 = out.weights[1].data();
  acc_t* __restrict w2 = out.weights[2].data();
  acc_t* __restrict w3 = out.weights[3].data();
  int64_t* __restrict o0 = out.offsets[0].data();
  int64_t* __restrict o1 = out.offsets[1].data();
  int64_t* __restrict o2 = out.offsets[2].data();
  int64_t* __restrict o3 = out.offsets[3].data();
  acc_t* __restrict fx = out.frac_x.data();
  acc_t* __restrict fy = out.frac_y.data();
  const uintptr_t value_addr = reinterpret_cast<uintptr_t>(value), zero_addr = reinterpret_cast<uintptr_t>(zeros);
  const int64_t count = end - begin;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    // Pixel coordinates (align_corners=False) with the Deformable-DETR CUDA kernel's arithmetic, which the
    // reference trains with: x = loc_x * w - 0.5 rounded once (nvcc contracts its `loc_w * spatial_w - 0.5` into
    // fma.rn.f32: the PTX of nvcc 11.8 and 13.0). std::fma pins that whatever -ffp-contract says (with two
    // roundings, 1% of the float64 coordinates of initialisation-like locations floor to another pixel, in
    // tests/test_kernels_location.py). It vectorises where the target has FMA (a libm call elsewhere: exact, slower).
    acc_t x = std::fma(loc[2 * j], width_f[j], acc_t(-0.5)), y = std::fma(loc[2 * j + 1], height_f[j], acc_t(-0.5));
    // A sample counts only where -1 < x < w and -1 < y < h (the reference's test). Elsewhere, NaN included, it
    // moves to -2 or w, where all four corners are outside: no value, no gradient. That matters at exactly -1,
    // where corner x0 + 1 = 0 has weight 0 but would get a location gradient (a border query at initialisation
    // samples there). The clamp also keeps the integer conversion defined.
    x = x > acc_t(-1) ? x : acc_t(-2), y = y > acc_t(-1) ? y : acc_t(-2);
    x = x < width_f[j] ? x : width_f[j], y = y < height_f[j] ? y : height_f[j];
    // floor through truncation (std::floor does not vectorise without -fno-trapping-math). At an integer x the
    // floor is x itself: the sample sits on the left edge of cell [x, x + 1], and the location gradient below is
    // that cell's slope, the right-hand derivative (v[x + 1] - v[x], towards the zero padding at x = w - 1), as in
    // the reference kernel, which floors the same way.
    const int32_t x0 = static_cast<int32_t>(x) - (static_cast<acc_t>(static_cast<int32_t>(x)) > x);
    const int32_t y0 = static_cast<int32_t>(y) - (static_cast<acc_t>(static_cast<int32_t>(y)) > y);
    const acc_t x0f = static_cast<acc_t>(x0), y0f = static_cast<acc_t>(y0);
    const acc_t lx = x - x0f, ly = y - y0f, hx = 1 - lx, hy = 1 - ly;
    const int32_t w = width[j], h = height[j];
    const bool in_x0 = (x0 >= 0) & (x0 < w), in_x1 = (x0 >= -1) & (x0 + 1 < w);
    const bool in_y0 = (y0 >= 0) & (y0 < h), in_y1 = (y0 >= -1) & (y0 + 1 < h);
    const int64_t off = base[j] + static_cast<int64_t>(y0 * w + x0) * row_stride;
    const int64_t off1 = off + row_stride, off2 = off + w * row_stride, off3 = off2 + row_stride;
    const bool in0 = in_y0 & in_x0, in1 = in_y0 & in_x1, in2 = in_y1 & in_x0, in3 = in_y1 & in_x1;
    r0[j] = in0 ? value_addr + off * sizeof(scalar_t) : zero_addr;
    r1[j] = in1 ? value_addr + off1 * sizeof(scalar_t) : zero_addr;
    r2[j] = in2 ? value_addr + off2 * sizeof(scalar_t) : zero_addr;
    r3[j] = in3 ? value_addr + off3 * sizeof(scalar_t) : zero_addr;
    const acc_t a = kBackward ? acc_t(1) : attn[begin + j];
    w0[j] = hy * hx * a, w1[j] = hy * lx * a, w2[j] = ly * hx * a, w3[j] = ly * lx * a;
    if constexpr (kBackward) {
      o0[j] = in0 ? off : -1, o1[j] = in1 ? off1 : -1, o2[j] = in2 ? off2 : -1, o3[j] = in3 ? off3 : -1;
      fx[j] = lx, fy[j] = ly;
    }
  }
}

template <typename scalar_t>
inline const scalar_t* row(uintptr_t address) {
  return reinterpret_cast<const scalar_t*>(address);
}

// SIMD vectors of one 64-byte register (GCC/Clang vector extensions; the compiler splits them where the target has
// narrower registers). load() widens values to the accumulation type (bf16 by a 16-bit shift).
template <typename acc_t>
struct SimdAcc {
  typedef acc_t vec __attribute__((vector_size(64)));
  static constexpr int64_t lanes = 64 / sizeof(acc_t);
  static vec load_acc(const acc_t* p) {
    vec v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(acc_t* p, const vec& v) { std::memcpy(p, &v, sizeof(v)); }
  // {sum of a, sum of b, sum of c, sum of d}
  static void reduce4(const vec& a, const vec& b, const vec& c, const vec& d, acc_t out[4]) {
#if defined(__AVX512F__)
    if constexpr (sizeof(acc_t) == 4) {
      const auto half = [](const vec& v) {
        const __m512 x = reinterpret_cast<const __m512&>(v);
        return _mm256_add_ps(_mm512_castps512_ps256(x), _mm512_extractf32x8_ps(x, 1));
      };
      const __m256 ab = _mm256_hadd_ps(half(a), half(b)), cd = _mm256_hadd_ps(half(c), half(d));
      const __m256 abcd = _mm256_hadd_ps(ab, cd);  // per 128-bit lane: partial sums of a, b, c, d
      _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1)));
      return;
    }
#endif
    out[0] = reduce(a), out[1] = reduce(b), out[2] = reduce(c), out[3] = reduce(d);
  }
  static acc_t reduce(const vec& v) {
#if defined(__AVX512F__)
    if constexpr (sizeof(acc_t) == 4) {
      return _mm512_reduce_add_ps(reinterpret_cast<const __m512&>(v));
    } else {
      return _mm512_reduce_add_pd(reinterpret_cast<const __m512d&>(v));
    }
#else
    acc_t sum = 0;
    for (int64_t j = 0; j < lanes; ++j) sum += v[j];
    return sum;
#endif
  }
};

template <typename scalar_t>
struct Simd;

template <>
struct Simd<float> : SimdAcc<float> {
  static vec load(const float* p) { return load_acc(p); }
};

template <>
struct Simd<double> : SimdAcc<double> {
  static vec load(const double* p) { return load_acc(p); }
};

template <>
struct Simd<c10::BFloat16> : SimdAcc<float> {
  typedef uint16_t half_bits __attribute__((vector_size(32)));
  typedef uint32_t bits __attribute__((vector_size(64)));
  static vec load(const c10::BFloat16* p) {
    half_bits h;
    std::memcpy(&h, p, sizeof(h));
    const bits widened = __builtin_convertvector(h, bits) << 16;
    vec v;
    std::memcpy(&v, &widened, sizeof(v));
    return v;
  }
  using SimdAcc<float>::store;
  // Narrowed to bf16 in vectors, as static_cast<c10::BFloat16> rounds (to nearest, ties to even; NaN -> 0x7FC0),
  // so the result is bit for bit the scalar one: the scalar conversion per lane made the bf16 forward slower than
  // fp32's (3.4 vs 2.0 ms for av2ts-r50's encoder layer at 224 px, T = 5).
  static void store(c10::BFloat16* p, const vec& v) {
    typedef int32_t mask __attribute__((vector_size(64)));
    bits u;
    std::memcpy(&u, &v, sizeof(u));
    const bits rounded = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16;
    const bits nan = reinterpret_cast<const bits&>(static_cast<const mask&>(v != v));
    const half_bits h = __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0), half_bits);
    std::memcpy(p, &h, sizeof(h));
  }
};

template <int kVectors, typename scalar_t, typename acc_t>
inline void blend_fixed(const Corners<acc_t>& c, int64_t begin, int64_t end, scalar_t* out) {
  using V = Simd<scalar_t>;
  // one accumulator per corner and vector: every multiply-add is independent of the others in the same sample
  typename V::vec acc[4][kVectors] = {};
  for (int64_t s = begin; s < end; ++s) {
    for (int corner = 0; corner < 4; ++corner) {
      const scalar_t* r = row<scalar_t>(c.rows[corner][s]);
      const acc_t w = c.weights[corner][s];
      for (int k = 0; k < kVectors; ++k) acc[corner][k] += w * V::load(r + k * V::lanes);
    }
  }
  for (int k = 0; k < kVectors; ++k) {
    V::store(out + k * V::lanes, (acc[0][k] + acc[1][k]) + (acc[2][k] + acc[3][k]));
  }
}

// The same for any D: one vector of channels at a time, then a scalar loop for the channels left over.
template <typename scalar_t, typename acc_t>
inline void blend_any(const Corners<acc_t>& c, int64_t begin, int64_t end, int64_t dim, scalar_t* out) {
  using V = Simd<scalar_t>;
  int64_t d = 0;
  for (; d + V::lanes <= dim; d += V::lanes) {
    typename V::vec acc = {};
    for (int64_t s = begin; s < end; ++s) {
      acc += (c.weights[0][s] * V::load(row<scalar_t>(c.rows[0][s]) + d) +
              c.weights[1][s] * V::load(row<scalar_t>(c.rows[1][s]) + d)) +
             (c.weights[2][s] * V::load(row<scalar_t>(c.rows[2][s]) + d) +
              c.weights[3][s] * V::load(row<scalar_t>(c.rows[3][s]) + d));
    }
    V::store(out + d, acc);
  }
  for (; d < dim; ++d) {
    acc_t acc = 0;
    for (int64_t s = begin; s < end; ++s) {
      for (int corner = 0; corner < 4; ++corner) {
        acc += c.weights[corner][s] * static_cast<acc_t>(row<scalar_t>(c.rows[corner][s])[d]);
      }
    }
    out[d] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t, typename acc_t>
inline void blend(const Corners<acc_t>& c, int64_t begin, int64_t end, int64_t dim, scalar_t* out) {
  constexpr int64_t lanes = Simd<scalar_t>::lanes;
  if (dim == lanes) return blend_fixed<1>(c, begin, end, out);
  if (dim == 2 * lanes) return blend_fixed<2>(c, begin, end, out);
  if (dim == 4 * lanes) return blend_fixed<4>(c, begin, end, out);
  blend_any(c, begin, end, dim, out);
}

template <typename scalar_t, typename acc_t>
void forward(const MsdaShape& s, const int64_t* shapes, const int64_t* starts, const scalar_t* value,
             const acc_t* loc, const acc_t* attn, scalar_t* out) {
  const SampleTable<acc_t> table(s, shapes, starts);
  const int64_t dim = s.head_dim, row_stride = s.num_heads * dim;
  const int64_t per_head = s.num_levels * s.num_points, samples = s.num_heads * per_head;
  at::parallel_for(0, s.batch * s.num_queries, 16, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(dim, scalar_t(0));
    Corners<acc_t> corners(samples);
    for (int64_t nq = begin; nq < end; ++nq) {
      const scalar_t* value_n = value + (nq / s.num_queries) * s.num_values * row_stride;
      locate<false>(table, row_stride, value_n, zeros.data(), loc + nq * samples * 2, attn + nq * samples, 0,
                    samples, corners);
      for (int64_t m = 0; m < s.num_heads; ++m) {
        blend(corners, m * per_head, (m + 1) * per_head, dim, out + nq * row_stride + m * dim);
      }
    }
  });
}

// Backward of one sample: g[c] = grad_out . corner row c, and grad_value rows += a * weight_c * grad_out.
// go: grad_out of the sample's (query, head) in the accumulation type. kVectors > 0: D = kVectors SIMD vectors.
template <int kVectors, typename scalar_t, typename acc_t>
inline void sample_backward(const Corners<acc_t>& c, int64_t t, acc_t a, const acc_t* go, int64_t dim,
                            acc_t* grad_value_n, acc_t g[4]) {
  using V = Simd<scalar_t>;
  if constexpr (kVectors > 0) {
    typename V::vec go_vec[kVectors], dot[4];
    for (int k = 0; k < kVectors; ++k) go_vec[k] = V::load_acc(go + k * V::lanes);
    for (int corner = 0; corner < 4; ++corner) {
      const scalar_t* r = row<scalar_t>(c.rows[corner][t]);
      dot[corner] = go_vec[0] * V::load(r);
      for (int k = 1; k < kVectors; ++k) dot[corner] += go_vec[k] * V::load(r + k * V::lanes);
    }
    V::reduce4(dot[0], dot[1], dot[2], dot[3], g);
    for (int corner = 0; corner < 4; ++corner) {
      const int64_t offset = c.offsets[corner][t];  // -1: outside the map, no value and no gradient
      if (offset < 0) continue;
      acc_t* gv = grad_value_n + offset;
      const acc_t w = a * c.weights[corner][t];
      for (int k = 0; k < kVectors; ++k) {
        V::store(gv + k * V::lanes, V::load_acc(gv + k * V::lanes) + w * go_vec[k]);
      }
    }
  } else {
    for (int corner = 0; corner < 4; ++corner) {
      const scalar_t* r = row<scalar_t>(c.rows[corner][t]);
      acc_t dot = 0;
      for (int64_t d = 0; d < dim; ++d) dot += go[d] * static_cast<acc_t>(r[d]);
      g[corner] = dot;
      const int64_t offset = c.offsets[corner][t];
      if (offset < 0) continue;
      acc_t* gv = grad_value_n + offset;
      const acc_t w = a * c.weights[corner][t];
      for (int64_t d = 0; d < dim; ++d) gv[d] += w * go[d];
    }
  }
}

// Parallel over (batch, query) like the forward, so every read and write but grad_value's is contiguous. A thread
// adds grad_value straight into the frames whose queries are all in its range; a frame it shares with another
// thread goes to a private buffer, summed in afterwards (at most two per thread), so no atomics.
template <int kVectors, typename scalar_t, typename acc_t>
void backward(const MsdaShape& s, const int64_t* shapes, const int64_t* starts, const scalar_t* value,
              const acc_t* loc, const acc_t* attn, const scalar_t* grad_out, acc_t* grad_value, acc_t* grad_loc,
              acc_t* grad_attn) {
  const SampleTable<acc_t> table(s, shapes, starts);
  const int64_t dim = s.head_dim, row_stride = s.num_heads * dim, frame = s.num_values * row_stride;
  const int64_t per_head = s.num_levels * s.num_points, samples = s.num_heads * per_head;
  std::mutex mutex;
  std::vector<std::pair<int64_t, std::vector<acc_t>>> shared_frames;  // (n, partial grad_value[n])
  at::parallel_for(0, s.batch * s.num_queries, 16, [&](int64_t begin, int64_t end) {
    const std::vector<scalar_t> zeros(dim, scalar_t(0));
    Corners<acc_t> corners(samples);
    std::vector<acc_t> go(row_stride);
    std::vector<std::pair<int64_t, std::vector<acc_t>>> partial;
    int64_t frame_n = -1;
    acc_t* target = nullptr;
    for (int64_t nq = begin; nq < end; ++nq) {
      const int64_t n = nq / s.num_queries;
      if (n != frame_n) {
        frame_n = n;
        if (begin <= n * s.num_queries && end >= (n + 1) * s.num_queries) {
          target = grad_value + n * frame;
          std::fill(target, target + frame, acc_t(0));
        } else {
          partial.emplace_back(n, std::vector<acc_t>(frame, acc_t(0)));
          target = partial.back().second.data();
        }
      }
      locate<true, scalar_t, acc_t>(table, row_stride, value + n * frame, zeros.data(), loc + nq * samples * 2,
                                    nullptr, 0, samples, corners);
      const scalar_t* go_row = grad_out + nq * row_stride;
      for (int64_t d = 0; d < row_stride; ++d) go[d] = static_cast<acc_t>(go_row[d]);
      const acc_t* attn_q = attn + nq * samples;
      acc_t* grad_attn_q = grad_attn + nq * samples;
      acc_t* grad_loc_q = grad_loc + nq * samples * 2;
      for (int64_t t = 0; t < samples; ++t) {
        const acc_t a = attn_q[t];
        acc_t g[4];
        sample_backward<kVectors, scalar_t>(corners, t, a, go.data() + t / per_head * dim, dim, target, g);
        const acc_t lx = corners.frac_x[t], ly = corners.frac_y[t], hx = 1 - lx, hy = 1 - ly;
        grad_attn_q[t] = corners.weights[0][t] * g[0] + corners.weights[1][t] * g[1] +
                         corners.weights[2][t] * g[2] + corners.weights[3][t] * g[3];
        // x = loc_x * w - 0.5, so d/dloc_x = w * d/dx (and likewise for y); the slope of the cell right of x0,
        // so at an integer x the right-hand derivative (see locate)
        grad_loc_q[2 * t] = a * table.width_f[t] * (hy * (g[1] - g[0]) + ly * (g[3] - g[2]));
        grad_loc_q[2 * t + 1] = a * table.height_f[t] * (hx * (g[2] - g[0]) + lx * (g[3] - g[1]));
      }
    }
    if (!partial.empty()) {
      const std::lock_guard<std::mutex> lock(mutex);
      for (auto& entry : partial) shared_frames.push_back(std::move(entry));
    }
  });
  if (shared_frames.empty()) return;
  // grad_value of a shared frame = the sum of its partial buffers (one parallel region for all of them)
  std::sort(shared_frames.begin(), shared_frames.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<int64_t> frames;  // distinct shared frames
  for (const auto& entry : shared_frames) {
    if (frames.empty() || frames.back() != entry.first) frames.push_back(entry.first);
  }
  at::parallel_for(0, static_cast<int64_t>(frames.size()) * frame, 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end;) {  // k: (shared frame f, element i of the frame)
      const int64_t f = k / frame, i_begin = k - f * frame, i_end = std::min(end, (f + 1) * frame) - f * frame;
      acc_t* out = grad_value + frames[f] * frame;
      bool first = true;
      for (const auto& [n, partial] : shared_frames) {
        if (n != frames[f]) continue;
        for (int64_t i = i_begin; i < i_end; ++i) out[i] = first ? partial[i] : out[i] + partial[i];
        first = false;
      }
      k += i_end - i_begin;
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_typed(const MsdaShape& s, const int64_t* shapes, const int64_t* starts, const void* value,
                   const void* loc, const void* attn, void* out) {
  auto args = std::make_tuple(s, shapes, starts, static_cast<const scalar_t*>(value), static_cast<const acc_t*>(loc),
                              static_cast<const acc_t*>(attn), static_cast<scalar_t*>(out));
  std::apply(forward<scalar_t, acc_t>, args);
}

template <typename scalar_t, typename acc_t>
void backward_typed(const MsdaShape& s, const int64_t* shapes, const int64_t* starts, const void* value,
                    const void* loc, const void* attn, const void* grad_out, void* grad_value, void* grad_loc,
                    void* grad_attn) {
  auto args = std::make_tuple(s, shapes, starts, static_cast<const scalar_t*>(value), static_cast<const acc_t*>(loc),
                              static_cast<const acc_t*>(attn), static_cast<const scalar_t*>(grad_out),
                              static_cast<acc_t*>(grad_value), static_cast<acc_t*>(grad_loc),
                              static_cast<acc_t*>(grad_attn));
  constexpr int64_t lanes = Simd<scalar_t>::lanes;
  if (s.head_dim == lanes) return std::apply(backward<1, scalar_t, acc_t>, args);
  if (s.head_dim == 2 * lanes) return std::apply(backward<2, scalar_t, acc_t>, args);
  if (s.head_dim == 4 * lanes) return std::apply(backward<4, scalar_t, acc_t>, args);
  std::apply(backward<0, scalar_t, acc_t>, args);
}

}  // namespace

void msda_forward_cpu(MsdaType type, const MsdaShape& shape, const int64_t* spatial_shapes, const int64_t* level_start,
                      const void* value, const void* locations, const void* weights, void* output) {
  switch (type) {
    case MsdaType::Float32:
      return forward_typed<float, float>(shape, spatial_shapes, level_start, value, locations, weights, output);
    case MsdaType::Float64:
      return forward_typed<double, double>(shape, spatial_shapes, level_start, value, locations, weights, output);
    case MsdaType::BFloat16:
      return forward_typed<c10::BFloat16, float>(shape, spatial_shapes, level_start, value, locations, weights,
                                                 output);
    default:
      TORCH_CHECK(false, "ms_deform_attn (CPU): unsupported value dtype");
  }
}

void msda_backward_cpu(MsdaType type, const MsdaShape& shape, const int64_t* spatial_shapes,
                       const int64_t* level_start, const void* value, const void* locations, const void* weights,
                       const void* grad_output, void* grad_value, void* grad_locations, void* grad_weights) {
  switch (type) {
    case MsdaType::Float32:
      return backward_typed<float, float>(shape, spatial_shapes, level_start, value, locations, weights, grad_output,
                                          grad_value, grad_locations, grad_weights);
    case MsdaType::Float64:
      return backward_typed<double, double>(shape, spatial_shapes, level_start, value, locations, weights,
                                            grad_output, grad_value, grad_locations, grad_weights);
    case MsdaType::BFloat16:
      return backward_typed<c10::BFloat16, float>(shape, spatial_shapes, level_start, value, locations, weights,
                                                  grad_output, grad_value, grad_locations, grad_weights);
    default:
      TORCH_CHECK(false, "ms_deform_attn (CPU): unsupported value dtype");
  }
}

}  // namespace av2ts
