// Weight-only int4 matrix-vector products for few-row steps (decode) on x86 CPUs with AVX512-VNNI.
//
// ATen's `_weight_int4pack_mm_for_cpu` unpacks nibbles to floats and streams the weights at ~23 GB/s on two
// cores of this machine. Here, as llama.cpp's Q4_0 x Q8_0, each step's activations are quantized to int8 in
// blocks of 64 columns (32 for groups of 32), one scale per block, and the 4-bit weights meet them in integer
// dot products (`vpdpbusd`: 64 unsigned-by-signed byte products per instruction) with no widening: one
// 64-byte load, two masks and two dot products per 128 weights. Per block, the int32 sums become floats
// times weight scale x activation scale; each block's minimum times the block's activation sum is added once
// per row, after the weights (16 blocks per instruction).
//
// Weight layout (effinfer/kernels/int4_layout.py packs and unpacks it): per row, chunks of 128 columns in
// 64 bytes, lane-interleaved so that 32-bit lanes alternate between the chunk's two 64-column groups (even
// lanes: columns 0-63, odd: 64-127; low nibbles the first 32 of a group, high nibbles the next 32). One
// 32-bit broadcast of two fp16 scales then gives every lane its group's scale. A row whose width is 64 past
// a multiple of 128 ends in one 64-column chunk of 32 bytes (low nibbles columns 0-31, high 32-63). Next to
// the weights, per row, a record: its block scales, then its block minimums (fp16, as GGUF's blocks keep
// them), in the order the lanes read them.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr int R = 4;                       // weight rows per tile: each activation load serves all four
constexpr int kMaxRowsPerPass = 4;         // activation rows per pass: each weight load serves all of them
constexpr int64_t kPrefetchBytes = 4096;   // how far ahead to prefetch each weight row
// Activation blocks whose largest magnitude is below this round to zeros: 127 / amax would overflow to inf.
constexpr float kTinyBlock = 1e-30f;

// Where column k (0-127) of a 128-column chunk sits: byte p of the chunk's 64 bytes, nibble n.
// Its activation goes to position 64 * n + p of the chunk's 128 activation bytes.
inline int chunk_position(int k) {
  const int q = k / 32, i = k % 32;          // 32-column quarter; quarters (0, 1) are group 0, (2, 3) group 1
  const int nibble = q % 2, parity = q / 2;  // group 0 in even lanes, group 1 in odd lanes
  return 64 * nibble + 4 * (2 * (i / 4) + parity) + i % 4;
}

// Index of block b (of `sub` columns, 0 .. 128 / sub - 1) of a 128-column chunk in the chunk's scale record:
// with sub = 32 the record holds the low-nibble pair (quarters 0, 2), then the high-nibble pair (1, 3).
inline int record_index(int b, int sub) { return sub == 64 ? b : (b % 2) * 2 + b / 2; }

struct Shape {
  int64_t K, sub;
  int64_t chunks() const { return K / 128; }
  bool tail() const { return K % 128 != 0; }
  int64_t blocks() const { return K / sub; }                  // scale records per row hold 2 * blocks values
  int64_t per_chunk() const { return 128 / sub; }             // blocks in a full chunk
};

// x [K] -> 128-column chunks of int8 in kernel order, per block (kernel order) its scale and its scale times
// the sum of its int8 values (what the block's minimum multiplies); `natural`: columns and blocks in their own
// order (the GEMM's). Returns false for inf/NaN.
template <typename T>
bool quantize_row_scalar(const T* x, const Shape& s, bool natural, int8_t* xq, float* xscale, float* xsum) {
  for (int64_t b = 0; b < s.blocks(); ++b) {
    const int64_t k0 = b * s.sub, chunk = k0 / 128;
    const bool in_tail = chunk == s.chunks();
    float amax = 0.f;
    for (int64_t k = k0; k < k0 + s.sub; ++k) {
      const float v = std::fabs(static_cast<float>(x[k]));
      if (!(v <= std::numeric_limits<float>::max())) return false;
      amax = std::max(amax, v);
    }
    const float scale = amax / 127.f, inv = amax > kTinyBlock ? 127.f / amax : 0.f;
    int32_t total = 0;
    for (int64_t k = k0; k < k0 + s.sub; ++k) {
      const int8_t v = static_cast<int8_t>(std::nearbyint(static_cast<float>(x[k]) * inv));
      const int64_t in_chunk = k - chunk * 128;
      xq[chunk * 128 + (in_tail || natural ? in_chunk : chunk_position(static_cast<int>(in_chunk)))] = v;
      total += v;
    }
    const int64_t in_chunk_block = b - chunk * s.per_chunk();
    const int64_t at = chunk * s.per_chunk() + (in_tail || natural ? in_chunk_block : record_index(in_chunk_block, s.sub));
    xscale[at] = scale;
    xsum[at] = scale * static_cast<float>(total);
  }
  return true;
}

// 16 values as fp32
template <typename T> __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 load16(const T* p) {
  alignas(64) float v[16];   // fp64 activations: converted one by one
  for (int i = 0; i < 16; ++i) v[i] = static_cast<float>(p[i]);
  return _mm512_load_ps(v);
}
template <> __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
template <> __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 load16(const c10::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
template <> __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The same as quantize_row_scalar (the same bits: both round half to even), 16 columns per instruction: blocks
// are quantized in column order, then each 128-column chunk is interleaved into kernel order.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
bool quantize_row_avx512(const T* x, const Shape& s, bool natural, int8_t* xq, float* xscale, float* xsum) {
  alignas(64) int8_t in_order[128];
  const __m512 abs_mask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  for (int64_t c = 0; c * 128 < s.K; ++c) {
    const bool in_tail = c == s.chunks();
    const int64_t cols = in_tail ? 64 : 128, blocks = cols / s.sub;
    for (int64_t b = 0; b < blocks; ++b) {
      const T* xb = x + c * 128 + b * s.sub;
      __m512 v[4], amax = _mm512_setzero_ps();
      __mmask16 bad = 0;
      for (int j = 0; j < s.sub / 16; ++j) {
        v[j] = load16(xb + 16 * j);
        bad |= _mm512_fpclass_ps_mask(v[j], 0x99);   // NaN or inf
        amax = _mm512_max_ps(amax, _mm512_and_ps(v[j], abs_mask));
      }
      if (bad) return false;
      const float top = _mm512_reduce_max_ps(amax);
      const float scale = top / 127.f, inv = top > kTinyBlock ? 127.f / top : 0.f;
      __m512i total = _mm512_setzero_si512();
      for (int j = 0; j < s.sub / 16; ++j) {
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(v[j], _mm512_set1_ps(inv)));   // nearest, ties to even
        total = _mm512_add_epi32(total, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(in_order + b * s.sub + 16 * j), _mm512_cvtsepi32_epi8(q));
      }
      const int64_t at = c * s.per_chunk() + (in_tail || natural ? b : record_index(static_cast<int>(b), static_cast<int>(s.sub)));
      xscale[at] = scale;
      xsum[at] = scale * static_cast<float>(_mm512_reduce_add_epi32(total));
    }
    int8_t* out = xq + c * 128;
    if (in_tail || natural) {
      std::memcpy(out, in_order, cols);
      continue;
    }
    // 32-bit words: low-nibble half interleaves quarters 0 and 2, high-nibble half quarters 1 and 3
    const __m512i first = _mm512_load_si512(in_order), second = _mm512_load_si512(in_order + 64);
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(8));
    _mm512_storeu_si512(out, _mm512_permutex2var_epi32(first, lo_idx, second));
    _mm512_storeu_si512(out + 64, _mm512_permutex2var_epi32(first, hi_idx, second));
  }
  return true;
}

template <typename T>
void quantize_row(const T* x, const Shape& s, bool avx512, int8_t* xq, float* xscale, float* xsum, bool natural = false) {
  const bool finite = avx512 ? quantize_row_avx512(x, s, natural, xq, xscale, xsum)
                             : quantize_row_scalar(x, s, natural, xq, xscale, xsum);
  if (!finite) {   // inf/NaN in: NaN out, as from a float matmul
    std::fill(xq, xq + s.K, 0);
    std::fill(xscale, xscale + s.blocks(), std::numeric_limits<float>::quiet_NaN());
    std::fill(xsum, xsum + s.blocks(), std::numeric_limits<float>::quiet_NaN());
  }
}

// Every lane pair gets (p[0], p[1]) as fp32: the scales of a chunk's two lane groups.
__attribute__((target("avx512f,f16c"))) inline __m512 pair(const c10::Half* p) {
  int32_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return _mm512_cvtph_ps(_mm256_set1_epi32(bits));
}

// Sum over a row's blocks of minimum x (activation scale x sum of the block's int8 activations).
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) inline float minimum_terms(const c10::Half* mins, const float* xsum, int64_t blocks) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < blocks; j += 16) {
    const __mmask16 valid = blocks - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (blocks - j)) - 1);
    const __m512 mn = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(valid, mins + j));
    acc = _mm512_fmadd_ps(mn, _mm512_maskz_loadu_ps(valid, xsum + j), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

// out[m * R + r] = dot(weight row r, activation row m) for R weight rows and MB activation rows.
// w: R rows of K / 2 bytes; records: R rows of the row's block scales, then its block minimums (fp16).
template <int MB, int SUB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))
void tile_avx512(const uint8_t* w, const c10::Half* records, const Shape& s, const int8_t* xq, const float* xscale,
                 const float* xsum, float* out) {
  constexpr int G = 128 / SUB;   // blocks per chunk
  const int64_t row_bytes = s.K / 2, blocks = s.blocks();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MB][R];
  for (auto& row : acc) for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t c = 0; c < s.chunks(); ++c) {
    __m512i xlo[MB], xhi[MB];
    __m512 xs[MB][G / 2];   // per lane: its block's activation scale
    for (int m = 0; m < MB; ++m) {
      const int8_t* xc = xq + m * s.K + c * 128;
      xlo[m] = _mm512_loadu_si512(xc);
      xhi[m] = _mm512_loadu_si512(xc + 64);
      for (int h = 0; h < G / 2; ++h) {
        double v;
        std::memcpy(&v, xscale + m * blocks + c * G + 2 * h, sizeof v);
        xs[m][h] = _mm512_castpd_ps(_mm512_set1_pd(v));
      }
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* wc = w + r * row_bytes + c * 64;
      _mm_prefetch(reinterpret_cast<const char*>(wc + kPrefetchBytes), _MM_HINT_T0);
      const __m512i wv = _mm512_loadu_si512(wc);
      const __m512i lo = _mm512_and_si512(wv, low4), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
      const c10::Half* scales = records + r * 2 * blocks + c * G;
      if constexpr (SUB == 64) {   // both nibbles of a lane belong to the same block: one sum
        const __m512 d = pair(scales);
        for (int m = 0; m < MB; ++m) {
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[m]), hi, xhi[m]);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(d, xs[m][0]), acc[m][r]);
        }
      } else {                     // blocks of 32: low and high nibbles in different blocks
        const __m512 dlo = pair(scales), dhi = pair(scales + 2);
        for (int m = 0; m < MB; ++m) {
          const __m512i plo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xlo[m]);
          const __m512i phi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, xhi[m]);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(plo), _mm512_mul_ps(dlo, xs[m][0]), acc[m][r]);
          acc[m][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(phi), _mm512_mul_ps(dhi, xs[m][1]), acc[m][r]);
        }
      }
    }
  }
  float tail[MB][R] = {};
  if (s.tail()) {   // one 64-column chunk: 32 bytes, 8 lanes
    const int64_t c = s.chunks();
    const __m256i low4y = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < R; ++r) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * row_bytes + c * 64));
      const __m256i lo = _mm256_and_si256(wv, low4y), hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low4y);
      const c10::Half* scales = records + r * 2 * blocks + c * G;
      for (int m = 0; m < MB; ++m) {
        const int8_t* xc = xq + m * s.K + c * 128;
        const float* xsc = xscale + m * blocks + c * G;
        const __m256i plo = _mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc)));
        const __m256i phi = _mm256_dpbusd_epi32(_mm256_setzero_si256(), hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 32)));
        // blocks of 64: one block; of 32: the low nibbles are block 0, the high ones block 1
        const float slo = static_cast<float>(scales[0]) * xsc[0];
        const float shi = SUB == 64 ? slo : static_cast<float>(scales[1]) * xsc[1];
        const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(phi), _mm256_set1_ps(shi),
                                         _mm256_mul_ps(_mm256_cvtepi32_ps(plo), _mm256_set1_ps(slo)));
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, f);
        for (float v : lanes) tail[m][r] += v;
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int r = 0; r < R; ++r)
      out[m * R + r] = _mm512_reduce_add_ps(acc[m][r]) + tail[m][r] +
                       minimum_terms(records + r * 2 * blocks + blocks, xsum + m * blocks, blocks);
}

// The same sums one byte at a time (CPUs without AVX512-VNNI, and a cross-check in the tests).
template <int MB, int SUB>
void tile_scalar(const uint8_t* w, const c10::Half* records, const Shape& s, const int8_t* xq, const float* xscale,
                 const float* xsum, float* out) {
  constexpr int G = 128 / SUB;
  const int64_t row_bytes = s.K / 2, blocks = s.blocks();
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < R; ++r) {
      const c10::Half* scales = records + r * 2 * blocks;
      float total = 0.f;
      for (int64_t c = 0; c * 128 < s.K; ++c) {
        const bool in_tail = c == s.chunks();
        const int64_t bytes = in_tail ? 32 : 64, chunk_blocks = in_tail ? 64 / SUB : G;
        for (int64_t b = 0; b < chunk_blocks; ++b) {
          int32_t dot = 0;
          for (int64_t p = 0; p < bytes; ++p) {
            for (int nibble = 0; nibble < 2; ++nibble) {
              // which block (record index) this byte's nibble belongs to, as the AVX512 lanes assign it
              const int64_t lane_block = in_tail ? (SUB == 64 ? 0 : nibble)
                                                 : (SUB == 64 ? (p / 4) % 2 : nibble * 2 + (p / 4) % 2);
              if (lane_block != b) continue;
              const int q = (w[r * row_bytes + c * 64 + p] >> (4 * nibble)) & 0xF;
              dot += q * xq[m * s.K + c * 128 + bytes * nibble + p];
            }
          }
          const int64_t at = c * G + b;
          total += float(dot) * static_cast<float>(scales[at]) * xscale[m * blocks + at];
        }
      }
      for (int64_t j = 0; j < blocks; ++j) total += static_cast<float>(scales[blocks + j]) * xsum[m * blocks + j];
      out[m * R + r] = total;
    }
  }
}

using TileFn = void (*)(const uint8_t*, const c10::Half*, const Shape&, const int8_t*, const float*, const float*, float*);

TileFn pick(const std::string& isa, int64_t sub, int64_t mb) {
#define EFFINFER_TILES(tile, SUB) \
  (mb == 1 ? tile<1, SUB> : mb == 2 ? tile<2, SUB> : mb == 3 ? tile<3, SUB> : tile<4, SUB>)
  if (isa == "avx512_vnni") return sub == 64 ? EFFINFER_TILES(tile_avx512, 64) : EFFINFER_TILES(tile_avx512, 32);
  return sub == 64 ? EFFINFER_TILES(tile_scalar, 64) : EFFINFER_TILES(tile_scalar, 32);
#undef EFFINFER_TILES
}

std::string best_isa() {
  __builtin_cpu_init();
  const bool vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return vnni ? "avx512_vnni" : "scalar";
}

std::string chosen_isa(const std::string& isa) {
  static const std::string best = best_isa();
  const std::string chosen = isa == "auto" ? best : isa;
  TORCH_CHECK(chosen == "scalar" || chosen == best, "int4_gemv: isa '", isa, "' is not supported by this CPU (best: ", best, ")");
  return chosen;
}

template <typename T>
void gemv(const std::string& isa, const T* x, const uint8_t* w, const c10::Half* records, T* out, int64_t M, int64_t N,
          const Shape& s) {
  thread_local std::vector<int8_t> xq;   // scratch kept between calls: no allocation on the hot path
  thread_local std::vector<float> xscale, xsum;
  xq.resize(M * s.K);
  xscale.resize(M * s.blocks());
  xsum.resize(M * s.blocks());
  const bool avx512 = isa == "avx512_vnni";   // the scalar path quantizes without AVX512 too (the same bits)
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x + m * s.K, s, avx512, xq.data() + m * s.K, xscale.data() + m * s.blocks(), xsum.data() + m * s.blocks());
  TileFn tiles[kMaxRowsPerPass + 1];   // by activation rows in a pass, chosen once per call
  for (int64_t mb = 1; mb <= kMaxRowsPerPass; ++mb) tiles[mb] = pick(isa, s.sub, mb);
  const int8_t* xq_ptr = xq.data();
  const float *xs = xscale.data(), *xm = xsum.data();
  const int64_t row_bytes = s.K / 2, row_record = 2 * s.blocks();
  at::parallel_for(0, N / R, 16, [&](int64_t begin, int64_t end) {
    float sums[kMaxRowsPerPass * R];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * R;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerPass) {
        const int64_t mb = std::min<int64_t>(kMaxRowsPerPass, M - m0);
        tiles[mb](w + n * row_bytes, records + n * row_record, s, xq_ptr + m0 * s.K, xs + m0 * s.blocks(),
                  xm + m0 * s.blocks(), sums);
        for (int64_t m = 0; m < mb; ++m)
          for (int r = 0; r < R; ++r) out[(m0 + m) * N + n + r] = static_cast<T>(sums[m * R + r]);
      }
    }
  });
}

at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& records, int64_t sub,
                     c10::string_view isa) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && records.dim() == 2, "int4_gemv: x [M, K], packed [N, K / 2], records [N, 2 * K / sub]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(sub == 32 || sub == 64, "int4_gemv: blocks of 32 or 64 columns");
  TORCH_CHECK(K % 64 == 0 && N % R == 0, "int4_gemv: needs K % 64 == 0 and N % 4 == 0");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(1) * 2 == K,
              "int4_gemv: contiguous uint8 weights, two columns per byte");
  TORCH_CHECK(records.scalar_type() == at::kHalf && records.is_contiguous() && records.size(0) == N &&
              records.size(1) == 2 * K / sub, "int4_gemv: fp16 records, a scale and a minimum per block and row");
  const std::string chosen = chosen_isa(std::string(isa));
  const Shape s{K, sub};
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int4_gemv", [&] {
    gemv<scalar_t>(chosen, xc.data_ptr<scalar_t>(), packed.data_ptr<uint8_t>(), records.data_ptr<c10::Half>(),
                   out.data_ptr<scalar_t>(), M, N, s);
  });
  return out;
}

// 16 fp32 values stored as T (bf16 rounded to nearest even, as PyTorch's conversion; weights are finite).
template <typename T> __attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) inline void store16(T* out, __m512 v) {
  alignas(64) float values[16];   // fp64 (not used by the layers): one by one
  _mm512_store_ps(values, v);
  for (int i = 0; i < 16; ++i) out[i] = static_cast<T>(values[i]);
}
template <> __attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) inline void store16(float* out, __m512 v) { _mm512_storeu_ps(out, v); }
template <> __attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) inline void store16(c10::Half* out, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <> __attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) inline void store16(c10::BFloat16* out, __m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm512_cvtepi32_epi16(rounded));
}

// The weight the kernel multiplies with, in column order and `dtype`: for steps of many rows, which run a
// GEMM. Each 128-column chunk: nibbles split, 32-bit lanes put back in column order, 16 columns at a time
// widened to fp32, times the block's scale plus its minimum (SmolLM2's four layer shapes: ~1 ms, where
// unpacking PyTorch's int4 layout with PyTorch ops took 2.0-2.9 ms and this layout with PyTorch ops 5.5-14).
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c")))
void dequantize_row(const uint8_t* w, const c10::Half* scales, const Shape& s, T* row) {
  const int64_t blocks = s.blocks();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  // columns 0-63 are the even lanes of the low then the high nibbles; columns 64-127 the odd lanes
  const __m512i first_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i second_idx = _mm512_add_epi32(first_idx, _mm512_set1_epi32(1));
  for (int64_t c = 0; c < s.chunks(); ++c) {
    const __m512i wv = _mm512_loadu_si512(w + c * 64);
    const __m512i lo = _mm512_and_si512(wv, low4), hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
    alignas(64) uint8_t q[128];
    _mm512_store_si512(q, _mm512_permutex2var_epi32(lo, first_idx, hi));
    _mm512_store_si512(q + 64, _mm512_permutex2var_epi32(lo, second_idx, hi));
    for (int j = 0; j < 8; ++j) {   // 16 columns each; block = column / sub
      const int b = record_index(16 * j / static_cast<int>(s.sub), static_cast<int>(s.sub));
      const float d = static_cast<float>(scales[c * s.per_chunk() + b]);
      const float m = static_cast<float>(scales[blocks + c * s.per_chunk() + b]);
      const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(q + 16 * j))));
      store16(row + c * 128 + 16 * j, _mm512_fmadd_ps(v, _mm512_set1_ps(d), _mm512_set1_ps(m)));
    }
  }
  if (s.tail()) {   // 64 columns in order: low nibbles 0-31, high 32-63
    const int64_t c = s.chunks();
    for (int64_t col = 0; col < 64; ++col) {
      const int q = (w[c * 64 + col % 32] >> (4 * (col / 32))) & 0xF;
      const int64_t b = c * s.per_chunk() + col / s.sub;
      row[c * 128 + col] = static_cast<T>(static_cast<float>(q) * static_cast<float>(scales[b]) + static_cast<float>(scales[blocks + b]));
    }
  }
}

template <typename T>
void dequantize_rows(const uint8_t* packed, const c10::Half* records, const Shape& s, T* out, int64_t N) {
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) dequantize_row(packed + n * s.K / 2, records + n * 2 * s.blocks(), s, out + n * s.K);
  });
}

at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& records, int64_t sub, at::ScalarType dtype) {
  TORCH_CHECK(sub == 32 || sub == 64, "int4_dequantize: blocks of 32 or 64 columns");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
              (packed.size(1) * 2) % 64 == 0, "int4_dequantize: contiguous uint8 weights, 64 columns at a time");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(records.scalar_type() == at::kHalf && records.is_contiguous() && records.size(0) == N &&
              records.size(1) == 2 * K / sub, "int4_dequantize: fp16 records, a scale and a minimum per block and row");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "int4_dequantize: fp32, bf16 or fp16");
  TORCH_CHECK(best_isa() == "avx512_vnni", "int4_dequantize: the int4 layout is used on AVX512-VNNI CPUs only");
  at::Tensor out = at::empty({N, K}, packed.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "int4_dequantize", [&] {
    dequantize_rows<scalar_t>(packed.data_ptr<uint8_t>(), records.data_ptr<c10::Half>(), Shape{K, sub},
                              out.data_ptr<scalar_t>(), N);
  });
  return out;
}

// ---- many rows: a GEMM ------------------------------------------------------------------------------------
// Steps of many rows (prefill chunks, large decode batches) are compute-bound, and the GEMV's layout costs a
// float conversion, a multiply and an add per 4 columns of each row (its lanes run along a row). Here the
// weights are turned, 32 rows at a time, into the layout integer dot products want across rows: weight row n
// in lane n % 16 of a vector, 4 consecutive columns per lane (one gather per lane of the GEMV layout, which
// keeps 4 consecutive columns of a row in each 32-bit word's nibbles). A lane then sums a whole block (32 or
// 64 columns) in int32 before its one conversion; the tile (K * 32 bytes) stays in cache while every
// activation row passes over it, 4 at a time (each weight load serves 4 rows, each activation broadcast 32
// weight rows). Activations are quantized as for the GEMV (int8 per block, the same scales and sums), in
// column order.

constexpr int kTileRows = 32;   // weight rows per tile: two vectors of 16 lanes
constexpr int kGemmRows = 4;    // activation rows per pass

// Natural block j of a row -> its place in the row's record (the GEMV's lane order).
inline int64_t record_position(const Shape& s, int64_t j) {
  const int64_t c = j * s.sub / 128, b = (j * s.sub % 128) / s.sub;
  return c * s.per_chunk() + (c == s.chunks() ? b : record_index(static_cast<int>(b), static_cast<int>(s.sub)));
}

// Quads (4 consecutive columns) of a 128-column chunk held by 32-bit lane L's low and high nibbles.
inline int low_quad(int L) { return (L % 2) * 16 + L / 2; }
inline int high_quad(int L) { return (L % 2) * 16 + 8 + L / 2; }

// The tile of `vectors` x 16 weight rows from `w` (row n0 onwards): per quad of columns, `vectors` vectors of
// 16 lanes (lane = row, 4 columns of 4-bit values in its 4 bytes, one value per byte); per natural block, its
// scales and minimums as fp32, `vectors` x 16 of each.
__attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
void build_tile(const uint8_t* w, const c10::Half* records, const Shape& s, const int64_t* positions, int vectors,
                __m512i* tile, float* scales, float* minimums) {
  const int64_t row_bytes = s.K / 2, blocks = s.blocks();
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(row_bytes / 4)));
  for (int v = 0; v < vectors; ++v) {
    const uint8_t* base = w + 16 * v * row_bytes;
    for (int64_t c = 0; c * 128 < s.K; ++c) {
      const bool in_tail = c == s.chunks();
      for (int L = 0; L < (in_tail ? 8 : 16); ++L) {
        const __m512i words = _mm512_i32gather_epi32(_mm512_add_epi32(rows, _mm512_set1_epi32(L)), base + c * 64, 4);
        const __m512i lo = _mm512_and_si512(words, low4), hi = _mm512_and_si512(_mm512_srli_epi16(words, 4), low4);
        const int64_t qlo = c * 32 + (in_tail ? L : low_quad(L)), qhi = c * 32 + (in_tail ? 8 + L : high_quad(L));
        _mm512_storeu_si512(tile + qlo * vectors + v, lo);
        _mm512_storeu_si512(tile + qhi * vectors + v, hi);
      }
    }
    for (int n = 0; n < 16; ++n) {
      const c10::Half* record = records + (16 * v + n) * 2 * blocks;
      for (int64_t j = 0; j < blocks; ++j) {
        scales[(j * vectors + v) * 16 + n] = static_cast<float>(record[positions[j]]);
        minimums[(j * vectors + v) * 16 + n] = static_cast<float>(record[blocks + positions[j]]);
      }
    }
  }
}

// out[m * 16 * NB + col] for MB activation rows and the tile's 16 * NB weight rows.
template <int MB, int NB, int SUB>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
void gemm_tile(const __m512i* tile, const float* scales, const float* minimums, const Shape& s, const int8_t* xq,
               const float* xscale, const float* xsum, float* out) {
  constexpr int Q = SUB / 4;   // quads per block
  const int64_t blocks = s.blocks();
  __m512 acc[MB][NB];
  for (auto& row : acc) for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t j = 0; j < blocks; ++j) {
    __m512i dot[MB][NB];
    for (auto& row : dot) for (auto& d : row) d = _mm512_setzero_si512();
    for (int q = 0; q < Q; ++q) {
      const int64_t quad = j * Q + q;
      __m512i wv[NB];
      for (int v = 0; v < NB; ++v) wv[v] = _mm512_loadu_si512(tile + quad * NB + v);
      for (int m = 0; m < MB; ++m) {
        int32_t four;
        std::memcpy(&four, xq + m * s.K + 4 * quad, sizeof four);
        const __m512i xb = _mm512_set1_epi32(four);
        for (int v = 0; v < NB; ++v) dot[m][v] = _mm512_dpbusd_epi32(dot[m][v], wv[v], xb);
      }
    }
    for (int v = 0; v < NB; ++v) {
      const __m512 d = _mm512_load_ps(scales + (j * NB + v) * 16), mn = _mm512_load_ps(minimums + (j * NB + v) * 16);
      for (int m = 0; m < MB; ++m) {
        const __m512 scaled = _mm512_mul_ps(d, _mm512_set1_ps(xscale[m * blocks + j]));
        acc[m][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m][v]), scaled, acc[m][v]);
        acc[m][v] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xsum[m * blocks + j]), acc[m][v]);
      }
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int v = 0; v < NB; ++v) _mm512_storeu_ps(out + m * 16 * NB + 16 * v, acc[m][v]);
}

using GemmTileFn = void (*)(const __m512i*, const float*, const float*, const Shape&, const int8_t*, const float*,
                            const float*, float*);

GemmTileFn pick_gemm(int64_t sub, int64_t mb, int nb) {
#define EFFINFER_GEMM_TILES(NB, SUB) \
  (mb == 1 ? gemm_tile<1, NB, SUB> : mb == 2 ? gemm_tile<2, NB, SUB> : mb == 3 ? gemm_tile<3, NB, SUB> : gemm_tile<4, NB, SUB>)
  if (nb == 2) return sub == 64 ? EFFINFER_GEMM_TILES(2, 64) : EFFINFER_GEMM_TILES(2, 32);
  return sub == 64 ? EFFINFER_GEMM_TILES(1, 64) : EFFINFER_GEMM_TILES(1, 32);
#undef EFFINFER_GEMM_TILES
}

// rows x width fp32 sums -> out (row stride N) as T.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c")))
void store_rows(const float* sums, int64_t rows, int width, T* out, int64_t N) {
  for (int64_t m = 0; m < rows; ++m)
    for (int c = 0; c < width; c += 16) store16(out + m * N + c, _mm512_loadu_ps(sums + m * width + c));
}

// out [M, N] = x [M, K] times the weight that `build(n0, vectors, tile, scales, minimums)` lays out, tile by tile.
template <typename T, typename Build>
void gemm(const T* x, T* out, int64_t M, int64_t N, const Shape& s, const Build& build) {
  const int64_t blocks = s.blocks();
  std::vector<int8_t> xq(M * s.K);
  std::vector<float> xscale(M * blocks), xsum(M * blocks);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m)
      quantize_row(x + m * s.K, s, true, xq.data() + m * s.K, xscale.data() + m * blocks, xsum.data() + m * blocks, true);
  });
  GemmTileFn tiles[3][kGemmRows + 1];   // [vectors][activation rows]
  for (int nb = 1; nb <= 2; ++nb)
    for (int64_t mb = 1; mb <= kGemmRows; ++mb) tiles[nb][mb] = pick_gemm(s.sub, mb, nb);
  at::parallel_for(0, (N + kTileRows - 1) / kTileRows, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<__m512i> tile;   // scratch kept between calls
    thread_local std::vector<float> params;
    tile.resize(s.K / 4 * 2);
    params.resize(2 * blocks * kTileRows + 16);
    float* scales = params.data() + (16 - reinterpret_cast<uintptr_t>(params.data()) / 4 % 16) % 16;   // 64-byte aligned
    float* minimums = scales + blocks * kTileRows;
    float sums[kGemmRows * kTileRows];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n0 = t * kTileRows;
      const int vectors = N - n0 >= kTileRows ? 2 : 1;
      const int width = 16 * vectors;
      build(n0, vectors, tile.data(), scales, minimums);
      for (int64_t m0 = 0; m0 < M; m0 += kGemmRows) {
        const int64_t mb = std::min<int64_t>(kGemmRows, M - m0);
        tiles[vectors][mb](tile.data(), scales, minimums, s, xq.data() + m0 * s.K, xscale.data() + m0 * blocks,
                           xsum.data() + m0 * blocks, sums);
        store_rows(sums, mb, width, out + m0 * N + n0, N);
      }
    }
  });
}

at::Tensor int4_gemm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& records, int64_t sub) {
  TORCH_CHECK(x.dim() == 2 && packed.dim() == 2 && records.dim() == 2, "int4_gemm: x [M, K], packed [N, K / 2], records [N, 2 * K / sub]");
  const int64_t M = x.size(0), K = x.size(1), N = packed.size(0);
  TORCH_CHECK(sub == 32 || sub == 64, "int4_gemm: blocks of 32 or 64 columns");
  TORCH_CHECK(K % 64 == 0 && N % 16 == 0, "int4_gemm: needs K % 64 == 0 and N % 16 == 0");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.size(1) * 2 == K,
              "int4_gemm: contiguous uint8 weights, two columns per byte");
  TORCH_CHECK(records.scalar_type() == at::kHalf && records.is_contiguous() && records.size(0) == N &&
              records.size(1) == 2 * K / sub, "int4_gemm: fp16 records, a scale and a minimum per block and row");
  TORCH_CHECK(best_isa() == "avx512_vnni", "int4_gemm: needs AVX512-VNNI");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  const Shape s{K, sub};
  std::vector<int64_t> positions(s.blocks());
  for (int64_t j = 0; j < s.blocks(); ++j) positions[j] = record_position(s, j);
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const c10::Half* rec = records.data_ptr<c10::Half>();
  const auto build = [&](int64_t n0, int vectors, __m512i* tile, float* scales, float* minimums) {
    build_tile(w + n0 * K / 2, rec + n0 * 2 * s.blocks(), s, positions.data(), vectors, tile, scales, minimums);
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int4_gemm", [&] {
    gemm<scalar_t>(xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), M, N, s, build);
  });
  return out;
}

// ---- int8 weights through the same GEMM ----------------------------------------------------------------------
// Weights int8 per output channel (w = q * scale[n]), activations int8 per block of 32 columns as above. The dot
// products take unsigned weights: q + 128 (its bits with the top one flipped), whose extra 128 * sum(x) per block
// is the "minimum" term of the int4 GEMM with minimum -128 * scale[n]; the block scale is scale[n] for every block.

// The tile of `vectors` x 16 rows of q (row n0 onwards) and its per-block parameters.
__attribute__((target("avx512f,avx512bw,avx512vl")))
void build_int8_tile(const int8_t* q, const float* row_scales, const Shape& s, int vectors, __m512i* tile,
                     float* scales, float* minimums) {
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int>(s.K / 4)));
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int v = 0; v < vectors; ++v) {
    const int8_t* base = q + 16 * v * s.K;
    for (int64_t quad = 0; quad < s.K / 4; ++quad) {
      const __m512i words = _mm512_i32gather_epi32(_mm512_add_epi32(rows, _mm512_set1_epi32(static_cast<int>(quad))), base, 4);
      _mm512_storeu_si512(tile + quad * vectors + v, _mm512_xor_si512(words, flip));
    }
    for (int n = 0; n < 16; ++n) {
      const float scale = row_scales[16 * v + n];
      for (int64_t j = 0; j < s.blocks(); ++j) {
        scales[(j * vectors + v) * 16 + n] = scale;
        minimums[(j * vectors + v) * 16 + n] = -128.f * scale;
      }
    }
  }
}

at::Tensor int8_gemm(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && scales.dim() == 1, "int8_gemm: x [M, K], qweight [N, K], scales [N]");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % 64 == 0 && N % 16 == 0, "int8_gemm: needs K % 64 == 0 and N % 16 == 0");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous() && qweight.size(1) == K,
              "int8_gemm: contiguous int8 weights [N, K]");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.size(0) == N,
              "int8_gemm: fp32 scales [N]");
  TORCH_CHECK(best_isa() == "avx512_vnni", "int8_gemm: needs AVX512-VNNI");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  const Shape s{K, 32};
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* row_scales = scales.data_ptr<float>();
  const auto build = [&](int64_t n0, int vectors, __m512i* tile, float* block_scales, float* minimums) {
    build_int8_tile(q + n0 * K, row_scales + n0, s, vectors, tile, block_scales, minimums);
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_gemm", [&] {
    gemm<scalar_t>(xc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), M, N, s, build);
  });
  return out;
}

// What the layers call: the GEMV up to kGemvMaxRows rows (it reads the weights once for all of them), the GEMM
// above (where N allows), so that a compiled step with a dynamic batch size has no branch on it.
constexpr int64_t kGemvMaxRows = 8;

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& records, int64_t sub) {
  if (x.dim() == 2 && x.size(0) > kGemvMaxRows && packed.dim() == 2 && packed.size(0) % 16 == 0)
    return int4_gemm(x, packed, records, sub);
  return int4_gemv(x, packed, records, sub, "auto");
}

std::string int4_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(effinfer_kernels, m) {
  m.def("int4_gemv(Tensor x, Tensor packed, Tensor records, int sub, str isa='auto') -> Tensor");
  m.def("int4_dequantize(Tensor packed, Tensor records, int sub, ScalarType dtype) -> Tensor");
  m.def("int4_gemm(Tensor x, Tensor packed, Tensor records, int sub) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor packed, Tensor records, int sub) -> Tensor");
  m.def("int8_gemm(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_isa() -> str", &int4_isa);
}

TORCH_LIBRARY_IMPL(effinfer_kernels, CPU, m) {
  m.impl("int4_gemv", &int4_gemv);
  m.impl("int4_dequantize", &int4_dequantize);
  m.impl("int4_gemm", &int4_gemm);
  m.impl("int4_mm", &int4_mm);
  m.impl("int8_gemm", &int8_gemm);
}
