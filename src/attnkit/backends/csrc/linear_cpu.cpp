// Chunked gated linear attention, forward, for the CPU: no gate, one log-gate per head and token
// (RetNet, Lightning Attention) or one per key dimension (GLA). Inputs in float32 or bfloat16;
// everything is computed in float32 and the output is written in the inputs' dtype.
//
// attnkit/linear/chunked.py states the algorithm (Lightning Attention-2 / GLA's chunkwise form
// with one log-gate per head and token); this file runs it with the state of each (batch,
// key/value head) held in cache across its chunks, and reads q, k, v, out in their [B, T, H, D]
// layout, so nothing is permuted, padded or materialised in memory. Each chunk's rows of q and k
// are staged in a small float32 buffer, widened from bfloat16 and passed through the
// elementwise feature map (elu + 1, relu) on the way: a separate conversion or feature pass
// over the whole input would write a fresh tensor (page faults included) for each.
// Work items are the (batch, key/value head) pairs; within one, chunks run in order.
//
// Per chunk of C tokens with within-chunk cumulative log-gates b (b_i <= 0, decreasing; a
// scalar or a vector over the key dimensions):
//   A[i, j] = scale sum_d q_id k_jd exp(b_id - b_jd)  (j <= i, else 0)   -- exponents <= 0
//   o_i     = sum_j A[i, j] v_j + scale (exp(b_i) ⊙ q_i) S
//   S       = diag(exp(b_C)) S + sum_j (exp(b_C - b_j) ⊙ k_j)^T v_j
// When a chunk's total decay stays within e^-60, exp(b_i - b_j) factors as exp(b_i) exp(-b_j)
// (GLA's one-matmul form); otherwise each pair is evaluated in log space.
//
// With the Taylor feature (`taylor`), q and k are BASED's small raw features and phi is its
// 2nd-order Taylor map, built per chunk in cache: A from the raw q . k (1 + s + s^2 / 2), the
// state from phi(k). At long T the materialised features (1 + Df + Df^2 = 273 floats per token
// and head) would cost more memory traffic than the whole computation.
//
// With `normalize`, the state carries one more column (the key sum z, from a column of ones
// appended to v in cache) and the output is divided by it in place: o / (scale q . z + eps).
//
// Layouts: q [B, T, Hkv, G, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], log_gate
// [B, T, Hkv, 1 or Dk] float32 or empty (no gate), S0 [B, Hkv, F, Dz] float32 (F = Dk, or
// 1 + Dk + Dk^2 with taylor; Dz = Dv + normalize); out [B, T, Hkv, G, Dv], S_final like S0.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu_blas.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;

// The feature map applied to q and k: the codes of attnkit.linear.chunked.KERNEL_FEATURES.
enum Feature : int64_t { kNone = 0, kTaylor = 1, kElu = 2, kRelu = 3 };

// dst[r, :cols] = phi(src[r * ld, :cols]) in float32, for rows r < rows; taylor stages the raw
// values (its features are built from them below).
template <typename scalar_t>
void stage(const scalar_t* src, int64_t ld, int64_t rows, int64_t cols, Feature feature,
           float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    float* out = dst + r * cols;
    for (int64_t c = 0; c < cols; ++c) out[c] = static_cast<float>(src[r * ld + c]);
  }
  const int64_t n = rows * cols;  // one pass over the block: per-row calls cost more than the map
  if (feature == kElu) {  // elu(x) + 1 = x + 1 for x > 0, else exp(x)
    at::vec::map([](Vec x) { return Vec::blendv(x.exp_u20(), x + Vec(1.0f), x > Vec(0.0f)); },
                 dst, dst, n);
  } else if (feature == kRelu) {
    at::vec::map([](Vec x) { return at::vec::maximum(x, Vec(0.0f)); }, dst, dst, n);
  }
}

// BASED's 2nd-order Taylor features of x [d], times factor, into out [1 + d + d^2]:
// [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))] (attnkit.linear.features.taylor_feature_map).
void taylor_features(const float* x, int64_t d, float factor, float* out) {
  const float linear = factor / std::pow(static_cast<float>(d), 0.25f);
  const float square = factor / std::sqrt(2.0f * static_cast<float>(d));
  out[0] = factor;
  for (int64_t a = 0; a < d; ++a) out[1 + a] = x[a] * linear;
  for (int64_t a = 0; a < d; ++a) {
    for (int64_t b = 0; b < d; ++b) out[1 + d + a * d + b] = x[a] * x[b] * square;
  }
}

// Largest within-chunk decay for which exp(b_i - b_j) is formed as exp(b_i) exp(-b_j): both
// factors stay within e^±60, far from float32's limits. Stronger decay takes one exp per pair.
constexpr float kSafeSpan = 60.0f;

}  // namespace

template <typename scalar_t>
std::vector<at::Tensor> forward_impl(const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& log_gate,
                                     const at::Tensor& S0, double scale, int64_t chunk,
                                     Feature feature, bool normalize, double eps, int64_t F,
                                     int64_t W) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), G = q.size(3), Dk = q.size(4);
  const int64_t Dv = v.size(3), Dz = Dv + (normalize ? 1 : 0);
  const bool taylor = feature == kTaylor;
  auto out = at::empty({B, T, H, G, Dv}, q.options());
  auto S_final = S0.clone();
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const float* gp = W > 0 ? log_gate.data_ptr<float>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  // float32 output without a normaliser is written by the GEMM itself; otherwise through O
  constexpr bool kFloatOut = std::is_same_v<scalar_t, float>;
  float* sp = S_final.data_ptr<float>();
  const int64_t ldq = H * G * Dk, ldk = H * Dk, ldv = H * Dv, ldo = H * G * Dv;
  const float alpha = static_cast<float>(scale);
  const float taylor_scale = 1.0f / std::sqrt(static_cast<float>(Dk));
  // The gate of token i (within the chunk) for key dimension d.
  auto at_dim = [W](const std::vector<float>& x, int64_t i, int64_t d) {
    return x[i * W + (W == 1 ? 0 : d)];
  };

  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> M(chunk * (chunk + F)), VS((chunk + F) * Dz), O(chunk * Dz);
    std::vector<float> qg(chunk * Dk), kg(chunk * Dk), ks(chunk * F), qs(chunk * Dk);
    std::vector<float> kst(chunk * Dk), kt(F * chunk);
    std::vector<float> b(chunk * std::max<int64_t>(W, 1)), up(b.size()), down(b.size());
    std::vector<float> total(std::max<int64_t>(W, 1)), last(total.size());
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t bi = bh / H, h = bh % H;
      float* S = sp + bh * F * Dz;
      for (int64_t t0 = 0; t0 < T; t0 += chunk) {
        const int64_t c = std::min(chunk, T - t0);
        stage(kp + ((bi * T + t0) * H + h) * Dk, ldk, c, Dk, feature, kst.data());
        const float* kc = kst.data();  // the chunk's keys (features), rows Dk apart
        const scalar_t* vc = vp + ((bi * T + t0) * H + h) * Dv;
        bool factored = true;
        if (W > 0) {
          const float* gc = gp + ((bi * T + t0) * H + h) * W;
          std::fill(total.begin(), total.end(), 0.0f);
          for (int64_t i = 0; i < c; ++i) {
            for (int64_t w = 0; w < W; ++w) b[i * W + w] = total[w] += gc[i * H * W + w];
          }
          for (int64_t w = 0; w < W; ++w) factored = factored && total[w] >= -kSafeSpan;
          // One vectorised exp per gate value; exp(-b) = 1 / exp(b) stays below e^60 here
          at::vec::map([](Vec x) { return x.exp(); }, up.data(), b.data(), c * W);
          if (factored) {
            at::vec::map([](Vec x) { return Vec(1.0f) / x; }, down.data(), up.data(), c * W);
          }
          if (W > 1 && factored) {  // K e^-b, shared by the query heads of this chunk
            for (int64_t i = 0; i < c; ++i) {
              for (int64_t d = 0; d < Dk; ++d) kg[i * Dk + d] = kc[i * Dk + d] * down[i * W + d];
            }
          }
        }
        // O = [A | scale exp(b) ⊙ phi(Q)] [V ; S]: the intra-chunk and the state term in one GEMM
        const int64_t width = c + F;
        for (int64_t i = 0; i < c; ++i) {
          for (int64_t e = 0; e < Dv; ++e) VS[i * Dz + e] = static_cast<float>(vc[i * ldv + e]);
          if (normalize) VS[i * Dz + Dv] = 1.0f;
        }
        std::copy(S, S + F * Dz, VS.data() + c * Dz);
        // The chunk's keys transposed for the score GEMM (matmul takes no transposes), shared
        // by its query heads; pairs taken in log space need none.
        const bool log_space = W > 1 && !factored;
        if (!log_space) {
          at::vec::transpose_mxn<float>(W > 1 ? kg.data() : kc, Dk, kt.data(), c, c, Dk);
        }
        for (int64_t g = 0; g < G; ++g) {
          stage(qp + (((bi * T + t0) * H + h) * G + g) * Dk, ldq, c, Dk, feature, qs.data());
          const float* qc = qs.data();  // the chunk's queries (features), rows Dk apart
          scalar_t* oc = op + (((bi * T + t0) * H + h) * G + g) * Dv;
          if (W > 1 && factored) {  // A = (Q e^b)(K e^-b)ᵀ, scaled below
            for (int64_t i = 0; i < c; ++i) {
              for (int64_t d = 0; d < Dk; ++d) qg[i * Dk + d] = qc[i * Dk + d] * up[i * W + d];
            }
            attnkit::matmul(c, c, Dk, qg.data(), Dk, kt.data(), c, M.data(), width, false);
          } else if (W > 1) {  // strong decay: every pair in log space, exponents <= 0
            for (int64_t i = 0; i < c; ++i) {
              for (int64_t j = 0; j <= i; ++j) {
                float dot = 0.0f;
                for (int64_t d = 0; d < Dk; ++d) {
                  dot += qc[i * Dk + d] * kc[j * Dk + d] * std::exp(b[i * W + d] - b[j * W + d]);
                }
                M[i * width + j] = alpha * dot;
              }
            }
          } else {  // Q Kᵀ, scaled below; Taylor: raw q . k here, its polynomial below
            attnkit::matmul(c, c, Dk, qc, Dk, kt.data(), c, M.data(), width, false);
          }
          // the scale the score GEMM leaves out (Taylor applies it to its polynomial)
          const float a = log_space || taylor ? 1.0f : alpha;
          for (int64_t i = 0; i < c; ++i) {
            float* row = M.data() + i * width;
            if (W == 1 && factored) {
              for (int64_t j = 0; j <= i; ++j) row[j] *= a * up[i] * down[j];
            } else if (W == 1) {
              for (int64_t j = 0; j <= i; ++j) row[j] *= a * std::exp(b[i] - b[j]);
            } else if (a != 1.0f) {
              for (int64_t j = 0; j <= i; ++j) row[j] *= a;
            }
            if (taylor) {  // phi(q) . phi(k) = 1 + s + s^2 / 2, s = q . k / sqrt(Df)
              for (int64_t j = 0; j <= i; ++j) {
                const float x = row[j] * taylor_scale;
                row[j] = alpha * (1.0f + x + 0.5f * x * x);
              }
            }
            std::fill(row + i + 1, row + c, 0.0f);
            if (taylor) {
              taylor_features(qc + i * Dk, Dk, alpha, row + c);
            } else {
              for (int64_t d = 0; d < Dk; ++d) {
                row[c + d] = alpha * qc[i * Dk + d] * (W > 0 ? at_dim(up, i, d) : 1.0f);
              }
            }
          }
          if constexpr (kFloatOut) {
            if (!normalize) {
              attnkit::matmul(c, Dv, width, M.data(), width, VS.data(), Dz, oc, ldo, false);
              continue;
            }
          }
          attnkit::matmul(c, Dz, width, M.data(), width, VS.data(), Dz, O.data(), Dz, false);
          for (int64_t i = 0; i < c; ++i) {
            const float inv = normalize ? 1.0f / (O[i * Dz + Dv] + static_cast<float>(eps)) : 1.0f;
            for (int64_t e = 0; e < Dv; ++e) {
              oc[i * ldo + e] = static_cast<scalar_t>(O[i * Dz + e] * inv);
            }
          }
        }
        // S = diag(exp(b_C)) S + (exp(b_C - b) ⊙ K)ᵀ V
        const float* k_in = kc;
        int64_t ld_in = Dk;
        if (taylor) {
          for (int64_t i = 0; i < c; ++i) {
            taylor_features(kc + i * Dk, Dk, 1.0f, ks.data() + i * F);
          }
          k_in = ks.data();
          ld_in = F;
        } else if (W > 0) {
          for (int64_t w = 0; w < W; ++w) last[w] = std::exp(total[w]);
          for (int64_t i = 0; i < c; ++i) {
            for (int64_t d = 0; d < Dk; ++d) {
              const int64_t w = W == 1 ? 0 : d;
              // exp(b_C - b_i) = exp(b_C) / exp(b_i) when factored, else taken directly
              const float f = factored ? last[w] * down[i * W + w]
                                       : std::exp(total[w] - b[i * W + w]);
              ks[i * Dk + d] = kc[i * Dk + d] * f;
            }
          }
          for (int64_t d = 0; d < Dk; ++d) {
            const float decay = last[W == 1 ? 0 : d];
            for (int64_t e = 0; e < Dz; ++e) S[d * Dz + e] *= decay;
          }
          k_in = ks.data();
          ld_in = Dk;
        }
        // matmul takes no transposes: (K ⊙ decay)ᵀ staged in cache
        at::vec::transpose_mxn<float>(k_in, ld_in, kt.data(), c, c, F);
        attnkit::matmul(F, Dz, c, kt.data(), c, VS.data(), Dz, S, Dz, true);
      }
    }
  });
  return {out, S_final};
}

// The checks of both entry points; returns the state rows F (the key features, BASED's Taylor
// features of the raw keys, or the keys) and the gate width W (0: no gate, 1: one per head and
// token, Dk: one per key dimension).
std::pair<int64_t, int64_t> checked_shape(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor& log_gate,
                                          const at::Tensor& S0, int64_t feature, bool normalize) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(q.device().is_cpu() && k.scalar_type() == dtype && v.scalar_type() == dtype &&
                  (dtype == at::kFloat || dtype == at::kBFloat16) &&
                  S0.scalar_type() == at::kFloat,
              "linear_cpu runs CPU q, k, v of one dtype (float32 or bfloat16), a float32 state");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && S0.is_contiguous(),
              "linear_cpu needs contiguous inputs");
  TORCH_CHECK(feature >= kNone && feature <= kRelu, "linear_cpu: unknown feature code ", feature);
  const int64_t Dk = q.size(4), Dz = v.size(3) + (normalize ? 1 : 0);
  const int64_t F = feature == kTaylor ? 1 + Dk + Dk * Dk : Dk;
  TORCH_CHECK(S0.size(2) == F && S0.size(3) == Dz, "linear_cpu: the state is ", S0.sizes(),
              ", expected [B, Hkv, ", F, ", ", Dz, "]");
  const int64_t W = log_gate.numel() > 0 ? log_gate.size(3) : 0;
  TORCH_CHECK(W == 0 || (log_gate.is_contiguous() && log_gate.scalar_type() == at::kFloat &&
                         (W == 1 || W == Dk)),
              "linear_cpu needs a contiguous float32 log-gate [B, T, Hkv, 1 or Dk]");
  TORCH_CHECK(!(feature == kTaylor && W > 0), "linear_cpu: the Taylor feature map takes no gate");
  return {F, W};
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& log_gate, const at::Tensor& S0, double scale,
                                int64_t chunk, int64_t feature, bool normalize, double eps) {
  const auto [F, W] = checked_shape(q, k, v, log_gate, S0, feature, normalize);
  const auto f = static_cast<Feature>(feature);
  if (q.scalar_type() == at::kBFloat16) {
    return forward_impl<at::BFloat16>(q, k, v, log_gate, S0, scale, chunk, f, normalize, eps, F,
                                      W);
  }
  return forward_impl<float>(q, k, v, log_gate, S0, scale, chunk, f, normalize, eps, F, W);
}

// -- the recurrent form ------------------------------------------------------------------
//
// S_t = diag(alpha_t) S_(t-1) + phi(k_t)^T [v_t, 1],  o_t = scale phi(q_t) S_t, token by token.
// On a CPU this beats the chunked form for prefill as well as decoding: it takes 4 Dk Dz flops
// per token where chunk size C takes 2 (Dk + Dz) C + 4 Dk Dz, and the state of one head
// (Dk x Dz floats, 16 KB at 64 x 64) stays in L1 while each pass over it serves several
// readers: per state row, a slab of the row is held in registers, decayed and updated by each
// token in turn, and each of the token's G query heads (GQA) accumulates q[d] times the slab as
// it stands after that token. Columns of the state evolve independently, so a row is cut into
// slabs of NS vectors that keep the G * NS accumulators in registers.
// With the Taylor feature the state has F = 1 + Dk + Dk^2 rows (BASED: 273 x 65 floats, in L2),
// built per token from the raw q and k. Scope: G <= kMaxGroups query heads per key/value head;
// any Dv (a row takes as many slabs as it needs).

constexpr int kMaxGroups = 8;
// Vector registers of the ISA this file is built for: 32 with AVX-512, 16 with AVX2 (and the
// scalar/default build). A slab's accumulators and values must fit in them.
constexpr int kRegisters = Vec::size() * sizeof(float) >= 64 ? 32 : 16;
// Tokens per pass over the state with one query head per KV head: 2 halves the passes over the
// state, and more gained nothing (timings: docs/kernels.md); with G > 1 each pass already
// serves G readers per token.
constexpr int kTokens = 2;

constexpr int tokens_per_pass(int G) { return G == 1 ? kTokens : 1; }

struct Recurrence {
  int64_t B, T, H, G, Dk, F, Dv, Dz, W;  // F: state rows (Dk, or the Taylor features')
  int64_t Dp;                             // state row width: Dv padded to whole slabs
  int64_t slabs, parts;                   // slabs per row; column parts per head (one thread each)
  float scale, eps;
  Feature feature;
  bool normalize;
};

// Tokens staged for one pass: qs [kBlock, G, F], ks and decay [kBlock, F] and vs [kBlock, Dp]
// (rows of [v, 0 padding]), float32, feature maps applied.
constexpr int64_t kBlock = 64;

template <typename scalar_t>
void stage_block(const Recurrence& r, const scalar_t* qp, const scalar_t* kp,
                 const scalar_t* vp, const float* gp, int64_t b, int64_t h, int64_t t0,
                 int64_t n, float* qs, float* ks, float* vs, float* decay, float* raw) {
  const int64_t row0 = (b * r.T + t0) * r.H + h;  // rows of one KV head step by H
  const int64_t Gk = r.G * r.Dk;                   // a token's query heads, contiguous
  if (r.feature == kTaylor) {  // features from the raw values, token by token
    for (int64_t u = 0; u < n; ++u) {
      for (int64_t g = 0; g < r.G; ++g) {
        stage(qp + (row0 + u * r.H) * Gk + g * r.Dk, r.Dk, 1, r.Dk, kNone, raw);
        taylor_features(raw, r.Dk, 1.0f, qs + (u * r.G + g) * r.F);
      }
      stage(kp + (row0 + u * r.H) * r.Dk, r.Dk, 1, r.Dk, kNone, raw);
      taylor_features(raw, r.Dk, 1.0f, ks + u * r.F);
    }
  } else {
    stage(qp + row0 * Gk, r.H * Gk, n, Gk, r.feature, qs);
    stage(kp + row0 * r.Dk, r.H * r.Dk, n, r.Dk, r.feature, ks);
  }
  for (int64_t u = 0; u < n; ++u) {
    float* vu = vs + u * r.Dp;
    stage(vp + (row0 + u * r.H) * r.Dv, r.Dv, 1, r.Dv, kNone, vu);
    std::fill(vu + r.Dv, vu + r.Dp, 0.0f);
    float* du = decay + u * r.F;
    const float* g = gp == nullptr ? nullptr : gp + (row0 + u * r.H) * r.W;
    if (r.W == 0) {
      std::fill(du, du + r.F, 1.0f);
    } else if (r.W == 1) {
      std::fill(du, du + r.F, std::exp(g[0]));
    } else {
      at::vec::map([](Vec x) { return x.exp(); }, du, g, r.Dk);
    }
  }
}

// The state's columns [j0, j0 + NS) vectors for TB staged tokens and their G query heads:
// sums [TB, G, Dp] receive each reader's q . state over those columns. Inlined: as a call the
// token loop ran markedly slower.
template <int TB, int G, int NS>
C10_ALWAYS_INLINE void recurrent_slab(const Recurrence& r, const float* qs, const float* ks,
                                      const float* vs, const float* decay, float* S, int64_t j0,
                                      float* sums) {
  const int64_t Dp = r.Dp;
  Vec o[TB][G][NS];
  for (int u = 0; u < TB; ++u) {
    for (int g = 0; g < G; ++g) {
      for (int j = 0; j < NS; ++j) o[u][g][j] = Vec(0.0f);
    }
  }
  Vec value[TB][NS];  // the tokens' v slabs, in registers for the whole pass
  for (int u = 0; u < TB; ++u) {
    for (int j = 0; j < NS; ++j) value[u][j] = Vec::loadu(vs + u * Dp + (j0 + j) * Vec::size());
  }
  const int64_t F = r.F;
  for (int64_t d = 0; d < F; ++d) {
    float k_d[TB], decay_d[TB], q_d[TB][G];  // scalars of row d
    for (int u = 0; u < TB; ++u) {
      k_d[u] = ks[u * F + d];
      decay_d[u] = decay[u * F + d];
      for (int g = 0; g < G; ++g) q_d[u][g] = qs[(u * G + g) * F + d];
    }
    float* slab = S + d * Dp + j0 * Vec::size();
    for (int j = 0; j < NS; ++j) {
      Vec x = Vec::loadu(slab + j * Vec::size());
      for (int u = 0; u < TB; ++u) {
        x = at::vec::fmadd(x, Vec(decay_d[u]), Vec(k_d[u]) * value[u][j]);
        for (int g = 0; g < G; ++g) o[u][g][j] = at::vec::fmadd(Vec(q_d[u][g]), x, o[u][g][j]);
      }
      x.store(slab + j * Vec::size());
    }
  }
  for (int u = 0; u < TB; ++u) {
    for (int g = 0; g < G; ++g) {
      for (int j = 0; j < NS; ++j) {
        o[u][g][j].store(sums + (u * G + g) * Dp + (j0 + j) * Vec::size());
      }
    }
  }
}

// TB staged tokens (token t of KV head (b, h) and the next ones) through the whole state: the
// normaliser's column (the key sum z) in scalars, as a 65th column it would cost a whole
// vector per row (1.25x the work at Dv = 64), then the slabs, then the outputs.
template <typename scalar_t, int TB, int G, int NS>
void recurrent_step(const Recurrence& r, const float* qs, const float* ks, const float* vs,
                    const float* decay, scalar_t* op, int64_t b, int64_t h, int64_t t,
                    int64_t first_slab, int64_t stop_slab, float* S, float* z, float* sums) {
  float oz[TB][G] = {};
  if (r.normalize) {
    for (int64_t d = 0; d < r.F; ++d) {
      float z_d = z[d];
      for (int u = 0; u < TB; ++u) {
        z_d = z_d * decay[u * r.F + d] + ks[u * r.F + d];
        for (int g = 0; g < G; ++g) oz[u][g] += qs[(u * G + g) * r.F + d] * z_d;
      }
      z[d] = z_d;
    }
  }
  for (int64_t slab = first_slab; slab < stop_slab; ++slab) {
    recurrent_slab<TB, G, NS>(r, qs, ks, vs, decay, S, slab * NS, sums);
  }
  const int64_t c0 = first_slab * NS * Vec::size();
  const int64_t c1 = std::min(stop_slab * NS * Vec::size(), r.Dv);
  for (int u = 0; u < TB; ++u) {
    for (int g = 0; g < G; ++g) {
      const float factor = r.scale / (r.normalize ? r.scale * oz[u][g] + r.eps : 1.0f);
      const float* sum = sums + (u * G + g) * r.Dp;
      scalar_t* out = op + (((b * r.T + t + u) * r.H + h) * G + g) * r.Dv;
      for (int64_t e = c0; e < c1; ++e) out[e] = static_cast<scalar_t>(sum[e] * factor);
    }
  }
}

template <typename scalar_t, int G, int NS>
void recurrent_heads(const Recurrence& r, const at::Tensor& q, const at::Tensor& k,
                     const at::Tensor& v, const at::Tensor& log_gate, const at::Tensor& S0,
                     at::Tensor& out, at::Tensor& S_final) {
  constexpr int TB = tokens_per_pass(G);
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const scalar_t* vp = v.data_ptr<scalar_t>();
  const float* gp = r.W > 0 ? log_gate.data_ptr<float>() : nullptr;
  scalar_t* op = out.data_ptr<scalar_t>();
  const float* initial = S0.data_ptr<float>();
  float* final_state = S_final.data_ptr<float>();
  const int64_t Dp = r.Dp;
  // Items: (batch entry, KV head, part of the state's columns); columns evolve independently,
  // so when there are fewer heads than threads each part runs on its own thread (each part
  // also carries the normaliser's column, which its outputs need).
  at::parallel_for(0, r.B * r.H * r.parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> S(r.F * Dp), qs(kBlock * G * r.F), ks(kBlock * r.F), vs(kBlock * Dp);
    std::vector<float> decay(kBlock * r.F), raw(r.Dk), z(r.F), sums(TB * G * Dp);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / r.parts, part = item % r.parts;
      const int64_t b = bh / r.H, h = bh % r.H;
      const int64_t first_slab = part * r.slabs / r.parts;
      const int64_t stop_slab = (part + 1) * r.slabs / r.parts;
      const int64_t c0 = first_slab * NS * Vec::size();
      const int64_t c1 = std::min(stop_slab * NS * Vec::size(), r.Dv);
      // Parts of one head read the initial state and write disjoint columns of the final one.
      const float* state = initial + bh * r.F * r.Dz;
      float* result = final_state + bh * r.F * r.Dz;
      for (int64_t d = 0; d < r.F; ++d) {  // into the padded rows, z apart
        std::copy(state + d * r.Dz, state + d * r.Dz + r.Dv, S.data() + d * Dp);
        std::fill(S.data() + d * Dp + r.Dv, S.data() + (d + 1) * Dp, 0.0f);
        if (r.normalize) z[d] = state[d * r.Dz + r.Dv];
      }
      for (int64_t t0 = 0; t0 < r.T; t0 += kBlock) {
        const int64_t n = std::min(kBlock, r.T - t0);
        stage_block(r, qp, kp, vp, gp, b, h, t0, n, qs.data(), ks.data(), vs.data(),
                    decay.data(), raw.data());
        int64_t u = 0;
        for (; u + TB <= n; u += TB) {
          recurrent_step<scalar_t, TB, G, NS>(
              r, qs.data() + u * G * r.F, ks.data() + u * r.F, vs.data() + u * Dp,
              decay.data() + u * r.F, op, b, h, t0 + u, first_slab, stop_slab, S.data(),
              z.data(), sums.data());
        }
        for (; u < n; ++u) {
          recurrent_step<scalar_t, 1, G, NS>(
              r, qs.data() + u * G * r.F, ks.data() + u * r.F, vs.data() + u * Dp,
              decay.data() + u * r.F, op, b, h, t0 + u, first_slab, stop_slab, S.data(),
              z.data(), sums.data());
        }
      }
      for (int64_t d = 0; d < r.F; ++d) {  // this part's columns, and z once
        std::copy(S.data() + d * Dp + c0, S.data() + d * Dp + c1, result + d * r.Dz + c0);
        if (r.normalize && part == 0) result[d * r.Dz + r.Dv] = z[d];
      }
    }
  });
}

// Vectors per slab at most, so that a pass's accumulators (TB * G * NS) and values (TB * NS)
// stay in registers: with AVX-512 8 for one query head per KV head (2 tokens), 4 up to G = 4,
// else 2; half of that with AVX2's 16 registers.
constexpr int max_slab(int G) {
  return G == 1 ? kRegisters / 4 : G <= 4 ? kRegisters / 8 : kRegisters / 16;
}

// recurrent_heads<scalar_t, G, NS> for the runtime G and NS (G <= kMaxGroups,
// NS <= max_slab(G)), instantiating only those pairs.
template <typename scalar_t, int G = 1, int NS = 1>
void recurrent_dispatch(const Recurrence& r, int64_t slab, const at::Tensor& q,
                        const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_gate,
                        const at::Tensor& S0, at::Tensor& out, at::Tensor& S_final) {
  if constexpr (G < kMaxGroups) {
    if (r.G > G) {
      return recurrent_dispatch<scalar_t, G + 1, 1>(r, slab, q, k, v, log_gate, S0, out, S_final);
    }
  }
  if constexpr (NS < max_slab(G)) {
    if (slab > NS) {
      return recurrent_dispatch<scalar_t, G, NS + 1>(r, slab, q, k, v, log_gate, S0, out, S_final);
    }
  }
  recurrent_heads<scalar_t, G, NS>(r, q, k, v, log_gate, S0, out, S_final);
}

// q [B, T, Hkv, G, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] (float32 or bfloat16), log_gate
// [B, T, Hkv, 1 or Dk] float32 or empty, S0 [B, Hkv, F, Dz] float32 -> out [B, T, Hkv, G, Dv]
// in the inputs' dtype, S_final like S0.
std::vector<at::Tensor> recurrent(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& log_gate, const at::Tensor& S0,
                                  double scale, int64_t feature, bool normalize, double eps) {
  const auto [F, W] = checked_shape(q, k, v, log_gate, S0, feature, normalize);
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), G = q.size(3), Dk = q.size(4);
  const int64_t Dv = v.size(3), Dz = Dv + (normalize ? 1 : 0);
  TORCH_CHECK(G <= kMaxGroups, "linear_cpu's recurrent form takes at most ", kMaxGroups,
              " query heads per KV head");
  // Column parts: one per thread left over by the heads, each a whole number of slabs.
  const int64_t NV = (Dv + Vec::size() - 1) / Vec::size(), heads = B * H;
  const int64_t threads = at::get_num_threads();
  const int64_t wanted = heads >= threads ? 1 : std::min(NV, (threads + heads - 1) / heads);
  const int64_t widest = max_slab(static_cast<int>(G));
  const int64_t NS = std::min<int64_t>((NV + wanted - 1) / wanted, widest);
  const int64_t slabs = (NV + NS - 1) / NS, Dp = slabs * NS * Vec::size();
  const Recurrence r{B, T, H, G, Dk, F, Dv, Dz, W, Dp, slabs, std::min(wanted, slabs),
                     static_cast<float>(scale), static_cast<float>(eps),
                     static_cast<Feature>(feature), normalize};
  auto out = at::empty({B, T, H, G, Dv}, q.options());
  auto S_final = at::empty_like(S0);
  if (q.scalar_type() == at::kBFloat16) {
    recurrent_dispatch<at::BFloat16>(r, NS, q, k, v, log_gate, S0, out, S_final);
  } else {
    recurrent_dispatch<float>(r, NS, q, k, v, log_gate, S0, out, S_final);
  }
  return {out, S_final};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "chunked gated linear attention, forward (CPU)");
  m.def("recurrent", &recurrent, "gated linear attention token by token, forward (CPU)");
  m.def("recurrent_max_groups", [] { return kMaxGroups; },
        "the most query heads per key/value head the recurrent form of this build takes");
  attnkit::define_gemm_switch(m);
}
