// Single-precision GEMM for attnkit's CPU kernels, shared by every file in this folder.
//
// The BLAS that PyTorch links (MKL on x86 wheels, OpenBLAS elsewhere) exports the Fortran
// interface; ATen's own cpublas wrapper is not exported to extensions. Called inside ATen's
// parallel regions, it runs single-threaded on each thread.
//
// `matmul` (no transposes) goes to oneDNN's brgemm micro-kernels instead where libtorch offers
// them for float32 (ATen's cpublas::brgemm). MKL chooses its code path by CPU vendor: on AMD
// Zen it runs AVX2 kernels even where the core executes AVX-512 at twice the width, so on
// attention tile shapes brgemm reaches about the core's AVX-512 FMA peak and MKL's sgemm about
// half of it. `matmul_vnni` is the bfloat16 brgemm, whose B must be in VNNI layout (row pairs
// interleaved): with AVX512-BF16 about twice float32 brgemm's throughput, while in plain layout
// it is slower than float32 (throughputs: docs/kernels.md).
#pragma once

#include <ATen/native/CPUBlas.h>

#include <atomic>
#if defined(__x86_64__)
#include <cpuid.h>
#endif
#include <cmath>
#include <cstdint>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n,
                       const int* k, const float* alpha, const float* a, const int* lda,
                       const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace attnkit {

// Column-major C[m, n] = alpha op(A) op(B) + beta C, as BLAS defines it.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = m, ni = n, ki = k, la = lda, lb = ldb, lc = ldc;
  sgemm_(&ta, &tb, &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
}

// Row-major C[m, n] = alpha op(A) op(B) + beta C, with op(A) [m, k] and op(B) [k, n]; lda, ldb,
// ldc are row strides. A row-major matrix is its column-major transpose, so this is
// Cᵀ = op(B)ᵀ op(A)ᵀ for BLAS.
inline void gemm_rows(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                      const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                      float* c, int64_t ldc) {
  gemm(trans_b, trans_a, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

// The probes' product: a [3, 4] times b [4, 5] of small integers (exact in bfloat16 too), and
// whether c holds it.
constexpr int64_t kProbeM = 3, kProbeN = 5, kProbeK = 4;

template <typename T>
void probe_operands(T* a, T* b) {
  for (int64_t i = 0; i < kProbeM * kProbeK; ++i) a[i] = static_cast<float>(i % 7) - 3.0f;
  for (int64_t i = 0; i < kProbeK * kProbeN; ++i) b[i] = static_cast<float>(i % 5) - 2.0f;
}

template <typename T>
bool probe_matches(const T* a, const T* b, const float* c) {
  for (int64_t i = 0; i < kProbeM; ++i) {
    for (int64_t j = 0; j < kProbeN; ++j) {
      float expected = 0.0f;
      for (int64_t p = 0; p < kProbeK; ++p) {
        expected += static_cast<float>(a[i * kProbeK + p]) * static_cast<float>(b[p * kProbeN + j]);
      }
      if (std::abs(c[i * kProbeN + j] - expected) > 1e-4f) return false;
    }
  }
  return true;
}

// True when libtorch's float32 brgemm exists and computes a small product correctly here (it
// throws where oneDNN has no micro-kernel for the CPU).
inline bool brgemm_works() {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  float a[kProbeM * kProbeK], b[kProbeK * kProbeN], c[kProbeM * kProbeN];
  probe_operands(a, b);
  try {
    at::native::cpublas::brgemm(kProbeM, kProbeN, kProbeK, kProbeK, kProbeN, kProbeN, false, a,
                                b, c, false);
  } catch (...) {
    return false;
  }
  return probe_matches(a, b, c);
#else
  return false;
#endif
}

// True when libtorch's bfloat16 brgemm exists, multiplies a small VNNI-layout product
// correctly, and the CPU has AVX512-BF16 dot products (without them it is no faster than
// float32), in a build for AVX-512: a build for AVX2 (ATEN_CPU_CAPABILITY=avx2) stands for a
// CPU without them, even on one that has them.
inline bool brgemm_bf16_works() {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(__x86_64__) && defined(CPU_CAPABILITY_AVX512)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;  // AVX512-BF16: CPUID leaf 7, subleaf 1, EAX bit 5
  if (!__get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 5))) return false;
  at::BFloat16 a[kProbeM * kProbeK], b[kProbeK * kProbeN], b_vnni[kProbeK * kProbeN];
  float c[kProbeM * kProbeN];
  probe_operands(a, b);
  for (int64_t p = 0; p < kProbeK; ++p) {
    for (int64_t j = 0; j < kProbeN; ++j) {
      b_vnni[(p / 2 * kProbeN + j) * 2 + p % 2] = b[p * kProbeN + j];
    }
  }
  try {
    at::native::cpublas::brgemm(kProbeM, kProbeN, kProbeK, kProbeK, kProbeN, kProbeN, false, a,
                                b_vnni, c, true);
    at::native::cpublas::brgemm_release(true);
  } catch (...) {
    return false;
  }
  return probe_matches(a, b, c);
#else
  return false;
#endif
}

// Whether the kernels use brgemm: probed once per dtype, and switchable so tests can check the
// BLAS / oneDNN-matmul paths.
struct BrgemmSwitch {
  const bool float32_works = brgemm_works(), bfloat16_works = brgemm_bf16_works();
  std::atomic<bool> float32{float32_works}, bfloat16{bfloat16_works};

  void set(bool on) {
    float32 = on && float32_works;
    bfloat16 = on && bfloat16_works;
  }
};

inline BrgemmSwitch& brgemm_enabled() {
  static BrgemmSwitch enabled;
  return enabled;
}

// Row-major C[m, n] = A[m, k] B[k, n], or C += A B when `accumulate`; lda, ldb, ldc are row
// strides.
inline void matmul(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                   int64_t ldb, float* c, int64_t ldc, bool accumulate) {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  if (brgemm_enabled().float32.load(std::memory_order_relaxed)) {
    at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, false);
    return;
  }
#endif
  gemm_rows(false, false, m, n, k, 1.0f, a, lda, b, ldb, accumulate ? 1.0f : 0.0f, c, ldc);
}

// The Python functions of every kernel module (a pybind11 module `m`): which GEMM its float32
// and bfloat16 calls run on, and the switch tests use to run them on the fallbacks.
template <typename Module>
void define_gemm_switch(Module& m) {
  m.def("float32_gemm", [] { return brgemm_enabled().float32 ? "brgemm" : "blas"; },
        "which GEMM float32 tiles run on: 'brgemm' (oneDNN's, through ATen) or 'blas'");
  m.def("bfloat16_gemm", [] { return brgemm_enabled().bfloat16 ? "brgemm" : "onednn_matmul"; },
        "which GEMM bfloat16 tiles run on: 'brgemm' or 'onednn_matmul' (at::mm)");
  m.def("use_brgemm", [](bool on) { brgemm_enabled().set(on); },
        "call brgemm where it works here (on), or the fallbacks (off: tests)");
}

#ifdef CPUBLAS_BRGEMM_BF16BF16F32
// Row-major float32 C[m, n] (+)= A[m, k] B[k, n] of bfloat16 A and B, B in VNNI layout: element
// (p, j) at b_vnni[(p / 2 * ldb + j) * 2 + p % 2]; k even. Only where brgemm_bf16_works().
inline void matmul_vnni(int64_t m, int64_t n, int64_t k, const at::BFloat16* a, int64_t lda,
                        const at::BFloat16* b_vnni, int64_t ldb, float* c, int64_t ldc,
                        bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b_vnni, c, true);
}
#endif

}  // namespace attnkit
