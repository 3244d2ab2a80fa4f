// Fused block-sparse FlashAttention-2 for the CPU, forward and backward, float32 and bfloat16.
//
// The Python module attnkit/backends/blocksparse.py states the algorithm; this file runs the
// same tiles with the per-row work (mask, exp, sums, rescale) done in cache between two GEMMs,
// as PyTorch's own CPU flash kernel does for dense attention, instead of as separate passes
// over memory. One work item = one query block of one query head, pulled from a shared
// counter in (head, block) order.
//
// Layouts: the caller's own (contiguous) q [B, Tq, Hq, D], k [B, Tk, Hkv, D],
// v [B, Tk, Hkv, Dv], read in place through BLAS leading dimensions (no transposed copies: at
// T=32k each would be a fresh 32 MB buffer); out [B, Tq, Hq, Dv], lse [B, Tq, Hq]. The mask's
// live tiles are a CSR over query blocks: row_ptr [nq + 1],
// tiles [nnz] (key-tile index, ascending per row), partial [nnz] (-1 for a full tile, else the
// index of its 0/1 keep tile in keep [P, Bm, Hm, BQ, BK], Bm in {1, B}, Hm in {1, Hkv * G}).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu_blas.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// exp is many times slower on arguments whose result underflows; every kept weight is far
// above e^-80 relative to its row's largest, and masked pairs are zeroed by their keep factor.
constexpr float kExpFloor = -80.0f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Tiles {
  const int64_t* row_ptr;
  const int64_t* tiles;
  const int64_t* partial;
  const float* keep;
  int64_t Bm, Hm, BQ, BK, max_run;

  const float* keep_tile(int64_t entry, int64_t b, int64_t h) const {
    const int64_t p = partial[entry];
    if (p < 0) return nullptr;
    return keep + ((p * Bm + (Bm > 1 ? b : 0)) * Hm + (Hm > 1 ? h : 0)) * BQ * BK;
  }

  // body(lo, width, keep_row) for each tile of the run [first, stop) of n columns, seen from
  // row r of the query block (batch entry b, head h): the tile's columns [lo, lo + width) of
  // the run, and its 0/1 factors for that row (nullptr: a full tile).
  template <typename F>
  void for_each_tile(int64_t first, int64_t stop, int64_t n, int64_t b, int64_t h, int64_t r,
                     F&& body) const {
    for (int64_t e = first; e < stop; ++e) {
      const float* factors = keep_tile(e, b, h);
      const int64_t lo = (tiles[e] - tiles[first]) * BK;
      body(lo, std::min(BK, n - lo), factors ? factors + r * BK : nullptr);
    }
  }
};

// A run: entries [first, stop) of one CSR row whose tiles are consecutive (one GEMM each way).
template <typename F>
void for_each_run(const Tiles& t, int64_t i, F&& body) {
  int64_t e = t.row_ptr[i];
  const int64_t end = t.row_ptr[i + 1];
  while (e < end) {
    int64_t stop = e + 1;
    while (stop < end && stop - e < t.max_run && t.tiles[stop] == t.tiles[stop - 1] + 1) ++stop;
    body(e, stop);
    e = stop;
  }
}

// A row's sum of weights, kept in a vector across a run's tiles and reduced once.
struct RowSum {
  Vec partial{0.0f};
  float tail = 0.0f;

  float value() const {
    return at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, partial) +
           tail;
  }
};

// p = exp(max(s - shift, floor)) · keep over n values in place (keep = nullptr: a full tile),
// added to `sum`. One pass: the exp, the tile's 0/1 factor and the row sum share each load.
inline void exp_keep_sum(float* s, const float* keep, int64_t n, float shift, RowSum& sum) {
  const Vec vshift(shift), vfloor(kExpFloor);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    Vec p = at::vec::maximum(Vec::loadu(s + c) - vshift, vfloor).exp_u20();
    if (keep) p = p * Vec::loadu(keep + c);
    p.store(s + c);
    sum.partial = sum.partial + p;
  }
  for (; c < n; ++c) {
    s[c] = std::exp(std::max(s[c] - shift, kExpFloor)) * (keep ? keep[c] : 1.0f);
    sum.tail += s[c];
  }
}

// The backward's per-pair step over n values in place: p = exp(s - lse) · keep (keep =
// nullptr: a full tile) into s, scale · dS = scale · p (dP - Δ) into ds (both gradients through
// the scores carry the scale). Kept pairs have s - lse <= 0; masked ones may be larger, hence
// the upper clamp before their factor zeroes them.
inline void probabilities_and_grads(float* s, float* ds, const float* keep, int64_t n,
                                    float lse, float delta, float scale) {
  const Vec vlse(lse), lo(kExpFloor), hi(-kExpFloor), vdelta(delta), vscale(scale);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    Vec p = at::vec::clamp(Vec::loadu(s + c) - vlse, lo, hi).exp_u20();
    if (keep) p = p * Vec::loadu(keep + c);
    p.store(s + c);
    ((Vec::loadu(ds + c) - vdelta) * (p * vscale)).store(ds + c);
  }
  for (; c < n; ++c) {
    s[c] = std::exp(std::clamp(s[c] - lse, kExpFloor, -kExpFloor)) * (keep ? keep[c] : 1.0f);
    ds[c] = (ds[c] - delta) * (s[c] * scale);
  }
}

inline float row_max(const float* s, int64_t n) {
  return at::vec::reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, s, n);
}

// Run `work(item, thread)` for items [0, n), each thread pulling the next item. Items are
// (head, query block) in order, so the threads work on neighbouring query blocks of one head
// at a time and share its keys and values in cache (largest-first ordering interleaved heads
// and ran causal T=32k 25% slower); the dynamic pull keeps the threads balanced.
template <typename F>
void run_items(int64_t n, F&& work) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int64_t thread = at::get_thread_num();
    for (int64_t item = next++; item < n; item = next++) work(item, thread);
  });
}

Tiles tiles_of(const at::Tensor& row_ptr, const at::Tensor& tiles, const at::Tensor& partial,
               const at::Tensor& keep, int64_t block_q, int64_t block_k, int64_t max_run) {
  return Tiles{row_ptr.data_ptr<int64_t>(), tiles.data_ptr<int64_t>(),
               partial.data_ptr<int64_t>(), keep.data_ptr<float>(), keep.size(1),
               keep.size(2), block_q, block_k, max_run};
}

// Sizes and row strides of one call: q [B, Tq, Hq, D], k [B, Tk, Hkv, D], v [B, Tk, Hkv, Dv]
// in their own layout (a row of one head is `ld` floats from the next), nq query blocks.
struct Dims {
  int64_t B, Tq, Hq, D, Tk, Hkv, Dv, G, nq, max_keys, ldq, ldk, ldv, ldo;
};

Dims dims_of(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Tiles& t) {
  const int64_t B = q.size(0), Tq = q.size(1), Hq = q.size(2), D = q.size(3);
  const int64_t Tk = k.size(1), Hkv = k.size(2), Dv = v.size(3);
  return Dims{B, Tq, Hq, D, Tk, Hkv, Dv, Hq / Hkv, (Tq + t.BQ - 1) / t.BQ, t.max_run * t.BK,
              Hq * D, Hkv * D, Hkv * Dv, Hq * Dv};
}

// One work item: query block i (rows r0 .. r0 + bq) of query head h (key/value head hkv) of
// batch entry b.
struct Work {
  int64_t i, b, h, hkv, r0, bq;
};

Work work_of(int64_t item, const Dims& d, const Tiles& t) {
  const int64_t i = item % d.nq, head = item / d.nq;  // head = b * Hq + h
  const int64_t h = head % d.Hq, r0 = i * t.BQ;
  return Work{i, head / d.Hq, h, h / d.G, r0, std::min(t.BQ, d.Tq - r0)};
}

// Kᵀ (or Vᵀ) as the second operand of the products S = Q Kᵀ and dP = dO Vᵀ: feature d of key
// j of head (b, hkv) at at(b, hkv, j)[d * inner_stride] (key_stride between keys), and the
// factor `alpha` the products still apply (the softmax scale, unless the operand carries it).
template <typename scalar_t>
struct Transposed {
  at::Tensor copy;  // undefined when the operand is the input read in place
  const scalar_t* data;
  int64_t batch_stride, head_stride, inner_stride, key_stride;
  float alpha;

  const scalar_t* at(int64_t b, int64_t hkv, int64_t key) const {
    return data + b * batch_stride + hkv * head_stride + key * key_stride;
  }
};

// dst[j, i] = src[i, j] for a row-major src [rows, n]; dst has row stride `rows`.
inline void transpose(const float* src, int64_t rows, int64_t n, float* dst) {
  constexpr int64_t kBlock = 16;  // a block's rows and columns stay in L1
  for (int64_t i0 = 0; i0 < rows; i0 += kBlock) {
    const int64_t i1 = std::min(rows, i0 + kBlock);
    for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
      const int64_t j1 = std::min(n, j0 + kBlock);
      for (int64_t i = i0; i < i1; ++i) {
        for (int64_t j = j0; j < j1; ++j) dst[j * rows + i] = src[i * n + j];
      }
    }
  }
}

// The three GEMM shapes of the forward and backward passes, on row-major float32 buffers and
// row-strided views of q, k, v, dO in the caller's layout (A, X: [rows, ld] of scalar_t):
//   products(S, A, Bᵀ):     S[rows, n] = alpha A[rows, inner] Bᵀ[inner, n]
//   accumulate(C, P, X):    C[rows, cols] += P[rows, n] X[n, cols]
//   accumulate_t(C, P, X):  C[n, cols] += P[rows, n]ᵀ X[rows, cols]
// Float32 through attnkit::matmul (oneDNN's brgemm, or BLAS), which takes no transposes: Kᵀ
// and Vᵀ are packed once per call, with the scale folded into Kᵀ, and Pᵀ per tile.
struct Float32Gemms {
  using scalar_t = float;
  std::vector<float> transposed_tile;

  Float32Gemms(int64_t rows, int64_t keys, int64_t) : transposed_tile(rows * keys) {}

  // x [B, Tk, Hkv, D] -> scale xᵀ [B, Hkv, D, ld]. The row stride ld is padded off a multiple
  // of 4 KB: with rows 2^k floats apart, a GEMM's reads of consecutive rows all fall in one L1
  // set (brgemm at T=8192: 212 GFLOP/s unpadded, 244 padded).
  static Transposed<float> transposed(const at::Tensor& x, float scale) {
    const int64_t B = x.size(0), Tk = x.size(1), H = x.size(2), D = x.size(3);
    const int64_t ld = (Tk + 15) / 16 * 16 + 16;
    constexpr int64_t kChunk = 64;  // keys per task: their D destination lines stay in cache
    const int64_t chunks = (Tk + kChunk - 1) / kChunk;
    auto copy = at::empty({B, H, D, ld}, x.options());
    const float* src = x.data_ptr<float>();
    float* dst = copy.data_ptr<float>();
    at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t head = task / chunks, j0 = task % chunks * kChunk;  // head = b * H + h
        const int64_t b = head / H, h = head % H;
        float* out = dst + head * D * ld;
        for (int64_t j = j0; j < std::min(Tk, j0 + kChunk); ++j) {
          const float* row = src + ((b * Tk + j) * H + h) * D;
          for (int64_t c = 0; c < D; ++c) out[c * ld + j] = row[c] * scale;
        }
      }
    });
    return {copy, dst, H * D * ld, D * ld, ld, 1, 1.0f};
  }

  void products(float* S, const float* a, int64_t lda, const Transposed<float>& bt, int64_t b,
                int64_t hkv, int64_t key0, int64_t rows, int64_t n, int64_t inner) {
    attnkit::matmul(rows, n, inner, a, lda, bt.at(b, hkv, key0), bt.inner_stride, S, n, false);
  }

  void accumulate(float* C, int64_t ldc, const float* P, const float* x, int64_t ldx,
                  int64_t rows, int64_t n, int64_t cols) {
    attnkit::matmul(rows, cols, n, P, n, x, ldx, C, ldc, true);
  }

  void accumulate_t(float* C, int64_t ldc, const float* P, const float* x, int64_t ldx,
                    int64_t rows, int64_t n, int64_t cols) {
    transpose(P, rows, n, transposed_tile.data());
    attnkit::matmul(n, cols, rows, transposed_tile.data(), rows, x, ldx, C, ldc, true);
  }
};

// The same GEMMs in bfloat16 through at::mm_out, which reaches oneDNN's bf16 kernels (2-3x
// float32 BLAS here); the BLAS-level bf16 entry points libtorch exports (MKL's
// gemm_bf16bf16f32, ATen's brgemm) run at float32 speed on CPUs without AMX. Views of the
// inputs in place; P is rounded to bfloat16 before its GEMM and each product is rounded to
// bfloat16 as any bf16 matmul's is, then widened: sums, accumulators and gradients stay in
// float32.
struct BFloat16Gemms {
  using scalar_t = at::BFloat16;
  at::Tensor P16, out16;

  // Buffers for products of up to `rows` x `keys` and outputs of up to `keys` x `cols`.
  BFloat16Gemms(int64_t rows, int64_t keys, int64_t cols) {
    const auto options = at::TensorOptions().dtype(at::kBFloat16);
    P16 = at::empty({rows * keys}, options);
    out16 = at::empty({std::max(rows, keys) * std::max(keys, cols)}, options);
  }

  static at::Tensor view(const at::BFloat16* data, at::IntArrayRef sizes,
                         at::IntArrayRef strides) {
    return at::from_blob(const_cast<at::BFloat16*>(data), sizes, strides,
                         at::TensorOptions().dtype(at::kBFloat16));
  }

  static at::Tensor rows_of(at::Tensor& buffer, int64_t rows, int64_t cols) {
    return buffer.narrow(0, 0, rows * cols).view({rows, cols});
  }

  // dst[r * ldc + c] (+)= alpha * out16[r, c] over a [rows, cols] product.
  void widen(float* dst, int64_t ldc, int64_t rows, int64_t cols, float alpha, bool add) {
    const at::BFloat16* o = out16.data_ptr<at::BFloat16>();
    for (int64_t r = 0; r < rows; ++r) {
      float* d = dst + r * ldc;
      const at::BFloat16* src = o + r * cols;
      if (add) {
        for (int64_t c = 0; c < cols; ++c) d[c] += alpha * static_cast<float>(src[c]);
      } else {
        for (int64_t c = 0; c < cols; ++c) d[c] = alpha * static_cast<float>(src[c]);
      }
    }
  }

  // x [B, Tk, Hkv, D] read in place as xᵀ; the products apply the scale.
  static Transposed<at::BFloat16> transposed(const at::Tensor& x, float scale) {
    const int64_t Tk = x.size(1), H = x.size(2), D = x.size(3);
    return {at::Tensor(), x.data_ptr<at::BFloat16>(), Tk * H * D, D, 1, H * D, scale};
  }

  void products(float* S, const at::BFloat16* a, int64_t lda,
                const Transposed<at::BFloat16>& bt, int64_t b, int64_t hkv, int64_t key0,
                int64_t rows, int64_t n, int64_t inner) {
    auto out = rows_of(out16, rows, n);
    at::mm_out(out, view(a, {rows, inner}, {lda, 1}),
               view(bt.at(b, hkv, key0), {inner, n}, {bt.inner_stride, bt.key_stride}));
    widen(S, n, rows, n, bt.alpha, false);
  }

  void accumulate(float* C, int64_t ldc, const float* P, const at::BFloat16* x, int64_t ldx,
                  int64_t rows, int64_t n, int64_t cols) {
    at::vec::convert(P, P16.data_ptr<at::BFloat16>(), rows * n);
    auto out = rows_of(out16, rows, cols);
    at::mm_out(out, rows_of(P16, rows, n), view(x, {n, cols}, {ldx, 1}));
    widen(C, ldc, rows, cols, 1.0f, true);
  }

  void accumulate_t(float* C, int64_t ldc, const float* P, const at::BFloat16* x, int64_t ldx,
                    int64_t rows, int64_t n, int64_t cols) {
    at::vec::convert(P, P16.data_ptr<at::BFloat16>(), rows * n);
    auto out = rows_of(out16, n, cols);
    at::mm_out(out, rows_of(P16, rows, n).t(), view(x, {rows, cols}, {ldx, 1}));
    widen(C, ldc, n, cols, 1.0f, true);
  }
};

// With `softmax` false the per-row steps between the GEMMs are skipped and the output is not
// attention: the time of the plan's GEMMs alone, which benchmarks report as the kernel's bound.
template <typename Gemms>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const Tiles& t, bool shifted, float scale, bool softmax, at::Tensor& out,
                    at::Tensor& lse) {
  using scalar_t = typename Gemms::scalar_t;
  const Dims d = dims_of(q, k, v, t);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const auto keys_t = Gemms::transposed(k, scale);
  const scalar_t* vp = v.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();

  const int64_t threads = at::get_num_threads();
  std::vector<std::vector<float>> scores(threads), acc(threads), rowmax(threads), sums(threads);
  std::vector<Gemms> gemms;
  for (int64_t thread = 0; thread < threads; ++thread) gemms.emplace_back(t.BQ, d.max_keys, d.Dv);
  run_items(d.B * d.Hq * d.nq, [&](int64_t item, int64_t thread) {
    const Work w = work_of(item, d, t);
    auto& S = scores[thread];
    auto& O = acc[thread];
    auto& M = rowmax[thread];
    auto& L = sums[thread];
    S.resize(t.BQ * d.max_keys);
    O.assign(w.bq * d.Dv, 0.0f);
    M.assign(w.bq, shifted ? kNegInf : 0.0f);
    L.assign(w.bq, 0.0f);
    const scalar_t* qi = qp + ((w.b * d.Tq + w.r0) * d.Hq + w.h) * d.D;
    const scalar_t* vb = vp + (w.b * d.Tk * d.Hkv + w.hkv) * d.Dv;

    for_each_run(t, w.i, [&](int64_t first, int64_t stop) {
      const int64_t c0 = t.tiles[first] * t.BK;
      const int64_t n = std::min(t.tiles[stop - 1] * t.BK + t.BK, d.Tk) - c0;
      // S[bq, n] = scale Q Kᵀ
      gemms[thread].products(S.data(), qi, d.ldq, keys_t, w.b, w.hkv, c0, w.bq, n, d.D);
      for (int64_t r = 0; softmax && r < w.bq; ++r) {
        float* s = S.data() + r * n;
        float shift = 0.0f;
        if (shifted) {
          t.for_each_tile(first, stop, n, w.b, w.h, r,
                          [&](int64_t lo, int64_t width, const float* keep) {
                            if (!keep) return;
                            for (int64_t c = 0; c < width; ++c) {
                              if (keep[c] == 0.0f) s[lo + c] = kNegInf;
                            }
                          });
          const float new_max = std::max(M[r], row_max(s, n));
          if (new_max == kNegInf) {  // nothing kept yet in this row
            std::fill(s, s + n, 0.0f);
            continue;
          }
          const float rescale = M[r] == kNegInf ? 0.0f : std::exp(M[r] - new_max);
          if (rescale != 1.0f) {
            L[r] *= rescale;
            for (int64_t c = 0; c < d.Dv; ++c) O[r * d.Dv + c] *= rescale;
          }
          M[r] = shift = new_max;
        }
        RowSum sum;
        t.for_each_tile(first, stop, n, w.b, w.h, r,
                        [&](int64_t lo, int64_t width, const float* keep) {
                          exp_keep_sum(s + lo, keep, width, shift, sum);
                        });
        L[r] += sum.value();
      }
      // O[bq, Dv] += P V
      gemms[thread].accumulate(O.data(), d.Dv, S.data(), vb + c0 * d.ldv, d.ldv, w.bq, n, d.Dv);
    });

    for (int64_t r = 0; r < w.bq; ++r) {
      const float inv = L[r] > 0.0f ? 1.0f / L[r] : 0.0f;
      const int64_t row = (w.b * d.Tq + w.r0 + r) * d.Hq + w.h;
      for (int64_t c = 0; c < d.Dv; ++c) {
        op[row * d.Dv + c] = static_cast<scalar_t>(O[r * d.Dv + c] * inv);
      }
      lp[row] = (M[r] == kNegInf ? 0.0f : M[r]) + std::log(L[r]);
    }
  });
}

// Gradients accumulate in float32 whatever the inputs' dtype: dq [B, Tq, Hq, D], and dK, dV
// in one buffer per thread (summed by the caller).
template <typename Gemms>
void backward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& grad_out, const at::Tensor& lse,
                     const at::Tensor& delta, const Tiles& t, float scale, at::Tensor& dq,
                     at::Tensor& dk_parts, at::Tensor& dv_parts) {
  using scalar_t = typename Gemms::scalar_t;
  const Dims d = dims_of(q, k, v, t);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const auto keys_t = Gemms::transposed(k, scale);
  const auto values_t = Gemms::transposed(v, 1.0f);
  const scalar_t* dop = grad_out.data_ptr<scalar_t>();
  const float* lp = lse.data_ptr<float>();
  const float* deltap = delta.data_ptr<float>();
  float* dqp = dq.data_ptr<float>();
  float* dkp = dk_parts.data_ptr<float>();
  float* dvp = dv_parts.data_ptr<float>();
  const int64_t part_k = d.B * d.Hkv * d.Tk * d.D, part_v = d.B * d.Hkv * d.Tk * d.Dv;

  const int64_t threads = at::get_num_threads();
  std::vector<std::vector<float>> scores(threads), dscores(threads);
  std::vector<Gemms> gemms;
  for (int64_t thread = 0; thread < threads; ++thread) {
    gemms.emplace_back(t.BQ, d.max_keys, std::max(d.D, d.Dv));
  }
  run_items(d.B * d.Hq * d.nq, [&](int64_t item, int64_t thread) {
    const Work w = work_of(item, d, t);
    auto& S = scores[thread];
    auto& dS = dscores[thread];
    auto& g = gemms[thread];
    S.resize(t.BQ * d.max_keys);
    dS.resize(t.BQ * d.max_keys);
    const int64_t row0 = (w.b * d.Tq + w.r0) * d.Hq + w.h;  // rows of lse and delta step by Hq
    const scalar_t* qi = qp + row0 * d.D;
    const scalar_t* doi = dop + row0 * d.Dv;
    float* dqi = dqp + row0 * d.D;
    const int64_t key0 = w.b * d.Tk * d.Hkv + w.hkv;
    const scalar_t* kb = kp + key0 * d.D;
    float* dkb = dkp + thread * part_k + key0 * d.D;
    float* dvb = dvp + thread * part_v + key0 * d.Dv;

    for_each_run(t, w.i, [&](int64_t first, int64_t stop) {
      const int64_t c0 = t.tiles[first] * t.BK;
      const int64_t n = std::min(t.tiles[stop - 1] * t.BK + t.BK, d.Tk) - c0;
      // S[bq, n] = scale Q Kᵀ;  dP[bq, n] = dO Vᵀ (becomes dS in place)
      g.products(S.data(), qi, d.ldq, keys_t, w.b, w.hkv, c0, w.bq, n, d.D);
      g.products(dS.data(), doi, d.ldo, values_t, w.b, w.hkv, c0, w.bq, n, d.Dv);
      for (int64_t r = 0; r < w.bq; ++r) {
        float* s = S.data() + r * n;
        float* ds = dS.data() + r * n;
        const float lse_r = lp[row0 + r * d.Hq], delta_r = deltap[row0 + r * d.Hq];
        t.for_each_tile(first, stop, n, w.b, w.h, r,
                        [&](int64_t lo, int64_t width, const float* keep) {
                          probabilities_and_grads(s + lo, ds + lo, keep, width, lse_r, delta_r,
                                                  scale);
                        });
      }
      // dV[n, Dv] += Pᵀ dO;  dQ[bq, D] += scale dS K;  dK[n, D] += scale dSᵀ Q
      g.accumulate_t(dvb + c0 * d.ldv, d.ldv, S.data(), doi, d.ldo, w.bq, n, d.Dv);
      g.accumulate(dqi, d.ldq, dS.data(), kb + c0 * d.ldk, d.ldk, w.bq, n, d.D);
      g.accumulate_t(dkb + c0 * d.ldk, d.ldk, dS.data(), qi, d.ldq, w.bq, n, d.D);
    });
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.device().is_cpu(), "blocksparse_cpu runs on CPU tensors");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "blocksparse_cpu needs contiguous q, k, v");
  const auto dtype = q.scalar_type();
  TORCH_CHECK(k.scalar_type() == dtype && v.scalar_type() == dtype,
              "blocksparse_cpu needs q, k, v of one dtype");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16,
              "blocksparse_cpu runs float32 or bfloat16 q, k, v");
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& row_ptr, const at::Tensor& tiles,
                                const at::Tensor& partial, const at::Tensor& keep,
                                int64_t block_q, int64_t block_k, int64_t max_run,
                                bool shifted, double scale, bool softmax) {
  check_inputs(q, k, v);
  const Tiles t = tiles_of(row_ptr, tiles, partial, keep, block_q, block_k, max_run);
  auto out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, v.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  if (q.scalar_type() == at::kBFloat16) {
    forward_kernel<BFloat16Gemms>(q, k, v, t, shifted, static_cast<float>(scale), softmax, out,
                                  lse);
  } else {
    forward_kernel<Float32Gemms>(q, k, v, t, shifted, static_cast<float>(scale), softmax, out,
                                 lse);
  }
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& grad_out, const at::Tensor& lse,
                                 const at::Tensor& delta, const at::Tensor& row_ptr,
                                 const at::Tensor& tiles, const at::Tensor& partial,
                                 const at::Tensor& keep, int64_t block_q, int64_t block_k,
                                 int64_t max_run, double scale) {
  check_inputs(q, k, v);
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && grad_out.is_contiguous(),
              "blocksparse_cpu's backward needs a contiguous grad_out of q's dtype");
  const Tiles t = tiles_of(row_ptr, tiles, partial, keep, block_q, block_k, max_run);
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t threads = at::get_num_threads();
  auto dq = at::zeros(q.sizes(), f32);
  auto dk = at::zeros({threads, k.size(0), k.size(1), k.size(2), k.size(3)}, f32);
  auto dv = at::zeros({threads, v.size(0), v.size(1), v.size(2), v.size(3)}, f32);
  if (q.scalar_type() == at::kBFloat16) {
    backward_kernel<BFloat16Gemms>(q, k, v, grad_out, lse, delta, t, static_cast<float>(scale),
                                   dq, dk, dv);
  } else {
    backward_kernel<Float32Gemms>(q, k, v, grad_out, lse, delta, t, static_cast<float>(scale), dq,
                                  dk, dv);
  }
  return {dq, dk.sum(0), dv.sum(0)};
}

// out = a b for float32 matrices with unit column stride (any row strides) through the GEMM
// the float32 kernel calls, in [256, 256] blocks of out over the threads and steps of 256 along
// k (a block's operands stay in L2): for benchmarks' throughput probe.
void matmul_into(const at::Tensor& a, const at::Tensor& b, at::Tensor& out) {
  TORCH_CHECK(a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat &&
                  out.scalar_type() == at::kFloat,
              "matmul_into takes float32 matrices");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && a.size(1) == b.size(0) &&
                  out.size(0) == a.size(0) && out.size(1) == b.size(1),
              "matmul_into needs a [m, k], b [k, n] and out [m, n]");
  TORCH_CHECK(a.stride(1) == 1 && b.stride(1) == 1 && out.stride(1) == 1,
              "matmul_into needs rows of consecutive elements");
  TORCH_CHECK(a.size(1) > 0, "matmul_into needs an inner size of at least 1");
  constexpr int64_t kBlock = 256;
  const int64_t m = a.size(0), n = b.size(1), k = a.size(1);
  const int64_t lda = a.stride(0), ldb = b.stride(0), ldo = out.stride(0);
  const int64_t col_blocks = (n + kBlock - 1) / kBlock;
  const float* ap = a.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, (m + kBlock - 1) / kBlock * col_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t r0 = block / col_blocks * kBlock, c0 = block % col_blocks * kBlock;
      const int64_t rows = std::min(kBlock, m - r0), cols = std::min(kBlock, n - c0);
      for (int64_t p0 = 0; p0 < k; p0 += kBlock) {
        attnkit::matmul(rows, cols, std::min(kBlock, k - p0), ap + r0 * lda + p0, lda,
                        bp + p0 * ldb + c0, ldb, op + r0 * ldo + c0, ldo, p0 > 0);
      }
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "block-sparse attention forward (CPU)");
  m.def("backward", &backward, "block-sparse attention backward (CPU)");
  m.def("float32_gemm", [] { return attnkit::brgemm_enabled().load() ? "brgemm" : "blas"; },
        "which GEMM the float32 kernel calls: 'brgemm' (oneDNN's, through ATen) or 'blas'");
  m.def("use_brgemm", [](bool on) { attnkit::brgemm_enabled() = on && attnkit::brgemm_works(); },
        "let the float32 kernel call brgemm where it works here (tests turn it off)");
  m.def("matmul_into", &matmul_into, "out = a b through the float32 kernel's GEMM");
}
