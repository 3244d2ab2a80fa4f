// Single-precision GEMM for attnkit's CPU kernels, shared by every file in this folder.
//
// The BLAS that PyTorch links (MKL on x86 wheels, OpenBLAS elsewhere) exports the Fortran
// interface; ATen's own cpublas wrapper is not exported to extensions. Called inside ATen's
// parallel regions, it runs single-threaded on each thread.
#pragma once

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

}  // namespace attnkit
