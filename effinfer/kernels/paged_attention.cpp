// Decode attention over a paged KV cache, read in place (no gather copy), on x86 CPUs with AVX-512.
//
// The compiled decode step otherwise gathers every sequence's blocks into a contiguous fp32 copy before
// its products: at a 600-token context that copy costs SmolLM2 ~5 ms of a ~12 ms step on two cores. Here
// each (sequence, KV head, context partition) reads its blocks where they are, the query heads that share
// the KV head (GQA) together, and keeps fp32 scores and sums; partitions of a long context run in parallel
// and are combined by their maxima and sums (flash-decoding), so a single sequence uses every core. Scores
// are made 16 tokens at a time, their lane sums taken together (`sum_each`), not one reduction per token.
//
// Layout: pages [2 (K, V), kv_heads, num_blocks, block_size, head_dim] in bf16 or fp32 (the cache's
// "auto" dtype; 8-bit pages keep the traced path), queries [num_seqs, num_heads, head_dim], block tables
// [num_seqs, width] (padding past a sequence's length is never read), seq_lens [num_seqs].

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kPartitionTokens = 256;   // context tokens per work item (a multiple of any block size used)
constexpr int kMaxGroup = 16;              // query heads per KV head handled in one pass
constexpr int64_t kSerialWork = 512;       // below this many (token, KV head) pairs a step runs on one thread:
                                           // starting the threads costs more than the work

__attribute__((target("avx512f"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

__attribute__((target("avx512f"))) inline __m512 load16(const c10::BFloat16* p) {
  // bf16 is the top half of an fp32: widen to 32 bits and shift into place
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// e^x for x <= 0 (scores minus their maximum): 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2, relative error ~2e-7
__attribute__((target("avx512f"))) inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

// r[i] = the sum of v[i]'s 16 lanes, for 16 vectors at once: pairs and quads of vectors are added lane-wise
// after unpacks and shuffles, ~3 instructions per vector where a reduction of each takes ~8
__attribute__((target("avx512f"))) inline __m512 sum_each(const __m512* v) {
  __m512 quads[4];
  for (int m = 0; m < 4; ++m) {
    const __m512* w = v + 4 * m;
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
    // per 128-bit lane: the lane's partial sums of w[0], w[1], w[2], w[3]
    quads[m] = _mm512_add_ps(_mm512_shuffle_ps(s01, s23, 0x44), _mm512_shuffle_ps(s01, s23, 0xEE));
  }
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[0], quads[1], 0x88), _mm512_shuffle_f32x4(quads[0], quads[1], 0xDD));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(quads[2], quads[3], 0x88), _mm512_shuffle_f32x4(quads[2], quads[3], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88), _mm512_shuffle_f32x4(u01, u23, 0xDD));
}

struct Partial {   // one partition's result for each query head of a group: max score, sum of e^(s - max), sum of e^(s - max) v
  float max[kMaxGroup];
  float sum[kMaxGroup];
};

// Scores, softmax numerators and the weighted sum of V for positions [begin, end) of one sequence and KV head.
template <typename T>
__attribute__((target("avx512f"))) void attend_partition(
    const float* q, int group, int64_t dim, const T* k_pages, const T* v_pages, const int64_t* table,
    int64_t block_size, int64_t block_stride, int64_t begin, int64_t end, float scale, Partial& part, float* acc) {
  const int64_t len = end - begin;
  std::vector<float> scores(static_cast<size_t>(group * len));
  int64_t t0 = 0;
  for (; t0 + 16 <= len; t0 += 16) {   // 16 tokens at a time: their dot products summed across lanes together
    const T* keys[16];
    for (int i = 0; i < 16; ++i) {
      const int64_t pos = begin + t0 + i;
      keys[i] = k_pages + table[pos / block_size] * block_stride + (pos % block_size) * dim;
    }
    for (int g = 0; g < group; ++g) {
      __m512 sums[16];
      for (int i = 0; i < 16; ++i) sums[i] = _mm512_setzero_ps();
      for (int64_t d = 0; d < dim; d += 16) {
        const __m512 qv = _mm512_loadu_ps(q + g * dim + d);
        for (int i = 0; i < 16; ++i) sums[i] = _mm512_fmadd_ps(qv, load16(keys[i] + d), sums[i]);
      }
      _mm512_storeu_ps(scores.data() + g * len + t0, _mm512_mul_ps(sum_each(sums), _mm512_set1_ps(scale)));
    }
  }
  for (int64_t t = t0; t < len; ++t) {
    const int64_t pos = begin + t;
    const T* k = k_pages + table[pos / block_size] * block_stride + (pos % block_size) * dim;
    __m512 sums[kMaxGroup];
    for (int g = 0; g < group; ++g) sums[g] = _mm512_setzero_ps();
    for (int64_t d = 0; d < dim; d += 16) {
      const __m512 kv = load16(k + d);
      for (int g = 0; g < group; ++g) sums[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * dim + d), kv, sums[g]);
    }
    for (int g = 0; g < group; ++g) scores[g * len + t] = _mm512_reduce_add_ps(sums[g]) * scale;
  }
  for (int g = 0; g < group; ++g) {
    float* s = scores.data() + g * len;
    const float m = *std::max_element(s, s + len);
    __m512 total = _mm512_setzero_ps();
    int64_t t = 0;
    for (; t + 16 <= len; t += 16) {
      const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), _mm512_set1_ps(m)));
      _mm512_storeu_ps(s + t, e);
      total = _mm512_add_ps(total, e);
    }
    float sum = _mm512_reduce_add_ps(total);
    for (; t < len; ++t) {
      s[t] = std::exp(s[t] - m);
      sum += s[t];
    }
    part.max[g] = m;
    part.sum[g] = sum;
  }
  std::fill(acc, acc + group * dim, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const int64_t pos = begin + t;
    const T* v = v_pages + table[pos / block_size] * block_stride + (pos % block_size) * dim;
    for (int64_t d = 0; d < dim; d += 16) {
      const __m512 vv = load16(v + d);
      for (int g = 0; g < group; ++g) {
        float* a = acc + g * dim + d;
        _mm512_storeu_ps(a, _mm512_fmadd_ps(_mm512_set1_ps(scores[g * len + t]), vv, _mm512_loadu_ps(a)));
      }
    }
  }
}

template <typename T>
void decode_attention(const T* q_in, const T* pages, const int64_t* tables, const int64_t* seq_lens, T* out,
                      int64_t num_seqs, int64_t num_heads, int64_t kv_heads, int64_t num_blocks, int64_t block_size,
                      int64_t dim, int64_t width, float scale, int64_t window) {
  const int group = static_cast<int>(num_heads / kv_heads);
  const int64_t block_stride = block_size * dim;
  const int64_t head_stride = num_blocks * block_stride;   // one KV head's pages
  std::vector<int64_t> first(num_seqs), parts_of(num_seqs), part_start(num_seqs + 1, 0);
  for (int64_t s = 0; s < num_seqs; ++s) {
    first[s] = window > 0 ? std::max<int64_t>(0, seq_lens[s] - window) : 0;
    parts_of[s] = std::max<int64_t>(1, (seq_lens[s] - first[s] + kPartitionTokens - 1) / kPartitionTokens);
    part_start[s + 1] = part_start[s] + parts_of[s];
  }
  const int64_t total_parts = part_start[num_seqs];
  std::vector<Partial> partials(static_cast<size_t>(total_parts * kv_heads));
  std::vector<float> accs(static_cast<size_t>(total_parts * kv_heads * group * dim));
  std::vector<float> queries(static_cast<size_t>(num_seqs * num_heads * dim));
  for (int64_t i = 0; i < num_seqs * num_heads * dim; ++i) queries[i] = static_cast<float>(q_in[i]);
  int64_t work = 0;
  for (int64_t s = 0; s < num_seqs; ++s) work += (seq_lens[s] - first[s]) * kv_heads;
  const int64_t items = total_parts * kv_heads;
  // work item = (partition, KV head); partitions of all sequences are numbered consecutively. A sequence of
  // one partition is finished in its items; longer ones are combined below.
  at::parallel_for(0, items, work < kSerialWork ? items : 1, [&](int64_t lo, int64_t hi) {
    for (int64_t item = lo; item < hi; ++item) {
      const int64_t part = item / kv_heads, h = item % kv_heads;
      const int64_t s = std::upper_bound(part_start.begin(), part_start.end(), part) - part_start.begin() - 1;
      const int64_t begin = first[s] + (part - part_start[s]) * kPartitionTokens;
      const int64_t end = std::min(seq_lens[s], begin + kPartitionTokens);
      float* acc = accs.data() + item * group * dim;
      attend_partition(queries.data() + (s * num_heads + h * group) * dim, group, dim, pages + h * head_stride,
                       pages + (kv_heads + h) * head_stride, tables + s * width, block_size, block_stride,
                       begin, end, scale, partials[item], acc);
      if (parts_of[s] == 1) {
        for (int g = 0; g < group; ++g) {
          T* o = out + (s * num_heads + h * group + g) * dim;
          for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(acc[g * dim + d] / partials[item].sum[g]);
        }
      }
    }
  });
  // combine the partitions of longer sequences: rescale by e^(max_p - max) and divide by the total sum
  at::parallel_for(0, num_seqs * kv_heads, num_seqs * kv_heads, [&](int64_t lo, int64_t hi) {
    std::vector<float> result(static_cast<size_t>(dim));
    for (int64_t sh = lo; sh < hi; ++sh) {
      const int64_t s = sh / kv_heads, h = sh % kv_heads;
      if (parts_of[s] == 1) continue;
      for (int g = 0; g < group; ++g) {
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t p = part_start[s]; p < part_start[s + 1]; ++p) m = std::max(m, partials[p * kv_heads + h].max[g]);
        float total = 0.f;
        std::fill(result.begin(), result.end(), 0.f);
        for (int64_t p = part_start[s]; p < part_start[s + 1]; ++p) {
          const Partial& part = partials[p * kv_heads + h];
          const float w = std::exp(part.max[g] - m);
          total += part.sum[g] * w;
          const float* a = accs.data() + (p * kv_heads + h) * group * dim + g * dim;
          for (int64_t d = 0; d < dim; ++d) result[d] += a[d] * w;
        }
        T* o = out + (s * num_heads + h * group + g) * dim;
        for (int64_t d = 0; d < dim; ++d) o[d] = static_cast<T>(result[d] / total);
      }
    }
  });
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& pages, const at::Tensor& block_tables,
                                  const at::Tensor& seq_lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && pages.dim() == 5 && pages.size(0) == 2, "q [seqs, heads, dim], pages [2, kv_heads, blocks, block, dim]");
  TORCH_CHECK(q.scalar_type() == pages.scalar_type(), "q and the pages share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "fp32 or bf16 pages");
  const int64_t num_seqs = q.size(0), num_heads = q.size(1), dim = q.size(2), kv_heads = pages.size(1);
  TORCH_CHECK(dim % 16 == 0 && pages.size(4) == dim, "head_dim a multiple of 16, equal in q and the pages");
  TORCH_CHECK(num_heads % kv_heads == 0 && num_heads / kv_heads <= kMaxGroup, "query heads a multiple of KV heads (at most 16 per KV head)");
  TORCH_CHECK(kPartitionTokens % pages.size(3) == 0 || pages.size(3) % kPartitionTokens == 0, "block size a power of two");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_seqs && seq_lens.numel() == num_seqs, "a table and length per sequence");
  const at::Tensor qc = q.contiguous(), pc = pages.contiguous();
  const at::Tensor tables = block_tables.to(at::kLong).contiguous(), lens = seq_lens.to(at::kLong).contiguous();
  const int64_t* len_ptr = lens.data_ptr<int64_t>();
  for (int64_t s = 0; s < num_seqs; ++s) {
    TORCH_CHECK(len_ptr[s] >= 1 && len_ptr[s] <= tables.size(1) * pages.size(3), "a sequence length within its table");
  }
  at::Tensor out = at::empty_like(qc);
  if (q.scalar_type() == at::kFloat) {
    decode_attention<float>(qc.data_ptr<float>(), pc.data_ptr<float>(), tables.data_ptr<int64_t>(), len_ptr,
                            out.data_ptr<float>(), num_seqs, num_heads, kv_heads, pages.size(2), pages.size(3), dim,
                            tables.size(1), static_cast<float>(scale), window);
  } else {
    decode_attention<c10::BFloat16>(qc.data_ptr<c10::BFloat16>(), pc.data_ptr<c10::BFloat16>(), tables.data_ptr<int64_t>(),
                                    len_ptr, out.data_ptr<c10::BFloat16>(), num_seqs, num_heads, kv_heads, pages.size(2),
                                    pages.size(3), dim, tables.size(1), static_cast<float>(scale), window);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(effinfer_kernels, m) {
  m.def("paged_decode_attention(Tensor q, Tensor pages, Tensor block_tables, Tensor seq_lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(effinfer_kernels, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
