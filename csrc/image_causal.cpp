// fastflamingo's native CPU kernel: the image-causal cross-attention, forward and backward.
//
// The math is fastflamingo/ops/reference.py's image_causal_attention_reference; this is the
// CPU counterpart of the Triton kernels (kernels/image_causal.py), with the same contract:
//   forward(q, k, v, text_time, L, only_immediate, scale) -> (out, lse)
//   backward(dout, q, k, v, out, lse, text_time, L, only_immediate, scale) -> (dq, dk, dv)
// q, dout, out: (B, H, T, D); k, v: (B, H, N*L, D), any strides; text_time: (B, T) int32,
// token t sees image text_time[b, t] (immediate) or images 1..text_time[b, t] (all previous);
// 0 = no image: output exactly 0, lse -inf, zero gradients. fp32 / fp16 / bf16 inputs, fp32
// compute; outputs are contiguous, in the inputs' dtype (lse fp32).
//
// How it runs: text_time is read as is (no dense mask, no plan made on the host in Python).
// Key blocks are the keys of one image (split into chunks of kKeys if L is larger), so a token
// either sees a whole block or none of it: no element mask anywhere. A query block only visits
// the images its tokens see, so in immediate mode the work is O(T * L * D) whatever the number
// of images. Each block is small matrix products (gemm below, register-tiled) and an online
// softmax in fp32. Scores are computed transposed, S^T = K . (scale Q)^T (keys x tokens), so
// that fp32 keys and values are read in place (no copy) and the softmax's row statistics are
// vector operations across tokens.
//   forward: one task per (b, h, block of kTokens tokens), parallel over all of them.
//   backward, immediate mode: one task per (b, h, image): its tokens, dk and dv rows are its own.
//   backward, all-previous mode: one task per (b, h) (a token's dq sums over several images).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace fastflamingo_native {
namespace {

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

struct Layout {
  int64_t B, H, T, D, S, L, N;
  bool immediate;
  float scale;
};

Layout check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tt,
                    int64_t L, double scale) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu() && tt.device().is_cpu(),
              "fastflamingo_native.image_causal_attention: the native kernel runs on CPU tensors; got q on ",
              q.device(), " (use backend='auto' or 'triton' for CUDA tensors)");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "fastflamingo_native.image_causal_attention: q, k, v must be (B, H, T, D) / (B, H, N*L, D), got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16,
              "fastflamingo_native.image_causal_attention: takes float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(k.scalar_type() == dt && v.scalar_type() == dt,
              "fastflamingo_native.image_causal_attention: q, k, v must share one dtype, got ", dt, ", ",
              k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "fastflamingo_native.image_causal_attention: k ", k.sizes(), " and v ", v.sizes(),
              " must match q ", q.sizes(), " in batch, heads and head_dim");
  TORCH_CHECK(L > 0 && k.size(2) % L == 0, "fastflamingo_native.image_causal_attention: the ", k.size(2),
              " keys are not a whole number of images of latents_per_media=", L, " tokens");
  TORCH_CHECK(tt.scalar_type() == at::kInt && tt.dim() == 2 && tt.size(0) == q.size(0) && tt.size(1) == q.size(2),
              "fastflamingo_native.image_causal_attention: text_time must be int32 (B, T) = (", q.size(0), ", ",
              q.size(2), "), got ", tt.scalar_type(), " ", tt.sizes());
  Layout lay{q.size(0), q.size(1), q.size(2), q.size(3), k.size(2), L, k.size(2) / L, false, static_cast<float>(scale)};
  return lay;
}

// text_time contiguous, every value checked to lie in [0, N] (a bad index would read past k)
at::Tensor checked_text_time(const at::Tensor& text_time, int64_t N) {
  at::Tensor tt = text_time.contiguous();
  const int32_t* p = tt.data_ptr<int32_t>();
  for (int64_t i = 0; i < tt.numel(); ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] <= N, "fastflamingo_native.image_causal_attention: text_time[",
                i / std::max<int64_t>(tt.size(1), 1), ", ", i % std::max<int64_t>(tt.size(1), 1), "] = ", p[i],
                " refers to no image: there are N=", N, " images per row (0 = no image yet)");
  }
  return tt;
}

// the images 1..N a token of text_time value m sees: one (immediate) or 1..m
inline bool sees(int32_t m, int64_t image, bool immediate) { return immediate ? m == image : m >= image; }

// ---------------------------------------------------------------------------------------------
template <typename T>
void forward_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int32_t* text_time,
                  const Layout& lay, at::Tensor& out, at::Tensor& lse) {
  const Operand<T> Q(q), K(k), V(v);
  T* out_p = out.data_ptr<T>();
  float* lse_p = lse.data_ptr<float>();
  const int64_t D = lay.D, L = lay.L, T_ = lay.T;
  const int64_t blocks = (T_ + kTokens - 1) / kTokens;
  const int64_t kc_max = std::min(L, kKeys);
  at::parallel_for(0, lay.B * lay.H * blocks, 1, [&](int64_t begin, int64_t end) {
    // qt: the block's (scale q)^T (D x n); qa: the columns of the tokens that see an image
    std::vector<float> qt(D * kTokens), qa(D * kTokens), acc(kTokens * D), tmp(kTokens * D);
    std::vector<float> kbuf(kc_max * D), vbuf(kc_max * D), st(kc_max * kTokens);
    std::vector<float> row_max(kTokens), row_sum(kTokens), mx(kTokens), alpha(kTokens), sum(kTokens);
    std::vector<int64_t> active(kTokens);
    std::vector<int32_t> images;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, b = bh / lay.H, h = bh % lay.H;
      const int64_t t0 = (task % blocks) * kTokens, n = std::min(kTokens, T_ - t0);
      const int32_t* tt = text_time + b * T_ + t0;
      // the images this block's tokens see, ascending
      images.clear();
      int32_t last = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (lay.immediate && tt[i] > 0) images.push_back(tt[i]);
        last = std::max(last, tt[i]);
      }
      if (lay.immediate) {
        std::sort(images.begin(), images.end());
        images.erase(std::unique(images.begin(), images.end()), images.end());
      } else {
        for (int32_t m = 1; m <= last; ++m) images.push_back(m);
      }
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      if (!images.empty()) load(Q, b, h, nullptr, t0, n, D, lay.scale, qt.data(), true);
      for (const int32_t m : images) {
        int64_t na = 0;
        for (int64_t i = 0; i < n; ++i)
          if (sees(tt[i], m, lay.immediate)) active[na++] = i;
        const bool all_rows = na == n;  // every token of the block: qt as is, acc in place
        const int64_t lda = padded(na), ldn = padded(n);
        if (!all_rows)
          for (int64_t d = 0; d < D; ++d) {
            for (int64_t a = 0; a < na; ++a) qa[d * lda + a] = qt[d * ldn + active[a]];
            std::fill(&qa[d * lda + na], &qa[(d + 1) * lda], 0.0f);
          }
        const float* qcols = all_rows ? qt.data() : qa.data();
        for (int64_t c0 = (m - 1) * L; c0 < m * L; c0 += kKeys) {
          const int64_t nc = std::min(kKeys, m * L - c0);
          const auto [kp, ldk] = rows_fp32(K, b, h, c0, nc, D, kbuf.data());
          const auto [vp, ldv] = rows_fp32(V, b, h, c0, nc, D, vbuf.data());
          gemm(nc, lda, D, MatA{kp, ldk, 1}, qcols, lda, st.data(), lda, false);  // S^T (nc x lda)
          // online softmax, one column per token: vector operations across the tokens
          for (int64_t a = 0; a < na; ++a) mx[a] = row_max[active[a]];
          for (int64_t j = 0; j < nc; ++j) {
            const float* sj = &st[j * lda];
#pragma omp simd
            for (int64_t a = 0; a < na; ++a) mx[a] = std::max(mx[a], sj[a]);
          }
#pragma omp simd
          for (int64_t a = 0; a < na; ++a) sum[a] = 0.0f;
          for (int64_t j = 0; j < nc; ++j) {
            float* sj = &st[j * lda];
#pragma omp simd
            for (int64_t a = 0; a < na; ++a) {
              sj[a] = exp_nonpositive(sj[a] - mx[a]);
              sum[a] += sj[a];
            }
          }
          for (int64_t a = 0; a < na; ++a) {
            const int64_t r = active[a];
            alpha[a] = exp_nonpositive(row_max[r] - mx[a]);
            row_sum[r] = row_sum[r] * alpha[a] + sum[a];
            row_max[r] = mx[a];
            float* ar = &acc[r * D];
            for (int64_t d = 0; d < D; ++d) ar[d] *= alpha[a];
          }
          const MatA p{st.data(), 1, lda};  // P (na x nc), read from S^T
          if (all_rows) {
            gemm(na, D, nc, p, vp, ldv, acc.data(), D, true);
          } else {
            gemm(na, D, nc, p, vp, ldv, tmp.data(), D, false);
            for (int64_t a = 0; a < na; ++a) {
              float* ar = &acc[active[a] * D];
              const float* tr = &tmp[a * D];
              for (int64_t d = 0; d < D; ++d) ar[d] += tr[d];
            }
          }
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const int64_t t = t0 + i;
        T* o = out_p + (bh * T_ + t) * D;
        const bool seen = row_sum[i] > 0.0f;
        const float inv = seen ? 1.0f / row_sum[i] : 0.0f;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[i * D + d] * inv);
        lse_p[bh * T_ + t] = seen ? row_max[i] + std::log(row_sum[i]) : -std::numeric_limits<float>::infinity();
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& text_time, int64_t latents_per_media,
                                           bool only_immediate, double scale) {
  Layout lay = check_inputs(q, k, v, text_time, latents_per_media, scale);
  lay.immediate = only_immediate;
  const at::Tensor tt = checked_text_time(text_time, lay.N);
  at::Tensor out = at::empty({lay.B, lay.H, lay.T, lay.D}, q.options());
  at::Tensor lse = at::empty({lay.B, lay.H, lay.T}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<float>::infinity());
    return {out, lse};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "image_causal_forward", [&] {
    forward_impl<scalar_t>(q, k, v, tt.data_ptr<int32_t>(), lay, out, lse);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// The gradients through one key block of one image (keys c0 .. c0 + nc - 1) from the tokens
// `rows` that see it, in chunks of kTokens tokens: dk32, dv32 (nc x D) are written, and dq_rows
// (rows.size() x D, row i for token rows[i]) is accumulated. Transposed like the forward:
// S^T = K (scale Q)^T, dP^T = V dO^T (keys x tokens).
template <typename T>
struct Backward {
  const Operand<T> Q, K, V, dO;
  const float* lse;    // (B, H, T)
  const float* delta;  // (B, H, T): rowsum(dout * out)
  const Layout& lay;
  // per-thread scratch
  std::vector<float> qa, qat, doa, doat, kbuf, vbuf, pt, dpt, lse_a, delta_a;

  Backward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout,
           const float* lse_, const float* delta_, const Layout& lay_)
      : Q(q), K(k), V(v), dO(dout), lse(lse_), delta(delta_), lay(lay_) {
    const int64_t D = lay.D, nc = std::min(lay.L, kKeys);
    for (auto* buf : {&qa, &qat, &doa, &doat}) buf->resize(kTokens * D);
    kbuf.resize(nc * D); vbuf.resize(nc * D);
    pt.resize(nc * kTokens); dpt.resize(nc * kTokens);
    lse_a.resize(kTokens); delta_a.resize(kTokens);
  }

  void block(int64_t b, int64_t h, int64_t c0, int64_t nc, const std::vector<int64_t>& rows,
             float* dq_rows, float* dk32, float* dv32) {
    const int64_t D = lay.D, bh = b * lay.H + h;
    std::fill(dk32, dk32 + nc * D, 0.0f);
    std::fill(dv32, dv32 + nc * D, 0.0f);
    if (rows.empty()) return;
    const auto [kp, ldk] = rows_fp32(K, b, h, c0, nc, D, kbuf.data());
    const auto [vp, ldv] = rows_fp32(V, b, h, c0, nc, D, vbuf.data());
    for (size_t r0 = 0; r0 < rows.size(); r0 += kTokens) {
      const int64_t na = std::min<int64_t>(kTokens, rows.size() - r0);
      const int64_t* idx = rows.data() + r0;
      load(Q, b, h, idx, 0, na, D, lay.scale, qa.data());
      load(Q, b, h, idx, 0, na, D, lay.scale, qat.data(), true);
      load(dO, b, h, idx, 0, na, D, 1.0f, doa.data());
      load(dO, b, h, idx, 0, na, D, 1.0f, doat.data(), true);
      for (int64_t a = 0; a < na; ++a) {
        lse_a[a] = lse[bh * lay.T + idx[a]];
        delta_a[a] = delta[bh * lay.T + idx[a]];
      }
      const int64_t lda = padded(na);  // the tokens' columns, padded with zeros
      gemm(nc, lda, D, MatA{kp, ldk, 1}, qat.data(), lda, pt.data(), lda, false);   // S^T
      gemm(nc, lda, D, MatA{vp, ldv, 1}, doat.data(), lda, dpt.data(), lda, false); // dP^T = V dO^T
      for (int64_t j = 0; j < nc; ++j) {
        float* pj = &pt[j * lda];
        float* dj = &dpt[j * lda];
#pragma omp simd
        for (int64_t a = 0; a < na; ++a) {
          pj[a] = exp_nonpositive(pj[a] - lse_a[a]);  // P^T, from the forward's lse
          dj[a] = pj[a] * (dj[a] - delta_a[a]);       // dS^T / scale
        }
      }
      gemm(nc, D, na, MatA{pt.data(), lda, 1}, doa.data(), D, dv32, D, true);   // dV += P^T dO
      gemm(nc, D, na, MatA{dpt.data(), lda, 1}, qa.data(), D, dk32, D, true);  // dK += dS^T (scale Q)
      for (int64_t i = 0; i < nc * lda; ++i) dpt[i] *= lay.scale;
      gemm(na, D, nc, MatA{dpt.data(), 1, lda}, kp, ldk, dq_rows + r0 * D, D, true);  // dQ += dS K
    }
  }
};

template <typename T>
void store(const float* src, int64_t n, T* dst) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                   const float* lse, const float* delta, const int32_t* text_time, const Layout& lay,
                   at::Tensor& dq, at::Tensor& dk, at::Tensor& dv) {
  const int64_t D = lay.D, L = lay.L, T_ = lay.T, N = lay.N;
  T* dq_p = dq.data_ptr<T>();
  T* dk_p = dk.data_ptr<T>();
  T* dv_p = dv.data_ptr<T>();
  // immediate: one task per (b, h, image), which owns its tokens' dq; all previous: one per (b, h)
  const int64_t per_bh = lay.immediate ? N : 1;
  at::parallel_for(0, lay.B * lay.H * per_bh, 1, [&](int64_t begin, int64_t end) {
    Backward<T> work(q, k, v, dout, lse, delta, lay);
    const int64_t nc_max = std::min(L, kKeys);
    std::vector<float> dk32(nc_max * D), dv32(nc_max * D), dq_rows, dq32(lay.immediate ? 0 : T_ * D);
    std::vector<int64_t> rows;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / per_bh, b = bh / lay.H, h = bh % lay.H;
      const int32_t* tt = text_time + b * T_;
      std::fill(dq32.begin(), dq32.end(), 0.0f);
      const int64_t m_lo = lay.immediate ? task % per_bh + 1 : 1, m_hi = lay.immediate ? m_lo : N;
      for (int64_t m = m_lo; m <= m_hi; ++m) {
        rows.clear();
        for (int64_t t = 0; t < T_; ++t)
          if (sees(tt[t], m, lay.immediate)) rows.push_back(t);
        dq_rows.assign(rows.size() * D, 0.0f);
        for (int64_t c0 = (m - 1) * L; c0 < m * L; c0 += kKeys) {
          const int64_t nc = std::min(kKeys, m * L - c0);
          work.block(b, h, c0, nc, rows, dq_rows.data(), dk32.data(), dv32.data());
          store(dk32.data(), nc * D, dk_p + (bh * lay.S + c0) * D);
          store(dv32.data(), nc * D, dv_p + (bh * lay.S + c0) * D);
        }
        for (size_t i = 0; i < rows.size(); ++i) {
          if (lay.immediate) {
            store(&dq_rows[i * D], D, dq_p + (bh * T_ + rows[i]) * D);
          } else {
            float* acc = &dq32[rows[i] * D];
            for (int64_t d = 0; d < D; ++d) acc[d] += dq_rows[i * D + d];
          }
        }
      }
      if (!lay.immediate) store(dq32.data(), T_ * D, dq_p + bh * T_ * D);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& text_time, int64_t latents_per_media, bool only_immediate,
    double scale) {
  Layout lay = check_inputs(q, k, v, text_time, latents_per_media, scale);
  lay.immediate = only_immediate;
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type(),
              "fastflamingo_native.image_causal_attention_backward: dout ", dout.sizes(), " and out ", out.sizes(),
              " must be like q ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == q.sizes().slice(0, 3),
              "fastflamingo_native.image_causal_attention_backward: lse must be float32 (B, H, T), got ",
              lse.scalar_type(), " ", lse.sizes());
  const at::Tensor tt = checked_text_time(text_time, lay.N);
  // tokens with no image have out = 0 (delta 0) and are skipped: their gradients stay 0
  const at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) return {dq, dk.zero_(), dv.zero_()};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "image_causal_backward", [&] {
    backward_impl<scalar_t>(dout, q, k, v, lse_c.data_ptr<float>(), delta.data_ptr<float>(), tt.data_ptr<int32_t>(),
                            lay, dq, dk, dv);
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY(fastflamingo_native, m) {
  m.def("image_causal_attention(Tensor q, Tensor k, Tensor v, Tensor text_time, int latents_per_media, "
        "bool only_immediate, float scale) -> (Tensor, Tensor)");
  m.def("image_causal_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor text_time, int latents_per_media, bool only_immediate, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastflamingo_native, CPU, m) {
  m.impl("image_causal_attention", &forward);
  m.impl("image_causal_attention_backward", &backward);
}

}  // namespace fastflamingo_native
