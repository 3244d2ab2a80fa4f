// Fused block-sparse FlashAttention-2 for the CPU, forward and backward, float32 and bfloat16.
//
// The Python module attnkit/backends/blocksparse.py states the algorithm; this file runs the
// same tiles with the per-row work (mask, exp, sums, rescale) done in cache between two GEMMs,
// as PyTorch's own CPU flash kernel does for dense attention, instead of as separate passes
// over memory. One work item = one query block of one query head, pulled from a shared
// counter in (head, block) order.
//
// Layouts: the caller's own (contiguous) q [B, Tq, Hq, D], k [B, Tk, Hkv, D],
// v [B, Tk, Hkv, Dv], read in place through GEMM leading dimensions, except where brgemm runs
// the GEMMs: it takes no transposes, so Kᵀ (and Vᵀ in the backward) is packed once per call,
// and in bfloat16 k and v are also packed in its VNNI layout (Operand, Slot); out [B, Tq, Hq,
// Dv], lse [B, Tq, Hq]. The mask's live tiles are a CSR over query blocks: row_ptr [nq + 1],
// tiles [nnz] (key-tile index, ascending per row), partial [nnz] (-1 for a full tile, else the
// index of its 0/1 keep tile in keep [P, Bm, Hm, BQ, BK], Bm in {1, B}, Hm in {1, Hkv * G}).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu_blas.h"

#include <algorithm>
#include <array>
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

// p = exp(max(scale · s - shift, floor)) · keep over n values in place (keep = nullptr: a full
// tile), added to `sum`. One pass: the exp, the tile's 0/1 factor and the row sum share each
// load.
inline void exp_keep_sum(float* s, const float* keep, int64_t n, float scale, float shift,
                         RowSum& sum) {
  const Vec vscale(scale), vshift(shift), vfloor(kExpFloor);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    Vec p = at::vec::maximum(at::vec::fmsub(Vec::loadu(s + c), vscale, vshift), vfloor).exp_u20();
    if (keep) p = p * Vec::loadu(keep + c);
    p.store(s + c);
    sum.partial = sum.partial + p;
  }
  for (; c < n; ++c) {
    s[c] = std::exp(std::max(s[c] * scale - shift, kExpFloor)) * (keep ? keep[c] : 1.0f);
    sum.tail += s[c];
  }
}

// s = scale · s over n values in place, masked pairs (keep = 0) set to -inf (keep = nullptr: a
// full tile); returns their largest.
inline float scale_mask_max(float* s, const float* keep, int64_t n, float scale) {
  const Vec vscale(scale), vmasked(kNegInf), zero(0.0f);
  Vec vmax(kNegInf);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    Vec x = Vec::loadu(s + c) * vscale;
    if (keep) x = Vec::blendv(x, vmasked, Vec::loadu(keep + c) == zero);
    x.store(s + c);
    vmax = at::vec::maximum(vmax, x);
  }
  float largest = at::vec::vec_reduce_all<float>(
      [](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
  for (; c < n; ++c) {
    s[c] = keep && keep[c] == 0.0f ? kNegInf : s[c] * scale;
    largest = std::max(largest, s[c]);
  }
  return largest;
}

// How a pair's score becomes its weight. kSoftmax: exp(x). kSigmoid: sigmoid(x + b), b the
// Score's parameter ("Theory, Analysis, and Best Practices for Sigmoid Self-Attention",
// Ramapuram et al., 2024).
// kSoftplus: softplus(c_i x), c_i a per-row factor (LSSA's log of the keys query i sees: "Softplus
// Attention with Re-weighting Boosts Length Extrapolation", Gao & Spratling, 2025). Sigmoid and
// softplus weights are final as computed (at most 1, or growing linearly), so their rows need
// no running max and no rescaling. Every weight returns out / Z and lse = log Z (Z a row's
// sum of weights); the caller rescales an unnormalised score's output by exp(lse).
// kCogPart: one half of Cog's signed weights ("More Expressive Attention with Negative Weights",
// Lv et al.): exp(|x|) on the keys whose score has the half's sign, 1/2 on zero scores, 0
// elsewhere, i.e. softmax over y = sign · x (> 0), -log 2 (= 0) or -inf; attnkit merges the
// two halves.
enum class Weight : int64_t { kSoftmax = 0, kSigmoid = 1, kSoftplus = 2, kCogPart = 3 };

// The scores' map: x = scale · s + bias, soft-capped (Gemma 2: cap · tanh(x / cap)) when
// softcap > 0, then weighted. The bias is a function of the head and the offset d = j - pos_i
// alone (ALiBi, KERPLE, T5 buckets, learned relative tables), given as `offset_bias` [Hq, L],
// L = Tq + Tk - 1, entry d + Tk - 1 (pos_i = i + Tk - Tq: queries aligned bottom-right), so the
// offsets of a row's consecutive keys are consecutive entries; nullptr: no bias.
// `row_factors` [Fb, Fh, Tq] (Fb in {1, B}, Fh in {1, Hq}) are softplus's c_i; nullptr: 1.
struct Score {
  float scale, softcap;
  Weight weight;
  float parameter;  // sigmoid's bias b; a Cog half's sign
  const float* offset_bias;
  int64_t bias_len;
  const float* row_factors;
  int64_t factor_batches, factor_heads, Tq;

  float row_factor(int64_t b, int64_t h, int64_t i) const {
    if (!row_factors) return 1.0f;
    const int64_t fb = factor_batches > 1 ? b : 0, fh = factor_heads > 1 ? h : 0;
    return row_factors[(fb * factor_heads + fh) * Tq + i];
  }

  // The entry of query row i's offset to key `key0` in head h's row of a [Hq, L] table.
  int64_t bias_entry(int64_t h, int64_t i, int64_t key0) const {
    return h * bias_len + key0 - i + Tq - 1;
  }
};

// s += bias / scale over n values in place (bias: a row's slice of the offset table): scale · s
// is then the biased score. Applied before the soft cap, as the bias is added before capping.
inline void add_offset_bias(float* s, const float* bias, int64_t n, float inv_scale) {
  at::vec::map2([inv_scale](Vec x, Vec b) { return at::vec::fmadd(b, Vec(inv_scale), x); }, s, s,
                bias, n);
}

// grad += ds / scale over n values (grad: a row's slice of the offset table's gradient).
inline void add_offset_grad(float* grad, const float* ds, int64_t n, float inv_scale) {
  at::vec::map2([inv_scale](Vec g, Vec d) { return at::vec::fmadd(d, Vec(inv_scale), g); }, grad,
                grad, ds, n);
}

// s -> (cap / scale) tanh(scale · s / cap) over n values in place: the row steps' scale · s is
// then the capped score, so they run unchanged. A no-op without a cap.
inline void soft_cap(float* s, int64_t n, const Score& score) {
  if (score.softcap <= 0.0f) return;
  const float inner = score.scale / score.softcap, outer = score.softcap / score.scale;
  at::vec::map([inner, outer](Vec x) { return (x * Vec(inner)).tanh() * Vec(outer); }, s, s, n);
}

// A Cog half's log-weights y = sign · x where positive, -log 2 where x = 0, else -inf, in place
// in the units of s (scale · s becomes y; the scale is positive).
inline void signed_part(float* s, int64_t n, const Score& score) {
  const float zero_weight = -std::log(2.0f) / score.scale;
  const Vec sign(score.parameter), vzero(0.0f), vhalf(zero_weight), vnone(kNegInf);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec own = Vec::loadu(s + c) * sign;
    Vec::blendv(Vec::blendv(vnone, vhalf, own == vzero), own, own > vzero).store(s + c);
  }
  for (; c < n; ++c) {
    const float own = s[c] * score.parameter;
    s[c] = own > 0.0f ? own : (own == 0.0f ? zero_weight : kNegInf);
  }
}

// The per-pair map before the weights, in place over a row's run of n keys (columns key0...):
// the offset bias, the soft cap, and a Cog half's signed part.
inline void biased_and_capped(float* s, int64_t n, int64_t head, int64_t row, int64_t key0,
                              const Score& score) {
  if (score.offset_bias) {
    add_offset_bias(s, score.offset_bias + score.bias_entry(head, row, key0), n,
                    1.0f / score.scale);
  }
  soft_cap(s, n, score);
  if (score.weight == Weight::kCogPart) signed_part(s, n, score);
}

// sigmoid(x) for a vector, its argument clamped where exp(-x) would overflow (the weight is
// then below 1e-34, added to sums of kept weights).
inline Vec sigmoid(const Vec& x) {
  const Vec one(1.0f);
  return one / (one + at::vec::minimum(Vec(0.0f) - x, Vec(-kExpFloor)).exp_u20());
}

inline float sigmoid(float x) { return 1.0f / (1.0f + std::exp(std::min(-x, -kExpFloor))); }

// softplus(y) = max(y, 0) + log1p(exp(-|y|)), exact for every y.
inline Vec softplus(const Vec& y) {
  return at::vec::maximum(y, Vec(0.0f)) + (Vec(0.0f) - y.abs()).exp_u20().log1p();
}

inline float softplus(float y) { return std::max(y, 0.0f) + std::log1p(std::exp(-std::abs(y))); }

// The final weights w(x) of one row, x = scale · s (sigmoid or softplus; `factor` is the row's
// softplus c_i), times keep, over n values in place (keep = nullptr: a full tile), added to
// `sum`.
inline void final_weights_keep_sum(float* s, const float* keep, int64_t n, const Score& score,
                                   float factor, RowSum& sum) {
  const bool sigmoid_weights = score.weight == Weight::kSigmoid;
  const float add = sigmoid_weights ? score.parameter : 0.0f;
  const float mul = sigmoid_weights ? score.scale : score.scale * factor;
  const Vec vmul(mul), vadd(add);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec y = at::vec::fmadd(Vec::loadu(s + c), vmul, vadd);
    Vec p = sigmoid_weights ? sigmoid(y) : softplus(y);
    if (keep) p = p * Vec::loadu(keep + c);
    p.store(s + c);
    sum.partial = sum.partial + p;
  }
  for (; c < n; ++c) {
    const float y = s[c] * mul + add;
    s[c] = (sigmoid_weights ? sigmoid(y) : softplus(y)) * (keep ? keep[c] : 1.0f);
    sum.tail += s[c];
  }
}

// The backward's per-pair step over n values in place, on scores x = scale · s (s biased and
// capped first): the normalised weight P = w / Z into s, and the gradient with respect to the
// raw product into ds: scale · (dP - Δ) · (dw/dx) / Z · (1 - (x / cap)^2), the last factor
// tanh's derivative (1 without a cap). Softmax: w = exp(x), P = exp(x - lse), (dw/dx) / Z = P.
// Sigmoid: w = sigmoid(x + b), P = w exp(-lse), (dw/dx) / Z = P (1 - w). Softplus: w =
// softplus(c x), P = w exp(-lse), (dw/dx) / Z = c sigmoid(c x) exp(-lse). A Cog half, on its
// y (signed_part): P = exp(y - lse), (dw/dx) / Z = P · sign where y > 0 (0 elsewhere: its
// log-weight is constant there), and |x| = y for the cap's factor. Kept softmax pairs have
// x - lse <= 0; masked ones may be larger, hence the upper clamp before their factor zeroes
// them.
inline void probabilities_and_grads(float* s, float* ds, const float* keep, int64_t n,
                                    float lse, float delta, const Score& score, float factor) {
  const float inv_cap = score.softcap > 0.0f ? 1.0f / score.softcap : 0.0f;
  const Vec vlse(lse), lo(kExpFloor), hi(-kExpFloor), vdelta(delta), vscale(score.scale);
  const Vec vinv_cap(inv_cap), one(1.0f);
  const float inv_z = std::exp(-lse);
  const Vec vinv_z(inv_z), vbias(score.parameter), vfactor(factor), vzero(0.0f);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec x = Vec::loadu(s + c) * vscale;
    Vec capped = x * vinv_cap;
    const Vec kept = keep ? Vec::loadu(keep + c) : one;
    Vec p, dw;  // dw: (dw/dx) / Z
    switch (score.weight) {
      case Weight::kSigmoid: {
        const Vec w = sigmoid(x + vbias) * kept;
        p = w * vinv_z;
        dw = p * (one - w);
        break;
      }
      case Weight::kSoftplus: {
        const Vec y = x * vfactor;
        p = softplus(y) * kept * vinv_z;
        dw = sigmoid(y) * vfactor * kept * vinv_z;
        break;
      }
      case Weight::kCogPart:  // y = -inf or -log 2 off the half: no gradient, no cap factor
        p = at::vec::clamp(x - vlse, lo, hi).exp_u20() * kept;
        dw = Vec::blendv(vzero, p * vbias, x > vzero);
        capped = Vec::blendv(vzero, capped, x > vzero);
        break;
      default:
        p = at::vec::clamp(x - vlse, lo, hi).exp_u20() * kept;
        dw = p;
    }
    p.store(s + c);
    ((Vec::loadu(ds + c) - vdelta) * (dw * vscale) * (one - capped * capped)).store(ds + c);
  }
  for (; c < n; ++c) {
    const float x = s[c] * score.scale;
    float capped = x * inv_cap;
    const float kept = keep ? keep[c] : 1.0f;
    float dw;
    switch (score.weight) {
      case Weight::kSigmoid: {
        const float w = sigmoid(x + score.parameter) * kept;
        s[c] = w * inv_z;
        dw = s[c] * (1.0f - w);
        break;
      }
      case Weight::kSoftplus: {
        const float y = x * factor;
        s[c] = softplus(y) * kept * inv_z;
        dw = sigmoid(y) * factor * kept * inv_z;
        break;
      }
      case Weight::kCogPart:
        s[c] = std::exp(std::clamp(x - lse, kExpFloor, -kExpFloor)) * kept;
        dw = x > 0.0f ? s[c] * score.parameter : 0.0f;
        capped = x > 0.0f ? capped : 0.0f;
        break;
      default:
        s[c] = std::exp(std::clamp(x - lse, kExpFloor, -kExpFloor)) * kept;
        dw = s[c];
    }
    ds[c] = (ds[c] - delta) * (dw * score.scale) * (1.0f - capped * capped);
  }
}

// Run `work(item, thread)` for items [0, n), each thread pulling the next item, then releasing
// its GEMM state. Items are (head, query block) in order, so the threads work on neighbouring
// query blocks of one head at a time and share its keys and values in cache (largest-first
// ordering interleaved heads and ran slower); the dynamic pull keeps the threads balanced.
template <typename Gemms, typename F>
void run_items(int64_t n, std::vector<Gemms>& gemms, F&& work) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    const int64_t thread = at::get_thread_num();
    for (int64_t item = next++; item < n; item = next++) work(item, thread);
    gemms[thread].release();
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

// A per-call GEMM operand made from k or v [B, Tk, Hkv, ·]: key j of head (b, hkv) starts at
// at(b, hkv, j), consecutive keys key_stride apart, and `ld` is the leading dimension the
// owning Gemms passes for it. `copy` holds a packed layout; undefined, the input is read in
// place.
template <typename scalar_t>
struct Operand {
  at::Tensor copy;
  const scalar_t* data;
  int64_t batch_stride, head_stride, key_stride, ld;

  const scalar_t* at(int64_t b, int64_t hkv, int64_t key) const {
    return data + b * batch_stride + hkv * head_stride + key * key_stride;
  }
};

template <typename scalar_t>
Operand<scalar_t> in_place(const at::Tensor& x) {
  const int64_t Tk = x.size(1), H = x.size(2), D = x.size(3);
  return {at::Tensor(), x.data_ptr<scalar_t>(), Tk * H * D, D, H * D, H * D};
}

// Storage for packed operands, one buffer per slot, reused across the calls of one calling
// thread: a fresh buffer of a few MB costs its page faults on first touch, many times the cost
// of rewriting it and as much as the packing itself. Buffers up to kReuseMax bytes are kept
// (at most three per calling thread, freed when it exits); larger ones are allocated per call.
enum Slot { kKeysT, kValuesT, kRows, kSlots };

inline at::Tensor scratch(Slot slot, at::IntArrayRef sizes, at::ScalarType dtype) {
  constexpr int64_t kReuseMax = int64_t{64} << 20;
  thread_local std::array<at::Tensor, kSlots> kept;
  const int64_t bytes =
      c10::multiply_integers(sizes) * static_cast<int64_t>(c10::elementSize(dtype));
  if (bytes > kReuseMax) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  at::Tensor& buffer = kept[slot];
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, at::kByte);
  return buffer.narrow(0, 0, bytes).view(dtype).view(sizes);
}

// Packed Kᵀ holds keys in blocks of kKeyBlock, and each product covers one block (or the
// sequence's last, shorter one): oneDNN compiles a kernel for each new GEMM shape, leading
// dimensions included, and ATen keeps them all, so the shapes must come from a bounded set (a
// Kᵀ whose row stride followed Tk, with products as wide as each run, would compile new kernels
// for every sequence length, every decoding step): M up to the query tile, N a block or less,
// K and the strides fixed by the call's head sizes; accumulate's inner size is a run's width,
// at most the kernel's MAX_KEYS.
constexpr int64_t kKeyBlock = 64;

// x [B, Tk, H, D] of 4-byte elements -> [B, H, blocks, D, kKeyBlock]: dst[b, h, j / 64, c,
// j % 64] = x[b, j, h, c], one block per task over the threads (a block's lines stay in cache).
inline void transpose_keys(const float* src, int64_t B, int64_t Tk, int64_t H, int64_t D,
                           float* dst) {
  const int64_t blocks = (Tk + kKeyBlock - 1) / kKeyBlock;
  at::parallel_for(0, B * H * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / blocks, j0 = task % blocks * kKeyBlock;  // head = b * H + h
      const int64_t b = head / H, h = head % H, keys = std::min(kKeyBlock, Tk - j0);
      at::vec::transpose_mxn<float>(src + ((b * Tk + j0) * H + h) * D, H * D,
                                    dst + task * D * kKeyBlock, kKeyBlock, keys, D);
    }
  });
}

// body(j, width) for the key blocks [j, j + width) of a run of n keys.
template <typename F>
void for_each_key_block(int64_t n, F&& body) {
  for (int64_t j = 0; j < n; j += kKeyBlock) body(j, std::min(kKeyBlock, n - j));
}

// The three GEMM shapes of the forward and backward passes, on the per-thread score buffers
// (rows of `lds` floats), the per-call operands keys_t(x) = xᵀ and rows(x) = x made from k or
// v, and row-strided views of q and dO in the caller's layout (A, X: [rows, ld] of scalar_t):
//   products(S, A, keys_t(x)):  S[rows, n] = A[rows, inner] xᵀ[inner, n]
//   accumulate(C, P, rows(x)):  C[rows, cols] += P[rows, n] x[n, cols]
//   accumulate_t(C, P, X):      C[n, cols] += P[rows, n]ᵀ X[rows, cols]
// Float32 through attnkit::matmul (oneDNN's brgemm, or BLAS), which takes no transposes: Kᵀ
// and Vᵀ are packed once per call (when `pack`: enough queries share each key to repay the
// copy; otherwise BLAS reads k in place), and Pᵀ once per tile.
struct Float32Gemms {
  using scalar_t = float;
  int64_t row_capacity, lds;
  std::vector<float> transposed_tile;

  // Score buffers of up to `rows` x `keys` (the row stride).
  Float32Gemms(int64_t rows, int64_t keys, int64_t)
      : row_capacity(rows), lds(keys), transposed_tile(rows * keys) {}

  static Operand<float> keys_t(const at::Tensor& x, bool pack, Slot slot) {
    if (!pack) return in_place<float>(x);
    const int64_t B = x.size(0), Tk = x.size(1), H = x.size(2), D = x.size(3);
    const int64_t blocks = (Tk + kKeyBlock - 1) / kKeyBlock;
    auto copy = scratch(slot, {B, H, blocks, D, kKeyBlock}, at::kFloat);
    transpose_keys(x.data_ptr<float>(), B, Tk, H, D, copy.data_ptr<float>());
    return {copy, copy.data_ptr<float>(), H * blocks * D * kKeyBlock, blocks * D * kKeyBlock,
            D, kKeyBlock};
  }

  static Operand<float> rows(const at::Tensor& x, Slot) { return in_place<float>(x); }

  void products(float* S, const float* a, int64_t lda, const Operand<float>& xt, int64_t b,
                int64_t hkv, int64_t key0, int64_t rows, int64_t n, int64_t inner) {
    if (!xt.copy.defined()) {
      attnkit::gemm_rows(false, true, rows, n, inner, 1.0f, a, lda, xt.at(b, hkv, key0), xt.ld,
                         0.0f, S, lds);
      return;
    }
    for_each_key_block(n, [&](int64_t j, int64_t width) {
      attnkit::matmul(rows, width, inner, a, lda, xt.at(b, hkv, key0 + j), xt.ld, S + j, lds,
                      false);
    });
  }

  void accumulate(float* C, int64_t ldc, const float* P, const Operand<float>& x, int64_t b,
                  int64_t hkv, int64_t key0, int64_t rows, int64_t n, int64_t cols) {
    attnkit::matmul(rows, cols, n, P, lds, x.at(b, hkv, key0), x.ld, C, ldc, true);
  }

  void accumulate_t(float* C, int64_t ldc, const float* P, const float* x, int64_t ldx,
                    int64_t rows, int64_t n, int64_t cols) {
    const int64_t ldt = row_capacity;  // Pᵀ's row stride: one for every block of rows
    at::vec::transpose_mxn<float>(P, lds, transposed_tile.data(), ldt, rows, n);
    for_each_key_block(n, [&](int64_t j, int64_t width) {
      attnkit::matmul(width, cols, rows, transposed_tile.data() + j * ldt, ldt, x, ldx,
                      C + j * ldc, ldc, true);
    });
  }

  void release() {}
};

// The same GEMMs in bfloat16 through at::mm_out (oneDNN's matmul primitive), on views of the
// inputs in place; the fallback where bfloat16 brgemm does not run (BFloat16Brgemm). P is
// rounded to bfloat16 before its GEMM and each product is rounded to bfloat16 as any bf16
// matmul's is, then widened: sums, accumulators and gradients stay in float32.
struct BFloat16Gemms {
  using scalar_t = at::BFloat16;
  int64_t lds;
  at::Tensor P16, out16;

  // Score buffers of up to `rows` x `keys` (the row stride), outputs up to `keys` x `cols`.
  BFloat16Gemms(int64_t rows, int64_t keys, int64_t cols) : lds(keys) {
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

  // dst[r * ldc + c] (+)= out16[r, c] over a [rows, cols] product.
  void widen(float* dst, int64_t ldc, int64_t rows, int64_t cols, bool add) {
    const at::BFloat16* o = out16.data_ptr<at::BFloat16>();
    for (int64_t r = 0; r < rows; ++r) {
      float* d = dst + r * ldc;
      const at::BFloat16* src = o + r * cols;
      if (add) {
        for (int64_t c = 0; c < cols; ++c) d[c] += static_cast<float>(src[c]);
      } else {
        for (int64_t c = 0; c < cols; ++c) d[c] = static_cast<float>(src[c]);
      }
    }
  }

  // P [rows, n] (rows lds apart) rounded to bfloat16, rows n apart.
  at::Tensor rounded(const float* P, int64_t rows, int64_t n) {
    at::BFloat16* dst = P16.data_ptr<at::BFloat16>();
    for (int64_t r = 0; r < rows; ++r) at::vec::convert(P + r * lds, dst + r * n, n);
    return rows_of(P16, rows, n);
  }

  static Operand<at::BFloat16> keys_t(const at::Tensor& x, bool, Slot) {
    return in_place<at::BFloat16>(x);
  }

  static Operand<at::BFloat16> rows(const at::Tensor& x, Slot) {
    return in_place<at::BFloat16>(x);
  }

  void products(float* S, const at::BFloat16* a, int64_t lda, const Operand<at::BFloat16>& xt,
                int64_t b, int64_t hkv, int64_t key0, int64_t rows, int64_t n, int64_t inner) {
    auto out = rows_of(out16, rows, n);
    at::mm_out(out, view(a, {rows, inner}, {lda, 1}),
               view(xt.at(b, hkv, key0), {inner, n}, {1, xt.ld}));
    widen(S, lds, rows, n, false);
  }

  void accumulate(float* C, int64_t ldc, const float* P, const Operand<at::BFloat16>& x,
                  int64_t b, int64_t hkv, int64_t key0, int64_t rows, int64_t n, int64_t cols) {
    auto out = rows_of(out16, rows, cols);
    at::mm_out(out, rounded(P, rows, n), view(x.at(b, hkv, key0), {n, cols}, {x.ld, 1}));
    widen(C, ldc, rows, cols, true);
  }

  void accumulate_t(float* C, int64_t ldc, const float* P, const at::BFloat16* x, int64_t ldx,
                    int64_t rows, int64_t n, int64_t cols) {
    auto out = rows_of(out16, n, cols);
    at::mm_out(out, rounded(P, rows, n).t(), view(x, {rows, cols}, {ldx, 1}));
    widen(C, ldc, n, cols, true);
  }

  void release() {}
};

#ifdef CPUBLAS_BRGEMM_BF16BF16F32
// One VNNI row pair: out[c] = (even[c], odd[c]) as one 32-bit word for c < C, odd = nullptr
// for the zero row padding an odd count (a loop the compiler vectorises).
inline void interleave(const at::BFloat16* even, const at::BFloat16* odd, at::BFloat16* out,
                       int64_t C) {
  const auto* e = reinterpret_cast<const uint16_t*>(even);
  const auto* o = reinterpret_cast<const uint16_t*>(odd);
  auto* pairs = reinterpret_cast<uint32_t*>(out);
  if (o == nullptr) {
    for (int64_t c = 0; c < C; ++c) pairs[c] = e[c];
  } else {
    for (int64_t c = 0; c < C; ++c) pairs[c] = e[c] | uint32_t{o[c]} << 16;
  }
}

// src [lines, width] (rows ld apart) rounded to bfloat16 into dst (the same strides), an odd
// width padded with a zero column: the inner size of a VNNI product must be even. Returns
// the padded width.
inline int64_t to_bfloat16_even(const float* src, at::BFloat16* dst, int64_t ld, int64_t lines,
                                int64_t width) {
  const int64_t even = width + width % 2;
  for (int64_t r = 0; r < lines; ++r) {
    at::vec::convert(src + r * ld, dst + r * ld, width);
    if (even != width) dst[r * ld + width] = at::BFloat16(0.0f);
  }
  return even;
}

// The GEMMs in bfloat16 through oneDNN's bf16 brgemm (attnkit::matmul_vnni, ~2x float32
// brgemm; oneDNN's matmul primitive costs microseconds per call, which small tiles feel), for
// even D and Dv. Its B operands are packed once per call in VNNI layout (pairs of rows
// interleaved): keys_t(x) as xᵀ's feature pairs in blocks of kKeyBlock keys (a transpose of
// x's 4-byte pairs), rows(x) as key pairs, a zero key padding an odd Tk. Products stay float32
// (brgemm accumulates and returns float32); P is rounded to bfloat16 before its GEMM.
struct BFloat16Brgemm {
  using scalar_t = at::BFloat16;
  int64_t row_capacity, lds;
  std::vector<at::BFloat16> P16, PT16, x_pairs;
  std::vector<float> transposed;

  // Score buffers of up to `rows` (even: a tile height) x `keys` (the row stride), X up to
  // `rows` x `cols`.
  BFloat16Brgemm(int64_t rows, int64_t keys, int64_t cols)
      : row_capacity(rows),
        lds(keys),
        P16(rows * keys),
        PT16(keys * rows),
        x_pairs(rows * cols),
        transposed(keys * rows) {}

  static Operand<at::BFloat16> keys_t(const at::Tensor& x, bool, Slot slot) {
    const int64_t B = x.size(0), Tk = x.size(1), H = x.size(2), D = x.size(3);
    const int64_t blocks = (Tk + kKeyBlock - 1) / kKeyBlock;
    auto copy = scratch(slot, {B, H, blocks, D / 2, kKeyBlock, 2}, at::kBFloat16);
    transpose_keys(reinterpret_cast<const float*>(x.data_ptr<at::BFloat16>()), B, Tk, H, D / 2,
                   reinterpret_cast<float*>(copy.data_ptr<at::BFloat16>()));
    return {copy, copy.data_ptr<at::BFloat16>(), H * blocks * D * kKeyBlock,
            blocks * D * kKeyBlock, D, kKeyBlock};
  }

  // x [B, Tk, H, C] -> [B, H, ceil(Tk / 2), C, 2]: out[b, h, j / 2, c, j % 2] = x[b, j, h, c].
  static Operand<at::BFloat16> rows(const at::Tensor& x, Slot slot) {
    const int64_t B = x.size(0), Tk = x.size(1), H = x.size(2), C = x.size(3);
    const int64_t pairs = (Tk + 1) / 2;
    auto copy = scratch(slot, {B, H, pairs, C, 2}, at::kBFloat16);
    const at::BFloat16* src = x.data_ptr<at::BFloat16>();
    at::BFloat16* dst = copy.data_ptr<at::BFloat16>();
    at::parallel_for(0, B * H * pairs, 64, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t head = task / pairs, j = task % pairs * 2, b = head / H, h = head % H;
        const at::BFloat16* even = src + ((b * Tk + j) * H + h) * C;
        interleave(even, j + 1 < Tk ? even + H * C : nullptr, dst + task * C * 2, C);
      }
    });
    return {copy, dst, H * pairs * C * 2, pairs * C * 2, C, C};
  }

  void products(float* S, const at::BFloat16* a, int64_t lda, const Operand<at::BFloat16>& xt,
                int64_t b, int64_t hkv, int64_t key0, int64_t rows, int64_t n, int64_t inner) {
    for_each_key_block(n, [&](int64_t j, int64_t width) {
      attnkit::matmul_vnni(rows, width, inner, a, lda, xt.at(b, hkv, key0 + j), xt.ld, S + j,
                           lds, false);
    });
  }

  // P rounded to bfloat16; a run of odd width (one that ends at an odd Tk) gets a zero column
  // to meet rows(x)'s zero key.
  void accumulate(float* C, int64_t ldc, const float* P, const Operand<at::BFloat16>& x,
                  int64_t b, int64_t hkv, int64_t key0, int64_t rows, int64_t n, int64_t cols) {
    const int64_t even = to_bfloat16_even(P, P16.data(), lds, rows, n);
    attnkit::matmul_vnni(rows, cols, even, P16.data(), lds, x.at(b, hkv, key0), x.ld, C, ldc,
                         true);
  }

  // Pᵀ rounded to bfloat16 (rows row_capacity apart, an odd row count padded with a zero
  // column) against X's rows packed in VNNI pairs (a zero row padding an odd count).
  void accumulate_t(float* C, int64_t ldc, const float* P, const at::BFloat16* x, int64_t ldx,
                    int64_t rows, int64_t n, int64_t cols) {
    const int64_t ldt = row_capacity;
    at::vec::transpose_mxn<float>(P, lds, transposed.data(), ldt, rows, n);
    const int64_t even = to_bfloat16_even(transposed.data(), PT16.data(), ldt, n, rows);
    for (int64_t r = 0; r < rows; r += 2) {
      interleave(x + r * ldx, r + 1 < rows ? x + (r + 1) * ldx : nullptr,
                 x_pairs.data() + r * cols, cols);
    }
    for_each_key_block(n, [&](int64_t j, int64_t width) {
      attnkit::matmul_vnni(width, cols, even, PT16.data() + j * ldt, ldt, x_pairs.data(), cols,
                           C + j * ldc, ldc, true);
    });
  }

  // AMX tile state is per thread; a no-op elsewhere.
  void release() { at::native::cpublas::brgemm_release(true); }
};
#endif

// With `weights` false the per-row steps between the GEMMs are skipped and the output is not
// attention: the time of the plan's GEMMs alone, which benchmarks report as the kernel's bound.
// Sigmoid and softplus weights run unshifted (they are final as computed).
template <typename Gemms>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const Tiles& t, bool shifted, const Score& score, bool weights, bool pack,
                    at::Tensor& out, at::Tensor& lse) {
  using scalar_t = typename Gemms::scalar_t;
  const Dims d = dims_of(q, k, v, t);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const auto keys_t = Gemms::keys_t(k, pack, kKeysT);
  const auto values = Gemms::rows(v, kRows);
  scalar_t* op = out.data_ptr<scalar_t>();
  float* lp = lse.data_ptr<float>();

  const int64_t threads = at::get_num_threads();
  std::vector<std::vector<float>> scores(threads), acc(threads), rowmax(threads), sums(threads);
  std::vector<Gemms> gemms;
  for (int64_t thread = 0; thread < threads; ++thread) gemms.emplace_back(t.BQ, d.max_keys, d.Dv);
  run_items(d.B * d.Hq * d.nq, gemms, [&](int64_t item, int64_t thread) {
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

    for_each_run(t, w.i, [&](int64_t first, int64_t stop) {
      const int64_t c0 = t.tiles[first] * t.BK;
      const int64_t n = std::min(t.tiles[stop - 1] * t.BK + t.BK, d.Tk) - c0;
      // S[bq, n] = Q Kᵀ (the row steps apply the scale)
      gemms[thread].products(S.data(), qi, d.ldq, keys_t, w.b, w.hkv, c0, w.bq, n, d.D);
      for (int64_t r = 0; weights && r < w.bq; ++r) {
        float* s = S.data() + r * d.max_keys;
        biased_and_capped(s, n, w.h, w.r0 + r, c0, score);
        if (score.weight == Weight::kSigmoid || score.weight == Weight::kSoftplus) {
          // final weights: no max, no rescaling
          const float factor = score.row_factor(w.b, w.h, w.r0 + r);
          RowSum sum;
          t.for_each_tile(first, stop, n, w.b, w.h, r,
                          [&](int64_t lo, int64_t width, const float* keep) {
                            final_weights_keep_sum(s + lo, keep, width, score, factor, sum);
                          });
          L[r] += sum.value();
          continue;
        }
        const float scale = score.scale;
        float shift = 0.0f, exp_scale = scale;
        if (shifted) {
          float run_max = kNegInf;
          t.for_each_tile(first, stop, n, w.b, w.h, r,
                          [&](int64_t lo, int64_t width, const float* keep) {
                            run_max = std::max(run_max, scale_mask_max(s + lo, keep, width, scale));
                          });
          exp_scale = 1.0f;  // s now holds scaled scores
          const float new_max = std::max(M[r], run_max);
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
                          exp_keep_sum(s + lo, keep, width, exp_scale, shift, sum);
                        });
        L[r] += sum.value();
      }
      // O[bq, Dv] += P V
      gemms[thread].accumulate(O.data(), d.Dv, S.data(), values, w.b, w.hkv, c0, w.bq, n, d.Dv);
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
                     const at::Tensor& delta, const Tiles& t, const Score& score, bool pack,
                     at::Tensor& dq, at::Tensor& dk_parts, at::Tensor& dv_parts,
                     float* dbias_parts) {
  using scalar_t = typename Gemms::scalar_t;
  const Dims d = dims_of(q, k, v, t);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const auto keys_t = Gemms::keys_t(k, pack, kKeysT);
  const auto values_t = Gemms::keys_t(v, pack, kValuesT);
  const auto keys = Gemms::rows(k, kRows);
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
  run_items(d.B * d.Hq * d.nq, gemms, [&](int64_t item, int64_t thread) {
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
    float* dkb = dkp + thread * part_k + key0 * d.D;
    float* dvb = dvp + thread * part_v + key0 * d.Dv;

    for_each_run(t, w.i, [&](int64_t first, int64_t stop) {
      const int64_t c0 = t.tiles[first] * t.BK;
      const int64_t n = std::min(t.tiles[stop - 1] * t.BK + t.BK, d.Tk) - c0;
      // S[bq, n] = Q Kᵀ;  dP[bq, n] = dO Vᵀ (becomes the raw products' gradient in place)
      g.products(S.data(), qi, d.ldq, keys_t, w.b, w.hkv, c0, w.bq, n, d.D);
      g.products(dS.data(), doi, d.ldo, values_t, w.b, w.hkv, c0, w.bq, n, d.Dv);
      for (int64_t r = 0; r < w.bq; ++r) {
        float* s = S.data() + r * d.max_keys;
        float* ds = dS.data() + r * d.max_keys;
        const float lse_r = lp[row0 + r * d.Hq], delta_r = deltap[row0 + r * d.Hq];
        const float factor = score.row_factor(w.b, w.h, w.r0 + r);
        biased_and_capped(s, n, w.h, w.r0 + r, c0, score);
        t.for_each_tile(first, stop, n, w.b, w.h, r,
                        [&](int64_t lo, int64_t width, const float* keep) {
                          probabilities_and_grads(s + lo, ds + lo, keep, width, lse_r, delta_r,
                                                  score, factor);
                        });
        if (dbias_parts) {  // d bias = ds / scale, summed per (head, offset)
          float* grad = dbias_parts + thread * d.Hq * score.bias_len;
          add_offset_grad(grad + score.bias_entry(w.h, w.r0 + r, c0), ds, n, 1.0f / score.scale);
        }
      }
      // dV[n, Dv] += Pᵀ dO;  dQ[bq, D] += (scale dS) K;  dK[n, D] += (scale dS)ᵀ Q
      g.accumulate_t(dvb + c0 * d.ldv, d.ldv, S.data(), doi, d.ldo, w.bq, n, d.Dv);
      g.accumulate(dqi, d.ldq, dS.data(), keys, w.b, w.hkv, c0, w.bq, n, d.D);
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

// Packing Kᵀ is a pass over all of k (and v). In float32 it is repaid when at least 64 query
// rows per key head share each key; bfloat16's brgemm beats oneDNN's matmul primitive even for
// one row, so bfloat16 always packs (timings: docs/kernels.md).
constexpr int64_t kPackMinQueries = 64;

bool worth_packing(const at::Tensor& q, const at::Tensor& k) {
  return q.scalar_type() == at::kBFloat16 || q.size(1) * (q.size(2) / k.size(2)) >= kPackMinQueries;
}

// bfloat16 brgemm runs here, and D and Dv are even (its VNNI layout pairs features and keys).
bool bfloat16_brgemm_runs(const at::Tensor& q, const at::Tensor& v) {
  return attnkit::brgemm_enabled().bfloat16 && q.size(3) % 2 == 0 && v.size(3) % 2 == 0;
}

// softcap 0: none. A cap is applied as (cap / scale) tanh(scale · s / cap) (soft_cap). weight:
// Weight's values. offset_bias: the [Hq, Tq + Tk - 1] float32 bias by head and offset (Score),
// or an empty tensor for no bias. row_factors: softplus's [Fb, Fh, Tq] float32 factors, or an
// empty tensor for 1.
Score score_of(const at::Tensor& q, const at::Tensor& k, double scale, double softcap,
               int64_t weight, double parameter, const at::Tensor& offset_bias,
               const at::Tensor& row_factors) {
  TORCH_CHECK(softcap >= 0.0, "blocksparse_cpu: softcap must be > 0 (0: none), got ", softcap);
  TORCH_CHECK(softcap == 0.0 || scale > 0.0,
              "blocksparse_cpu: a soft cap needs a positive scale, got ", scale);
  TORCH_CHECK(weight >= 0 && weight <= 3, "blocksparse_cpu: weight must be 0 (softmax), 1 "
              "(sigmoid), 2 (softplus) or 3 (a Cog half), got ", weight);
  TORCH_CHECK(weight != 3 || ((parameter == 1.0 || parameter == -1.0) && scale > 0.0),
              "blocksparse_cpu: a Cog half needs a sign of 1 or -1 and a positive scale");
  const int64_t Tq = q.size(1), bias_len = q.size(1) + k.size(1) - 1;
  const bool biased = offset_bias.numel() > 0;
  TORCH_CHECK(!biased || (offset_bias.scalar_type() == at::kFloat &&
                          offset_bias.is_contiguous() && offset_bias.dim() == 2 &&
                          offset_bias.size(0) == q.size(2) && offset_bias.size(1) == bias_len),
              "blocksparse_cpu: offset_bias must be contiguous float32 [Hq, Tq + Tk - 1]");
  TORCH_CHECK(!biased || scale > 0.0, "blocksparse_cpu: a bias needs a positive scale, got ",
              scale);
  const bool factored = row_factors.numel() > 0;
  TORCH_CHECK(!factored || (row_factors.scalar_type() == at::kFloat &&
                            row_factors.is_contiguous() && row_factors.dim() == 3 &&
                            (row_factors.size(0) == 1 || row_factors.size(0) == q.size(0)) &&
                            (row_factors.size(1) == 1 || row_factors.size(1) == q.size(2)) &&
                            row_factors.size(2) == Tq),
              "blocksparse_cpu: row_factors must be contiguous float32 [1|B, 1|Hq, Tq]");
  return {static_cast<float>(scale),
          static_cast<float>(softcap),
          static_cast<Weight>(weight),
          static_cast<float>(parameter),
          biased ? offset_bias.data_ptr<float>() : nullptr,
          bias_len,
          factored ? row_factors.data_ptr<float>() : nullptr,
          factored ? row_factors.size(0) : 1,
          factored ? row_factors.size(1) : 1,
          Tq};
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& row_ptr, const at::Tensor& tiles,
                                const at::Tensor& partial, const at::Tensor& keep,
                                int64_t block_q, int64_t block_k, int64_t max_run,
                                bool shifted, double scale, double softcap, int64_t weight,
                                double parameter, const at::Tensor& offset_bias,
                                const at::Tensor& row_factors, bool weights) {
  check_inputs(q, k, v);
  const Tiles t = tiles_of(row_ptr, tiles, partial, keep, block_q, block_k, max_run);
  auto out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, v.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  const bool pack = worth_packing(q, k);
  const Score s = score_of(q, k, scale, softcap, weight, parameter, offset_bias, row_factors);
  TORCH_CHECK(!shifted || s.weight == Weight::kSoftmax || s.weight == Weight::kCogPart,
              "blocksparse_cpu: sigmoid and softplus weights run unshifted");
  TORCH_CHECK(shifted || s.weight != Weight::kCogPart,
              "blocksparse_cpu: a Cog half runs shifted (rows may have no key of its sign)");
  if (q.scalar_type() == at::kFloat) {
    forward_kernel<Float32Gemms>(q, k, v, t, shifted, s, weights, pack, out, lse);
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  } else if (pack && bfloat16_brgemm_runs(q, v)) {
    forward_kernel<BFloat16Brgemm>(q, k, v, t, shifted, s, weights, pack, out, lse);
#endif
  } else {
    forward_kernel<BFloat16Gemms>(q, k, v, t, shifted, s, weights, pack, out, lse);
  }
  return {out, lse};
}

std::vector<at::Tensor> backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& grad_out, const at::Tensor& lse,
                                 const at::Tensor& delta, const at::Tensor& row_ptr,
                                 const at::Tensor& tiles, const at::Tensor& partial,
                                 const at::Tensor& keep, int64_t block_q, int64_t block_k,
                                 int64_t max_run, double scale, double softcap, int64_t weight,
                                 double parameter, const at::Tensor& offset_bias,
                                 const at::Tensor& row_factors, bool bias_grad) {
  check_inputs(q, k, v);
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && grad_out.is_contiguous(),
              "blocksparse_cpu's backward needs a contiguous grad_out of q's dtype");
  const Tiles t = tiles_of(row_ptr, tiles, partial, keep, block_q, block_k, max_run);
  const auto f32 = q.options().dtype(at::kFloat);
  const int64_t threads = at::get_num_threads();
  auto dq = at::zeros(q.sizes(), f32);
  auto dk = at::zeros({threads, k.size(0), k.size(1), k.size(2), k.size(3)}, f32);
  auto dv = at::zeros({threads, v.size(0), v.size(1), v.size(2), v.size(3)}, f32);
  const bool pack = worth_packing(q, k);
  const Score s = score_of(q, k, scale, softcap, weight, parameter, offset_bias, row_factors);
  TORCH_CHECK(!bias_grad || s.offset_bias, "blocksparse_cpu: a bias gradient needs a bias");
  auto dbias = at::zeros({bias_grad ? threads : 0, q.size(2), s.bias_len}, f32);
  float* dsp = bias_grad ? dbias.data_ptr<float>() : nullptr;
  if (q.scalar_type() == at::kFloat) {
    backward_kernel<Float32Gemms>(q, k, v, grad_out, lse, delta, t, s, pack, dq, dk, dv, dsp);
#ifdef CPUBLAS_BRGEMM_BF16BF16F32
  } else if (pack && bfloat16_brgemm_runs(q, v)) {
    backward_kernel<BFloat16Brgemm>(q, k, v, grad_out, lse, delta, t, s, pack, dq, dk, dv,
                                    dsp);
#endif
  } else {
    backward_kernel<BFloat16Gemms>(q, k, v, grad_out, lse, delta, t, s, pack, dq, dk, dv, dsp);
  }
  return {dq, dk.sum(0), dv.sum(0), dbias.sum(0)};
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
  attnkit::define_gemm_switch(m);
  m.def("matmul_into", &matmul_into, "out = a b through the float32 kernel's GEMM");
}
