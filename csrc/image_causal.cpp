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
#include <limits>
#include <vector>

#include "common.h"  // gemm, exp_nonpositive, Operand, load, rows_fp32, store; kTokens, kKeys

namespace fastflamingo_native {
namespace {

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
