// Weight-only int8 matrix-vector products for few-row steps (decode) on x86 CPUs.
//
// ATen's `_weight_int8pack_mm` widens every weight to fp32 and multiplies in fp32, and streams the weights
// from memory at ~25 GB/s on two cores of this machine (a plain sum of them reads at ~40). Here each
// step's activations are quantized per row to int16 (15 bits, finer than bf16's 8), the weights are widened
// to int16 and multiplied with integer dot products (`vpdpwssd`: 32 products per instruction on
// AVX512-VNNI, `vpmaddwd` on AVX2), and the rows ahead are prefetched: ~34 GB/s on two cores here.
// Exact up to the activations' int16 rounding (tested against dequantize-then-matmul).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

namespace {

constexpr float kActivationMax = 16383.f;  // |x_q| < 2^14, so a product fits 22 bits
constexpr int64_t kChunk = 4096;           // columns summed in int32 lanes before an int64 total: no overflow
constexpr int R = 4;                       // weight rows per tile: each activation load serves all four
constexpr int kMaxRowsPerPass = 4;         // activation rows per pass: each weight load serves all of them
constexpr int64_t kPrefetchBytes = 8192;   // how far ahead to prefetch weights (1-32 KiB tried: 8 best here)

// sums[m * R + r] = dot(w row r, x row m), for a tile of R weight rows and MB activation rows.
using TileFn = void (*)(const int8_t* w, int64_t K, const int16_t* x, int64_t* sums);

__attribute__((target("avx512f"))) inline int64_t sum_lanes(__m512i v) {   // in int64: 16 lanes may exceed int32
  return _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(v)),
                                                  _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(v, 1))));
}

template <int MB>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void tile_avx512(const int8_t* w, int64_t K, const int16_t* x, int64_t* sums) {
  std::fill(sums, sums + MB * R, 0);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    __m512i acc[MB][R];
    for (auto& row : acc) for (auto& a : row) a = _mm512_setzero_si512();
    for (int64_t k = k0; k < std::min(K, k0 + kChunk); k += 32) {
      __m512i wv[R];
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBytes + r * K + k), _MM_HINT_T0);
        wv[r] = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k)));
      }
      for (int m = 0; m < MB; ++m) {
        const __m512i xv = _mm512_loadu_si512(x + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], wv[r], xv);
      }
    }
    for (int m = 0; m < MB; ++m) for (int r = 0; r < R; ++r) sums[m * R + r] += sum_lanes(acc[m][r]);
  }
}

template <int MB>
__attribute__((target("avx2"))) void tile_avx2(const int8_t* w, int64_t K, const int16_t* x, int64_t* sums) {
  std::fill(sums, sums + MB * R, 0);
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    __m256i acc[MB][R];
    for (auto& row : acc) for (auto& a : row) a = _mm256_setzero_si256();
    for (int64_t k = k0; k < std::min(K, k0 + kChunk); k += 16) {
      __m256i wv[R];
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w + kPrefetchBytes + r * K + k), _MM_HINT_T0);
        wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k)));
      }
      for (int m = 0; m < MB; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k));
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(wv[r], xv));
      }
    }
    for (int m = 0; m < MB; ++m) {
      for (int r = 0; r < R; ++r) {
        alignas(32) int32_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), acc[m][r]);
        for (int32_t v : lanes) sums[m * R + r] += v;
      }
    }
  }
}

template <int MB>
void tile_scalar(const int8_t* w, int64_t K, const int16_t* x, int64_t* sums) {
  for (int m = 0; m < MB; ++m) {
    for (int r = 0; r < R; ++r) {
      int64_t s = 0;
      for (int64_t k = 0; k < K; ++k) s += int64_t(w[r * K + k]) * x[m * K + k];
      sums[m * R + r] = s;
    }
  }
}

using TileTable = std::array<TileFn, kMaxRowsPerPass + 1>;   // indexed by the pass's activation rows

const TileTable kAvx512 = {nullptr, tile_avx512<1>, tile_avx512<2>, tile_avx512<3>, tile_avx512<4>};
const TileTable kAvx2 = {nullptr, tile_avx2<1>, tile_avx2<2>, tile_avx2<3>, tile_avx2<4>};
const TileTable kScalar = {nullptr, tile_scalar<1>, tile_scalar<2>, tile_scalar<3>, tile_scalar<4>};

std::string best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw")) return "avx512_vnni";
  if (__builtin_cpu_supports("avx2")) return "avx2";
  return "scalar";
}

const TileTable& tiles_for(const std::string& isa) {
  static const std::string best = best_isa();
  const std::string& chosen = isa == "auto" ? best : isa;
  TORCH_CHECK(chosen == "scalar" || chosen == best || (chosen == "avx2" && best == "avx512_vnni"),
              "int8_gemv: isa '", isa, "' is not supported by this CPU (best: ", best, ")");
  return chosen == "avx512_vnni" ? kAvx512 : chosen == "avx2" ? kAvx2 : kScalar;
}

// x [M, K] -> x_q [M, K] int16 and one scale per row
template <typename T>
void quantize_rows(const T* x, int64_t M, int64_t K, int16_t* xq, float* scale) {
  for (int64_t m = 0; m < M; ++m) {
    const T* row = x + m * K;
    float amax = 0.f;
    bool finite = true;
    for (int64_t k = 0; k < K; ++k) {
      const float v = std::fabs(static_cast<float>(row[k]));
      finite = finite && v <= std::numeric_limits<float>::max();   // false for inf and NaN
      amax = std::max(amax, v);
    }
    if (!finite) {   // inf/NaN in: NaN out, as from a float matmul (not int16 garbage)
      scale[m] = std::numeric_limits<float>::quiet_NaN();
      std::fill(xq + m * K, xq + (m + 1) * K, 0);
      continue;
    }
    scale[m] = amax > 0.f ? amax / kActivationMax : 1.f;
    const float inv = 1.f / scale[m];
    for (int64_t k = 0; k < K; ++k) xq[m * K + k] = static_cast<int16_t>(std::nearbyint(static_cast<float>(row[k]) * inv));
  }
}

template <typename T>
void gemv(const TileTable& tiles, const T* x, const int8_t* w, const float* wscale, T* out, int64_t M, int64_t K, int64_t N) {
  thread_local std::vector<int16_t> xq;   // scratch kept between calls: no allocation on the hot path
  thread_local std::vector<float> xscale;
  xq.resize(M * K);
  xscale.resize(M);
  quantize_rows(x, M, K, xq.data(), xscale.data());
  const int16_t* xq_ptr = xq.data();
  const float* xs = xscale.data();
  // Tiles of R weight rows split across threads; activation rows go up to four per pass over a tile.
  at::parallel_for(0, N / R, 16, [&](int64_t begin, int64_t end) {
    int64_t sums[kMaxRowsPerPass * R];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * R;
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRowsPerPass) {
        const int64_t mb = std::min<int64_t>(kMaxRowsPerPass, M - m0);
        tiles[mb](w + n * K, K, xq_ptr + m0 * K, sums);
        for (int64_t m = 0; m < mb; ++m)
          for (int r = 0; r < R; ++r)
            out[(m0 + m) * N + n + r] = static_cast<T>(float(sums[m * R + r]) * xs[m0 + m] * wscale[n + r]);
      }
    }
  });
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales, c10::string_view isa) {
  TORCH_CHECK(x.dim() == 2 && qweight.dim() == 2 && x.size(1) == qweight.size(1), "int8_gemv: x [M, K], qweight [N, K]");
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous(), "int8_gemv: contiguous int8 weights");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == qweight.size(0),
              "int8_gemv: one fp32 scale per weight row");
  const int64_t M = x.size(0), K = x.size(1), N = qweight.size(0);
  TORCH_CHECK(K % 32 == 0 && N % R == 0, "int8_gemv: needs K % 32 == 0 and N % 4 == 0");
  const TileTable& tiles = tiles_for(std::string(isa));
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({M, N}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "int8_gemv", [&] {
    gemv<scalar_t>(tiles, xc.data_ptr<scalar_t>(), qweight.data_ptr<int8_t>(), scales.data_ptr<float>(),
                   out.data_ptr<scalar_t>(), M, K, N);
  });
  return out;
}

std::string gemv_isa() { return best_isa(); }

}  // namespace

TORCH_LIBRARY(effinfer_kernels, m) {
  m.def("int8_gemv(Tensor x, Tensor qweight, Tensor scales, str isa='auto') -> Tensor");
  m.def("gemv_isa() -> str", &gemv_isa);
}

TORCH_LIBRARY_IMPL(effinfer_kernels, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
}
