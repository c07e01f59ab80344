// fastflamingo's native CPU kernel: the Perceiver resampler's latent attention, forward and backward.
//
// The math is fastflamingo/ops/reference.py's perceiver_attention_reference: L latent queries attend
// to [media tokens ; latents] with one softmax. This is the CPU counterpart of the Triton kernels
// (kernels/perceiver.py), with the same contract:
//   forward(q, k_media, v_media, k_latents, v_latents, scale) -> (out, lse)
//   backward(dout, q, k_media, v_media, k_latents, v_latents, out, lse, scale)
//     -> (dq, dk_media, dv_media, dk_latents, dv_latents)
// q, dout, out: (B, H, L, D); k_media, v_media: (B, H, V, D); k_latents, v_latents: (B, H, L, D);
// any strides. fp32 / fp16 / bf16 inputs, fp32 compute; lse (B, H, L) fp32. Outputs and gradients
// are (B, H, S, D) tensors stored in (B, S, H, D) memory, as the Triton kernels write them, so that
// the layer's `transpose(1, 2).reshape(B, S, H * D)` (and the projections' backward) costs no copy.
//
// How it runs: the two key / value sources are read where they are, in chunks of at most kKeys
// keys of one source (the media tokens, then the latents): their concatenation is never made. One
// online softmax in fp32 runs over all chunks. Scores are computed transposed, S^T = K (scale Q)^T
// (keys x queries), as in image_causal.cpp, so that fp32 keys and values are read in place.
//   forward: one task per (b, h, block of kTokens latents), parallel over all of them.
//   backward: one task per (b, h): its dk, dv rows (all of them) and dq rows are its own.
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

struct Shape {
  int64_t B, H, L, V, D;
  float scale;
};

Shape check_inputs(const char* op, const at::Tensor& q, const at::Tensor& km, const at::Tensor& vm,
                   const at::Tensor& kl, const at::Tensor& vl, double scale) {
  for (const at::Tensor* t : {&q, &km, &vm, &kl, &vl}) {
    TORCH_CHECK(t->device().is_cpu(), op, ": the native kernel runs on CPU tensors; got one on ", t->device(),
                " (use backend='auto' or 'triton' for CUDA tensors)");
    TORCH_CHECK(t->dim() == 4, op, ": q, k_media, v_media, k_latents, v_latents must be (B, H, S, D), got ",
                t->sizes());
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), op, ": the inputs must share one dtype, got ",
                q.scalar_type(), " and ", t->scalar_type());
    TORCH_CHECK(t->size(0) == q.size(0) && t->size(1) == q.size(1) && t->size(3) == q.size(3), op, ": ",
                t->sizes(), " does not match q ", q.sizes(), " in batch, heads or head_dim");
  }
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": takes float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(km.sizes() == vm.sizes() && kl.sizes() == vl.sizes(), op,
              ": keys and values must have the same shapes, got k_media ", km.sizes(), ", v_media ", vm.sizes(),
              ", k_latents ", kl.sizes(), ", v_latents ", vl.sizes());
  TORCH_CHECK(kl.size(2) == q.size(2), op, ": k_latents has ", kl.size(2), " tokens, q has ", q.size(2),
              " latents");
  return {q.size(0), q.size(1), q.size(2), km.size(2), q.size(3), static_cast<float>(scale)};
}

// a (B, H, S, D) tensor stored in (B, S, H, D) memory, and the offset of its row (b, h, s)
at::Tensor empty_bshd(const at::Tensor& like, int64_t B, int64_t H, int64_t S, int64_t D) {
  return at::empty({B, S, H, D}, like.options()).transpose(1, 2);
}
inline int64_t bshd(int64_t b, int64_t h, int64_t s, int64_t H, int64_t S, int64_t D) {
  return ((b * S + s) * H + h) * D;
}

// the keys of one (b, h), in chunks of at most kKeys keys of one source: media rows, then latents
struct Chunk {
  bool latents;
  int64_t first, n;
};

std::vector<Chunk> chunks(int64_t V, int64_t L) {
  std::vector<Chunk> out;
  for (int64_t c = 0; c < V; c += kKeys) out.push_back({false, c, std::min(kKeys, V - c)});
  for (int64_t c = 0; c < L; c += kKeys) out.push_back({true, c, std::min(kKeys, L - c)});
  return out;
}

template <typename T>
struct Sources {
  const Operand<T> km, vm, kl, vl;
  Sources(const at::Tensor& km_, const at::Tensor& vm_, const at::Tensor& kl_, const at::Tensor& vl_)
      : km(km_), vm(vm_), kl(kl_), vl(vl_) {}
  const Operand<T>& keys(const Chunk& c) const { return c.latents ? kl : km; }
  const Operand<T>& values(const Chunk& c) const { return c.latents ? vl : vm; }
};

// ---------------------------------------------------------------------------------------------
template <typename T>
void forward_impl(const at::Tensor& q, const Sources<T>& src, const Shape& sh, at::Tensor& out, at::Tensor& lse) {
  const Operand<T> Q(q);
  T* out_p = out.data_ptr<T>();
  float* lse_p = lse.data_ptr<float>();
  const int64_t D = sh.D, L = sh.L;
  const int64_t blocks = (L + kTokens - 1) / kTokens;
  const std::vector<Chunk> keys = chunks(sh.V, L);
  const int64_t kc_max = std::min(std::max(sh.V, L), kKeys);
  at::parallel_for(0, sh.B * sh.H * blocks, 1, [&](int64_t begin, int64_t end) {
    // qt: the block's (scale q)^T (D x padded(n)); st: S^T, then P^T, of one chunk (keys x queries)
    std::vector<float> qt(D * kTokens), acc(kTokens * D), kbuf(kc_max * D), vbuf(kc_max * D), st(kc_max * kTokens);
    std::vector<float> row_max(kTokens), row_sum(kTokens), mx(kTokens), sum(kTokens);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, b = bh / sh.H, h = bh % sh.H;
      const int64_t t0 = (task % blocks) * kTokens, n = std::min(kTokens, L - t0), ld = padded(n);
      load(Q, b, h, nullptr, t0, n, D, sh.scale, qt.data(), true);
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (const Chunk& c : keys) {
        const auto [kp, ldk] = rows_fp32(src.keys(c), b, h, c.first, c.n, D, kbuf.data());
        const auto [vp, ldv] = rows_fp32(src.values(c), b, h, c.first, c.n, D, vbuf.data());
        gemm(c.n, ld, D, MatA{kp, ldk, 1}, qt.data(), ld, st.data(), ld, false);  // S^T (c.n x ld)
        // online softmax, one column per query: vector operations across the queries
        std::copy(row_max.begin(), row_max.begin() + n, mx.begin());
        for (int64_t j = 0; j < c.n; ++j) {
          const float* sj = &st[j * ld];
#pragma omp simd
          for (int64_t a = 0; a < n; ++a) mx[a] = std::max(mx[a], sj[a]);
        }
        std::fill(sum.begin(), sum.end(), 0.0f);
        for (int64_t j = 0; j < c.n; ++j) {
          float* sj = &st[j * ld];
#pragma omp simd
          for (int64_t a = 0; a < n; ++a) {
            sj[a] = exp_nonpositive(sj[a] - mx[a]);
            sum[a] += sj[a];
          }
        }
        for (int64_t a = 0; a < n; ++a) {
          const float alpha = exp_nonpositive(row_max[a] - mx[a]);  // 0 on the first chunk (-inf)
          row_sum[a] = row_sum[a] * alpha + sum[a];
          row_max[a] = mx[a];
          float* ar = &acc[a * D];
          for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
        }
        gemm(n, D, c.n, MatA{st.data(), 1, ld}, vp, ldv, acc.data(), D, true);  // acc += P V
      }
      for (int64_t a = 0; a < n; ++a) {  // every latent sees at least itself: row_sum > 0
        const int64_t t = t0 + a;
        T* o = out_p + bshd(b, h, t, sh.H, L, D);
        const float inv = 1.0f / row_sum[a];
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[a * D + d] * inv);
        lse_p[bh * L + t] = row_max[a] + std::log(row_sum[a]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& q, const at::Tensor& k_media, const at::Tensor& v_media,
                                           const at::Tensor& k_latents, const at::Tensor& v_latents, double scale) {
  const Shape sh = check_inputs("fastflamingo_native.perceiver_attention", q, k_media, v_media, k_latents,
                                v_latents, scale);
  at::Tensor out = empty_bshd(q, sh.B, sh.H, sh.L, sh.D);
  at::Tensor lse = at::empty({sh.B, sh.H, sh.L}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "perceiver_forward", [&] {
    forward_impl<scalar_t>(q, Sources<scalar_t>(k_media, v_media, k_latents, v_latents), sh, out, lse);
  });
  return {out, lse};
}

// ---------------------------------------------------------------------------------------------
// FA2's backward, transposed like the forward: P^T = exp(S^T - lse), dP^T = V dO^T,
// dS^T = P^T * (dP^T - delta) (delta = rowsum(dO * O)); dV += P^T dO, dK += dS^T (scale Q),
// dQ += scale dS K. One task per (b, h) holds every key's dk, dv in fp32 and each block's dq.
template <typename T>
void backward_impl(const at::Tensor& dout, const at::Tensor& q, const Sources<T>& src, const float* lse,
                   const float* delta, const Shape& sh, at::Tensor& dq, at::Tensor& dkm, at::Tensor& dvm,
                   at::Tensor& dkl, at::Tensor& dvl) {
  const Operand<T> Q(q), dO(dout);
  const int64_t D = sh.D, L = sh.L, V = sh.V;
  const std::vector<Chunk> keys = chunks(V, L);
  const int64_t kc_max = std::min(std::max(V, L), kKeys);
  at::parallel_for(0, sh.B * sh.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qa(kTokens * D), qat(kTokens * D), doa(kTokens * D), doat(kTokens * D), dq32(kTokens * D);
    std::vector<float> kbuf(kc_max * D), vbuf(kc_max * D), pt(kc_max * kTokens), dpt(kc_max * kTokens);
    std::vector<float> lse_a(kTokens), delta_a(kTokens);
    // fp32 dk, dv of every key: media rows 0..V-1, then latents V..V+L-1
    std::vector<float> dk32((V + L) * D), dv32((V + L) * D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / sh.H, h = bh % sh.H;
      std::fill(dk32.begin(), dk32.end(), 0.0f);
      std::fill(dv32.begin(), dv32.end(), 0.0f);
      for (int64_t t0 = 0; t0 < L; t0 += kTokens) {
        const int64_t na = std::min(kTokens, L - t0), ld = padded(na);
        load(Q, b, h, nullptr, t0, na, D, sh.scale, qa.data());
        load(Q, b, h, nullptr, t0, na, D, sh.scale, qat.data(), true);
        load(dO, b, h, nullptr, t0, na, D, 1.0f, doa.data());
        load(dO, b, h, nullptr, t0, na, D, 1.0f, doat.data(), true);
        for (int64_t a = 0; a < na; ++a) {
          lse_a[a] = lse[bh * L + t0 + a];
          delta_a[a] = delta[bh * L + t0 + a];
        }
        std::fill(dq32.begin(), dq32.end(), 0.0f);
        for (const Chunk& c : keys) {
          const auto [kp, ldk] = rows_fp32(src.keys(c), b, h, c.first, c.n, D, kbuf.data());
          const auto [vp, ldv] = rows_fp32(src.values(c), b, h, c.first, c.n, D, vbuf.data());
          gemm(c.n, ld, D, MatA{kp, ldk, 1}, qat.data(), ld, pt.data(), ld, false);    // S^T
          gemm(c.n, ld, D, MatA{vp, ldv, 1}, doat.data(), ld, dpt.data(), ld, false);  // dP^T = V dO^T
          for (int64_t j = 0; j < c.n; ++j) {
            float* pj = &pt[j * ld];
            float* dj = &dpt[j * ld];
#pragma omp simd
            for (int64_t a = 0; a < na; ++a) {
              pj[a] = exp_nonpositive(pj[a] - lse_a[a]);  // P^T, from the forward's lse
              dj[a] = pj[a] * (dj[a] - delta_a[a]);       // dS^T
            }
          }
          const int64_t row0 = (c.latents ? V : 0) + c.first;
          gemm(c.n, D, na, MatA{pt.data(), ld, 1}, doa.data(), D, &dv32[row0 * D], D, true);   // dV += P^T dO
          gemm(c.n, D, na, MatA{dpt.data(), ld, 1}, qa.data(), D, &dk32[row0 * D], D, true);  // dK += dS^T (scale Q)
          for (int64_t i = 0; i < c.n * ld; ++i) dpt[i] *= sh.scale;
          gemm(na, D, c.n, MatA{dpt.data(), 1, ld}, kp, ldk, dq32.data(), D, true);  // dQ += scale dS K
        }
        for (int64_t a = 0; a < na; ++a) store(&dq32[a * D], D, dq.data_ptr<T>() + bshd(b, h, t0 + a, sh.H, L, D));
      }
      for (int64_t s = 0; s < V; ++s) {
        store(&dk32[s * D], D, dkm.data_ptr<T>() + bshd(b, h, s, sh.H, V, D));
        store(&dv32[s * D], D, dvm.data_ptr<T>() + bshd(b, h, s, sh.H, V, D));
      }
      for (int64_t s = 0; s < L; ++s) {
        store(&dk32[(V + s) * D], D, dkl.data_ptr<T>() + bshd(b, h, s, sh.H, L, D));
        store(&dv32[(V + s) * D], D, dvl.data_ptr<T>() + bshd(b, h, s, sh.H, L, D));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k_media, const at::Tensor& v_media,
    const at::Tensor& k_latents, const at::Tensor& v_latents, const at::Tensor& out, const at::Tensor& lse,
    double scale) {
  const char* op = "fastflamingo_native.perceiver_attention_backward";
  const Shape sh = check_inputs(op, q, k_media, v_media, k_latents, v_latents, scale);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes() && dout.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              op, ": dout ", dout.sizes(), " and out ", out.sizes(), " must be like q ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == q.sizes().slice(0, 3), op,
              ": lse must be float32 (B, H, L), got ", lse.scalar_type(), " ", lse.sizes());
  const at::Tensor delta = (dout.to(at::kFloat) * out.to(at::kFloat)).sum(-1).contiguous();
  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dq = empty_bshd(q, sh.B, sh.H, sh.L, sh.D);
  at::Tensor dkm = empty_bshd(q, sh.B, sh.H, sh.V, sh.D), dvm = empty_bshd(q, sh.B, sh.H, sh.V, sh.D);
  at::Tensor dkl = empty_bshd(q, sh.B, sh.H, sh.L, sh.D), dvl = empty_bshd(q, sh.B, sh.H, sh.L, sh.D);
  if (q.numel() == 0) return {dq, dkm.zero_(), dvm.zero_(), dkl, dvl};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "perceiver_backward", [&] {
    backward_impl<scalar_t>(dout, q, Sources<scalar_t>(k_media, v_media, k_latents, v_latents),
                            lse_c.data_ptr<float>(), delta.data_ptr<float>(), sh, dq, dkm, dvm, dkl, dvl);
  });
  return {dq, dkm, dvm, dkl, dvl};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastflamingo_native, m) {
  m.def("perceiver_attention(Tensor q, Tensor k_media, Tensor v_media, Tensor k_latents, Tensor v_latents, "
        "float scale) -> (Tensor, Tensor)");
  m.def("perceiver_attention_backward(Tensor dout, Tensor q, Tensor k_media, Tensor v_media, Tensor k_latents, "
        "Tensor v_latents, Tensor out, Tensor lse, float scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastflamingo_native, CPU, m) {
  m.impl("perceiver_attention", &forward);
  m.impl("perceiver_attention_backward", &backward);
}

}  // namespace fastflamingo_native
