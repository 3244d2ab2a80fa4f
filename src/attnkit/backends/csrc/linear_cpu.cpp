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
// With the Taylor feature (`taylor`), q and k are BASED's small raw features and phi is its 2nd-order Taylor map,
// built per chunk in cache: A from the raw q . k (1 + s + s^2 / 2), the state from phi(k).
// At long T the materialised features (1 + Df + Df^2 = 273 floats per token and head) would
// cost more memory traffic than the whole computation.
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
#include <vector>

namespace {

using attnkit::gemm_rows;
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
    if (feature == kElu) {  // elu(x) + 1 = x + 1 for x > 0, else exp(x)
      at::vec::map([](Vec x) { return Vec::blendv(x.exp_u20(), x + Vec(1.0f), x > Vec(0.0f)); },
                   out, out, cols);
    } else if (feature == kRelu) {
      at::vec::map([](Vec x) { return at::vec::maximum(x, Vec(0.0f)); }, out, out, cols);
    }
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
                                     Feature feature, bool normalize, double eps) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), G = q.size(3), Dk = q.size(4);
  const int64_t Dv = v.size(3), Dz = Dv + (normalize ? 1 : 0);
  const bool taylor = feature == kTaylor;
  const int64_t F = taylor ? 1 + Dk + Dk * Dk : Dk;
  const int64_t W = log_gate.numel() > 0 ? log_gate.size(3) : 0;
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
    std::vector<float> kst(chunk * Dk);
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
        for (int64_t g = 0; g < G; ++g) {
          stage(qp + (((bi * T + t0) * H + h) * G + g) * Dk, ldq, c, Dk, feature, qs.data());
          const float* qc = qs.data();  // the chunk's queries (features), rows Dk apart
          scalar_t* oc = op + (((bi * T + t0) * H + h) * G + g) * Dv;
          if (W > 1 && factored) {  // A = scale (Q e^b)(K e^-b)ᵀ
            for (int64_t i = 0; i < c; ++i) {
              for (int64_t d = 0; d < Dk; ++d) qg[i * Dk + d] = qc[i * Dk + d] * up[i * W + d];
            }
            gemm_rows(false, true, c, c, Dk, alpha, qg.data(), Dk, kg.data(), Dk, 0.0f,
                      M.data(), width);
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
          } else {  // Taylor: raw q . k here, its polynomial below
            gemm_rows(false, true, c, c, Dk, taylor ? 1.0f : alpha, qc, Dk, kc, Dk, 0.0f,
                      M.data(), width);
          }
          for (int64_t i = 0; i < c; ++i) {
            float* row = M.data() + i * width;
            if (W == 1 && factored) {
              for (int64_t j = 0; j <= i; ++j) row[j] *= up[i] * down[j];
            } else if (W == 1) {
              for (int64_t j = 0; j <= i; ++j) row[j] *= std::exp(b[i] - b[j]);
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
              gemm_rows(false, false, c, Dv, width, 1.0f, M.data(), width, VS.data(), Dz, 0.0f,
                        oc, ldo);
              continue;
            }
          }
          gemm_rows(false, false, c, Dz, width, 1.0f, M.data(), width, VS.data(), Dz, 0.0f,
                    O.data(), Dz);
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
        gemm_rows(true, false, F, Dz, c, 1.0f, k_in, ld_in, VS.data(), Dz, 1.0f, S, Dz);
      }
    }
  });
  return {out, S_final};
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& log_gate, const at::Tensor& S0, double scale,
                                int64_t chunk, int64_t feature, bool normalize, double eps) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK(q.device().is_cpu() && k.scalar_type() == dtype && v.scalar_type() == dtype &&
                  (dtype == at::kFloat || dtype == at::kBFloat16) &&
                  S0.scalar_type() == at::kFloat,
              "linear_cpu runs CPU q, k, v of one dtype (float32 or bfloat16), a float32 state");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && S0.is_contiguous(),
              "linear_cpu needs contiguous inputs");
  TORCH_CHECK(feature >= kNone && feature <= kRelu, "linear_cpu: unknown feature code ", feature);
  const int64_t Dk = q.size(4), Dz = v.size(3) + (normalize ? 1 : 0);
  // State rows: the key features, BASED's Taylor features of the raw keys, or the keys
  const int64_t F = feature == kTaylor ? 1 + Dk + Dk * Dk : Dk;
  TORCH_CHECK(S0.size(2) == F && S0.size(3) == Dz, "linear_cpu: the state is ", S0.sizes(),
              ", expected [B, Hkv, ", F, ", ", Dz, "]");
  // Gate width W: 0 (no gate), 1 (one per head and token) or Dk (one per key dimension)
  const int64_t W = log_gate.numel() > 0 ? log_gate.size(3) : 0;
  TORCH_CHECK(W == 0 || (log_gate.is_contiguous() && log_gate.scalar_type() == at::kFloat &&
                         (W == 1 || W == Dk)),
              "linear_cpu needs a contiguous float32 log-gate [B, T, Hkv, 1 or Dk]");
  TORCH_CHECK(!(feature == kTaylor && W > 0), "linear_cpu: the Taylor feature map takes no gate");
  const auto f = static_cast<Feature>(feature);
  if (dtype == at::kBFloat16) {
    return forward_impl<at::BFloat16>(q, k, v, log_gate, S0, scale, chunk, f, normalize, eps);
  }
  return forward_impl<float>(q, k, v, log_gate, S0, scale, chunk, f, normalize, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "chunked gated linear attention, forward (CPU)");
}
