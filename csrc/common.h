// fastflamingo's native CPU kernels: what they share. Small fp32 matrix products (register-tiled,
// GCC / Clang vector extensions), the softmax's exponential, and strided (B, H, S, D) operands read
// into dense fp32 buffers. Included by image_causal.cpp and perceiver.cpp.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>

namespace fastflamingo_native {
namespace {  // internal linkage: each kernel's file compiles its own copy, inlined

constexpr int64_t kTokens = 64;  // query rows per block
constexpr int64_t kKeys = 256;   // keys per block (one image's, or a chunk of a larger image's)

// ---------------------------------------------------------------------------------------------
// C (M x N) = A (M x K) . B (K x N) [+ C], fp32. A is read one element at a time (broadcast), so
// any strides: A[i, k] = A.p[i * A.row + k * A.col] (a transposed operand costs nothing); B and C
// are row-major with leading dimensions ldb, ldc. GCC / Clang vector extensions: 16 floats, one
// AVX-512 register or two AVX2 ones.
typedef float vec16 __attribute__((vector_size(64)));
constexpr int64_t kW = 16;
// the register tile: kMR rows x kNV vectors of 16 columns, kMR * kNV accumulators
#if defined(__AVX512F__)
constexpr int kMR = 6, kNV = 2;  // 12 of the 32 zmm registers
#else
constexpr int kMR = 6, kNV = 1;  // 12 of the 16 ymm registers (a vector is two of them)
#endif

struct MatA {  // a strided fp32 matrix, read element by element
  const float* p;
  int64_t row, col;
  float at(int64_t i, int64_t k) const { return p[i * row + k * col]; }
  MatA from_row(int64_t i) const { return {p + i * row, row, col}; }
};

inline vec16 loadu(const float* p) { vec16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void storeu(float* p, vec16 v) { std::memcpy(p, &v, sizeof v); }

template <int MR, int NV>
inline void gemm_tile(int64_t K, MatA A, const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  vec16 c[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = accumulate ? loadu(C + r * ldc + v * kW) : vec16{};
  for (int64_t k = 0; k < K; ++k) {
    vec16 b[NV];
    for (int v = 0; v < NV; ++v) b[v] = loadu(B + k * ldb + v * kW);
    for (int r = 0; r < MR; ++r) {
      const float a = A.at(r, k);
      for (int v = 0; v < NV; ++v) c[r][v] += a * b[v];
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) storeu(C + r * ldc + v * kW, c[r][v]);
}

template <int MR>
inline void gemm_rows(int64_t N, int64_t K, MatA A, const float* B, int64_t ldb, float* C, int64_t ldc,
                      bool accumulate) {
  int64_t j = 0;
  for (; j + kNV * kW <= N; j += kNV * kW) gemm_tile<MR, kNV>(K, A, B + j, ldb, C + j, ldc, accumulate);
  for (; j + kW <= N; j += kW) gemm_tile<MR, 1>(K, A, B + j, ldb, C + j, ldc, accumulate);
  for (; j < N; ++j) {  // columns past the last multiple of 16 (odd head sizes, few tokens)
    for (int r = 0; r < MR; ++r) {
      float s = accumulate ? C[r * ldc + j] : 0.0f;
      for (int64_t k = 0; k < K; ++k) s += A.at(r, k) * B[k * ldb + j];
      C[r * ldc + j] = s;
    }
  }
}

template <int MR>
inline void gemm_last_rows(int64_t M, int64_t N, int64_t K, MatA A, const float* B, int64_t ldb, float* C,
                           int64_t ldc, bool accumulate) {
  if constexpr (MR > 1) {
    if (M < MR) return gemm_last_rows<MR - 1>(M, N, K, A, B, ldb, C, ldc, accumulate);
  }
  gemm_rows<MR>(N, K, A, B, ldb, C, ldc, accumulate);
}

void gemm(int64_t M, int64_t N, int64_t K, MatA A, const float* B, int64_t ldb, float* C, int64_t ldc,
          bool accumulate) {
  int64_t i = 0;
  for (; i + kMR <= M; i += kMR) gemm_rows<kMR>(N, K, A.from_row(i), B, ldb, C + i * ldc, ldc, accumulate);
  if (i < M) gemm_last_rows<kMR - 1>(M - i, N, K, A.from_row(i), B, ldb, C + i * ldc, ldc, accumulate);
}

// exp(x) for x <= 0 (what the softmax takes), 0 below -87 and for -inf; a branch-free polynomial
// (Cephes' expf) that the compiler vectorizes, where std::exp is a library call per element.
inline float exp_nonpositive(float x) {
  const float xc = std::max(x, -87.0f);
  const float n = std::nearbyint(xc * 1.44269504088896341f);
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < -87.0f ? 0.0f : p * two_n;
}

// ---------------------------------------------------------------------------------------------
// Strided (B, H, S, D) operands, read into / written from dense fp32 buffers.
template <typename T>
struct Operand {
  const T* base;
  int64_t sb, sh, ss, sd;
  Operand(const at::Tensor& t)
      : base(t.data_ptr<T>()), sb(t.stride(0)), sh(t.stride(1)), ss(t.stride(2)), sd(t.stride(3)) {}
  const T* row(int64_t b, int64_t h, int64_t s) const { return base + b * sb + h * sh + s * ss; }
};

// n padded to whole vectors: the column count of a transposed (D x tokens) operand, so that a
// product with few tokens (a short run, a decode step) still runs the vector tile, on zeros
inline int64_t padded(int64_t n) { return (n + kW - 1) / kW * kW; }

// rows[i] of x[b, h] (rows = nullptr: rows first .. first + n - 1) as fp32, times scale:
// dst (n x D) row-major, or with `transposed`, dst (D x padded(n)), zeros in the padding
template <typename T>
void load(const Operand<T>& x, int64_t b, int64_t h, const int64_t* rows, int64_t first, int64_t n, int64_t D,
          float scale, float* dst, bool transposed = false) {
  const int64_t ld = padded(n);
  if (transposed)
    for (int64_t d = 0; d < D; ++d) std::fill(dst + d * ld + n, dst + (d + 1) * ld, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const T* src = x.row(b, h, rows ? rows[i] : first + i);
    if (transposed) {
      for (int64_t d = 0; d < D; ++d) dst[d * ld + i] = static_cast<float>(src[d * x.sd]) * scale;
    } else if (x.sd == 1) {
      for (int64_t d = 0; d < D; ++d) dst[i * D + d] = static_cast<float>(src[d]) * scale;
    } else {
      for (int64_t d = 0; d < D; ++d) dst[i * D + d] = static_cast<float>(src[d * x.sd]) * scale;
    }
  }
}

// rows first .. first + n - 1 of x[b, h] as a row-major fp32 (n x D) matrix: x's own memory where
// it is fp32 with unit stride along D (no copy), else a copy in buf. Returns (data, row stride).
template <typename T>
std::pair<const float*, int64_t> rows_fp32(const Operand<T>& x, int64_t b, int64_t h, int64_t first, int64_t n,
                                           int64_t D, float* buf) {
  if constexpr (std::is_same_v<T, float>) {
    if (x.sd == 1) return {x.row(b, h, first), x.ss};
  }
  load(x, b, h, nullptr, first, n, D, 1.0f, buf);
  return {buf, D};
}

template <typename T>
void store(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

}  // namespace
}  // namespace fastflamingo_native
