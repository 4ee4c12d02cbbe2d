// Fused CPU batch-norm kernels for bnlab (see bnlab/norm/kernels.py for the design and the Python side).
//
// Layouts: an input (N, C, *spatial) is read either as "planar" (N, C, S) contiguous, where each channel
// is N contiguous segments of S values, or as "rows" (R = N*S, C) with C contiguous: channels_last
// (2-D and 3-D images) and (N, C) inputs. Anything else is made contiguous first.
//
// Numerics: per-channel statistics by blocks. Each block (at most a few thousand values, so it sits
// in L1/L2 while it is read twice) is first averaged, then its deviations from that shift are summed
// (sum and sum of squares, corrected two-pass: M2 = sum d^2 - (sum d)^2 / n) in float64, and blocks
// are merged with Chan et al.'s pairwise formula. So the data is read from memory once, no naive sum
// of squares is ever formed, and a constant float32 channel gets a variance of exactly 0.
// Normalization subtracts the mean before scaling; for float32/half the float64 mean is split into
// hi + lo floats, ((x - hi) - lo) * a + b, which keeps the accuracy of a float64 subtraction at
// float32 speed when |mean| >> std.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/library.h>

#include <sys/mman.h>

#include <cstdlib>
#include <string>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };

constexpr int64_t kBlock = 2048;          // values per block in the planar layout
constexpr int64_t kRowBlockValues = 8192;  // values per row block in the rows layout
// ... but at least this many rows per block in the statistics: each block ends in a merge per channel
// (divisions), which with few rows per block (many channels) cost as much as reading the block.
// (Layers of up to 128 channels keep kRowBlockValues / C rows, so their statistics are unchanged.)
constexpr int64_t kMinStatRows = 64;
constexpr int64_t kGrainValues = 32768;   // fewer values than this per task: no extra thread
constexpr int64_t kCacheBytes = 768 * 1024;  // a channel this small is processed while it stays in cache

struct Layout {
  bool rows;
  int64_t N, C, S, R;  // R = N * S
};

// The tensor to read (a dense view in one of the two layouts) and its description.
Tensor dense_input(const Tensor& x, Layout& L) {
  L.N = x.size(0);
  L.C = x.size(1);
  L.S = (L.N * L.C) ? x.numel() / (L.N * L.C) : 0;
  L.R = L.N * L.S;
  if (x.is_contiguous()) {
    L.rows = (L.S == 1);
    return x;
  }
  if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    L.rows = true;
    return x;
  }
  L.rows = (L.S == 1);
  return x.contiguous();
}

// A fresh output in x's layout. Large outputs are fresh pages from the OS, and first-touch page faults
// of 4 KiB pages cost more than the arithmetic of BN; asking for transparent huge pages (2 MiB, where
// the kernel allows them: THP "madvise" or "always") makes that cost a few faults per tensor. On the VM
// bnlab was measured on, though, huge-page faults come in bursts: 41-68 ms per fresh 32 MiB output
// instead of 4-7 ms, for 6-10 of the first 13 outputs of most processes, 2 threads (bench/huge_pages.py).
// Not compaction (/proc/vmstat: no compaction stall, no THP fallback); the cause is not established (a
// suspect: the VM hands free 2 MiB blocks back to its host, which must back them again on first touch).
// Training outputs take the hint (forward+backward 1.28-1.49x torch with it, 1.12-1.13x without, 2
// threads; a training loop soon leaves the bursts behind); the eval output does not (there the bursts
// made one case 0.55x torch in 5 of 6 runs; without the hint eval is 1.00-1.08x).
// BNLAB_HUGE_PAGES=0 (read once) turns the hint off entirely.
Tensor empty_out(const Tensor& x, bool huge_pages = true) {
  Tensor y = at::empty_like(x);
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const size_t bytes = y.nbytes();
  static const bool hint = [] {
    const char* v = std::getenv("BNLAB_HUGE_PAGES");
    return v == nullptr || std::string(v) != "0";
  }();
  if (huge_pages && hint && bytes >= 4 * kHuge) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(y.data_ptr());
    const uintptr_t start = (p + kHuge - 1) & ~(kHuge - 1), end = (p + bytes) & ~(kHuge - 1);
    if (end > start) madvise(reinterpret_cast<void*>(start), end - start, MADV_HUGEPAGE);  // a hint; errors ignored
  }
  return y;
}

Tensor like_layout(const Tensor& dense, const Tensor& other) {
  // other in the memory format of dense (a no-op when it already is)
  if (dense.is_contiguous()) return other.contiguous();
  if (dense.dim() == 4) return other.contiguous(at::MemoryFormat::ChannelsLast);
  return other.contiguous(at::MemoryFormat::ChannelsLast3d);
}

// (C,) tensor of any floating dtype (or undefined: fill) -> float64 values on the host.
std::vector<double> channel_values(const c10::optional<Tensor>& t, int64_t C, double fill) {
  std::vector<double> v(C, fill);
  if (!t.has_value() || !t->defined()) return v;
  Tensor c = t->contiguous();
  TORCH_CHECK(c.numel() == C, "bnlab kernels: per-channel tensor has ", c.numel(), " entries, expected ", C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, c.scalar_type(), "bnlab_channel_values", [&] {
    const scalar_t* p = c.const_data_ptr<scalar_t>();
    for (int64_t i = 0; i < C; ++i) v[i] = static_cast<double>(p[i]);
  });
  return v;
}

struct Moments {  // count, mean, sum of squared deviations
  double n = 0, mean = 0, m2 = 0;
  void merge(double nb, double mb, double m2b) {
    if (nb == 0) return;
    if (n == 0) { n = nb; mean = mb; m2 = m2b; return; }
    double tot = n + nb, delta = mb - mean;
    mean += delta * (nb / tot);
    m2 += m2b + delta * delta * (n * nb / tot);
    n = tot;
  }
};

// One block of len values at p with stride 1: corrected two-pass moments.
template <typename T>
inline void block_moments(const T* p, int64_t len, double& mean, double& m2) {
  using O = typename OpMath<T>::type;
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < len; ++i) s += static_cast<double>(p[i]);
  const O k = static_cast<O>(s / len);
  double s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
  for (int64_t i = 0; i < len; ++i) {
    const double d = static_cast<double>(static_cast<O>(p[i]) - k);
    s1 += d;
    s2 += d * d;
  }
  mean = static_cast<double>(k) + s1 / len;
  m2 = std::max(s2 - s1 * s1 / len, 0.0);
}

// Per-channel (mean, biased M2) of x in the given layout; parallel over channels (planar) or row
// blocks with per-thread partial moments (rows).
template <typename T>
void channel_moments(const T* x, const Layout& L, std::vector<Moments>& out) {
  using O = typename OpMath<T>::type;
  const int64_t C = L.C;
  out.assign(C, Moments());
  if (!L.rows) {
    const int64_t per_channel = L.N * L.S;
    const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(per_channel, 1));
    at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        Moments m;
        for (int64_t n = 0; n < L.N; ++n) {
          const T* seg = x + (n * C + c) * L.S;
          for (int64_t s0 = 0; s0 < L.S; s0 += kBlock) {
            const int64_t len = std::min(kBlock, L.S - s0);
            double mb, m2b;
            block_moments(seg + s0, len, mb, m2b);
            m.merge(static_cast<double>(len), mb, m2b);
          }
        }
        out[c] = m;
      }
    });
    return;
  }
  const int64_t rows_per_block = std::max<int64_t>(kMinStatRows, kRowBlockValues / C);
  const int64_t nblocks = (L.R + rows_per_block - 1) / rows_per_block;
  const int64_t grain = std::max<int64_t>(1, kGrainValues / (rows_per_block * C));
  // Partial moments per chunk of blocks (not per thread id, which need not be below the thread
  // count), merged in chunk order: deterministic for a given thread count.
  const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (nblocks + grain - 1) / grain));
  const int64_t per_chunk = (nblocks + nchunks - 1) / nchunks;
  std::vector<Moments> partial(static_cast<size_t>(nchunks * C));
  at::parallel_for(0, nchunks, 1, [&](int64_t t0, int64_t t1) {
   for (int64_t t = t0; t < t1; ++t) {
    Moments* mine = partial.data() + t * C;
    const int64_t b0 = t * per_chunk, b1 = std::min(nblocks, b0 + per_chunk);
    std::vector<double> sum(C), s1(C), s2(C);
    for (int64_t b = b0; b < b1; ++b) {
      // Shifted data per block: the block's first row is the shift, deviations in float64 (exact for
      // float32/half inputs), one pass; the corrected sum of squares, then Chan's merge.
      const int64_t r0 = b * rows_per_block, r1 = std::min(L.R, r0 + rows_per_block);
      const double len = static_cast<double>(r1 - r0);
      const T* first = x + r0 * C;
      double* kp = sum.data();
      for (int64_t c = 0; c < C; ++c) kp[c] = static_cast<double>(first[c]);
      std::fill(s1.begin(), s1.end(), 0.0);
      std::fill(s2.begin(), s2.end(), 0.0);
      for (int64_t r = r0 + 1; r < r1; ++r) {
        const T* row = x + r * C;
        double* a = s1.data();
        double* q = s2.data();
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const double d = static_cast<double>(row[c]) - kp[c];
          a[c] += d;
          q[c] += d * d;
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        mine[c].merge(len, kp[c] + s1[c] / len, std::max(s2[c] - s1[c] * s1[c] / len, 0.0));
      }
    }
   }
  });
  for (int64_t t = 0; t < nchunks; ++t) {
    for (int64_t c = 0; c < C; ++c) {
      const Moments& p = partial[static_cast<size_t>(t * C + c)];
      out[c].merge(p.n, p.mean, p.m2);
    }
  }
}

// y = ((x - hi) - lo) * a + b per channel; hi + lo is the float64 mean split into two O values.
template <typename T>
void affine_pass(const T* x, T* y, const Layout& L, const std::vector<double>& mean, const std::vector<double>& a,
                 const std::vector<double>& b) {
  using O = typename OpMath<T>::type;
  const int64_t C = L.C;
  std::vector<O> hi(C), lo(C), av(C), bv(C);
  for (int64_t c = 0; c < C; ++c) {
    hi[c] = static_cast<O>(mean[c]);
    lo[c] = static_cast<O>(mean[c] - static_cast<double>(hi[c]));
    av[c] = static_cast<O>(a[c]);
    bv[c] = static_cast<O>(b[c]);
  }
  if (!L.rows) {
    const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(L.S, 1));
    at::parallel_for(0, L.N * C, grain, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t c = i % C;
        const O h = hi[c], l = lo[c], s = av[c], t = bv[c];
        const T* src = x + i * L.S;
        T* dst = y + i * L.S;
#pragma omp simd
        for (int64_t j = 0; j < L.S; ++j) dst[j] = static_cast<T>(((static_cast<O>(src[j]) - h) - l) * s + t);
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kGrainValues / C);
  at::parallel_for(0, L.R, grain, [&](int64_t r0, int64_t r1) {
    const O* h = hi.data();
    const O* l = lo.data();
    const O* s = av.data();
    const O* t = bv.data();
    for (int64_t r = r0; r < r1; ++r) {
      const T* src = x + r * C;
      T* dst = y + r * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<T>(((static_cast<O>(src[c]) - h[c]) - l[c]) * s[c] + t[c]);
    }
  });
}

// Planar layout, one channel at a time (parallel over channels): its moments from memory, then its
// normalization from the core's cache, so the input is read from memory once.
template <typename T>
void train_planar_fused(const T* x, T* y, const Layout& L, const std::vector<double>& w, const std::vector<double>& b,
                        double eps, std::vector<double>& mean, std::vector<double>& invstd,
                        std::vector<double>& var_unbiased) {
  using O = typename OpMath<T>::type;
  const int64_t C = L.C;
  const double m = static_cast<double>(L.R);
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(L.R, 1));
  at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      Moments mo;
      for (int64_t n = 0; n < L.N; ++n) {
        const T* seg = x + (n * C + c) * L.S;
        for (int64_t s0 = 0; s0 < L.S; s0 += kBlock) {
          const int64_t len = std::min(kBlock, L.S - s0);
          double mb, m2b;
          block_moments(seg + s0, len, mb, m2b);
          mo.merge(static_cast<double>(len), mb, m2b);
        }
      }
      mean[c] = mo.mean;
      invstd[c] = 1.0 / std::sqrt(mo.m2 / m + eps);
      var_unbiased[c] = mo.m2 / (m - 1.0);
      const O h = static_cast<O>(mo.mean), l = static_cast<O>(mo.mean - static_cast<double>(h));
      const O s = static_cast<O>(w[c] * invstd[c]), t = static_cast<O>(b[c]);
      for (int64_t n = 0; n < L.N; ++n) {
        const T* src = x + (n * C + c) * L.S;
        T* dst = y + (n * C + c) * L.S;
#pragma omp simd
        for (int64_t j = 0; j < L.S; ++j) dst[j] = static_cast<T>(((static_cast<O>(src[j]) - h) - l) * s + t);
      }
    }
  });
}

// torch.lerp's form: exact at both ends (f = 1 gives the batch value, as momentum=None's first batch needs).
inline double lerp(double a, double b, double f) {
  return f < 0.5 ? a + f * (b - a) : b - (b - a) * (1.0 - f);
}

at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

bool finite_in(double v, at::ScalarType t) {
  if (t == at::kDouble) return std::isfinite(v);
  if (t == at::kFloat) return std::isfinite(static_cast<float>(v));
  if (t == at::kHalf) return std::isfinite(static_cast<float>(static_cast<at::Half>(static_cast<float>(v))));
  if (t == at::kBFloat16) return std::isfinite(static_cast<float>(static_cast<at::BFloat16>(static_cast<float>(v))));
  return std::isfinite(v);
}

Tensor from_values(const std::vector<double>& v, const Tensor& like) {
  Tensor out = at::empty({static_cast<int64_t>(v.size())}, like.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "bnlab_from_values", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  return out;
}

void check_x(const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu(), "bnlab kernels run on the CPU; got a tensor on ", x.device());
  TORCH_CHECK(x.dim() >= 2, "bnlab kernels expect an input (N, C, ...), got ", x.dim(), " dims");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "bnlab kernels expect a floating-point input");
}

// Training forward: batch statistics, normalize + affine, and the guarded running-statistics update.
using TrainOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The batch statistics and the normalized output; stats rows: batch mean, 1/sqrt(biased variance + eps),
// unbiased variance (float64).
std::pair<Tensor, Tensor> train_forward(const Tensor& x_in, const c10::optional<Tensor>& weight,
                                        const c10::optional<Tensor>& bias, double eps) {
  check_x(x_in);
  Layout L;
  Tensor x = dense_input(x_in, L);
  TORCH_CHECK(L.R > 1, "bnlab kernels need more than one value per channel");
  const int64_t C = L.C;
  std::vector<Moments> mom;
  Tensor y = empty_out(x);
  const std::vector<double> w = channel_values(weight, C, 1.0);
  const std::vector<double> b = channel_values(bias, C, 0.0);
  std::vector<double> mean(C), invstd(C), var_unbiased(C), a(C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_bn_train", [&] {
    const double m = static_cast<double>(L.R);
    if (!L.rows && static_cast<int64_t>(sizeof(scalar_t)) * L.R <= kCacheBytes) {
      // A channel fits in the core's cache: statistics, then normalize it while it is still there.
      train_planar_fused<scalar_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), L, w, b, eps, mean, invstd,
                                   var_unbiased);
      return;
    }
    channel_moments<scalar_t>(x.const_data_ptr<scalar_t>(), L, mom);
    for (int64_t c = 0; c < C; ++c) {
      mean[c] = mom[c].mean;
      invstd[c] = 1.0 / std::sqrt(mom[c].m2 / m + eps);
      var_unbiased[c] = mom[c].m2 / (m - 1.0);
      a[c] = w[c] * invstd[c];
    }
    affine_pass<scalar_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), L, mean, a, b);
  });
  Tensor stats = at::empty({3, C}, x.options().dtype(at::kDouble));
  double* sp = stats.data_ptr<double>();
  std::copy(mean.begin(), mean.end(), sp);
  std::copy(invstd.begin(), invstd.end(), sp + C);
  std::copy(var_unbiased.begin(), var_unbiased.end(), sp + 2 * C);
  return {y, stats};
}

// The guarded running-statistics update: the proposed new values and whether the batch is accepted
// (batch statistics finite in the compute dtype, updated values representable in the buffers' dtype).
struct Update {
  std::vector<double> mean, var;
  int64_t count = 0;
  bool has_count = false, ok = true;
};

Update running_update(const Tensor& stats, at::ScalarType x_dtype, const Tensor& rm, const Tensor& rv,
                      const c10::optional<Tensor>& num_batches_tracked, double momentum, bool cumulative) {
  const int64_t C = stats.size(1);
  const double* sp = stats.const_data_ptr<double>();
  Update u;
  u.has_count = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (u.has_count) {
    TORCH_CHECK(num_batches_tracked->scalar_type() == at::kLong && num_batches_tracked->numel() == 1,
                "bnlab kernels: num_batches_tracked must be a one-element int64 tensor");
    u.count = num_batches_tracked->const_data_ptr<int64_t>()[0];  // CPU memory, no device sync
  }
  const double f = cumulative ? 1.0 / static_cast<double>(u.count + 1) : momentum;
  const std::vector<double> old_m = channel_values(rm, C, 0.0), old_v = channel_values(rv, C, 0.0);
  u.mean.resize(C);
  u.var.resize(C);
  const at::ScalarType cdt = compute_type(x_dtype);
  for (int64_t c = 0; c < C; ++c) {
    const double mean = sp[c], var_unbiased = sp[2 * C + c];
    u.ok = u.ok && finite_in(mean, cdt) && finite_in(var_unbiased, cdt);
    u.mean[c] = lerp(old_m[c], mean, f);
    u.var[c] = lerp(old_v[c], var_unbiased, f);
    u.ok = u.ok && finite_in(u.mean[c], rm.scalar_type()) && finite_in(u.var[c], rv.scalar_type());
  }
  return u;
}

Tensor accepted_flag(const Tensor& x, bool ok) {
  Tensor accepted = at::empty({}, x.options().dtype(at::kBool));
  accepted.data_ptr<bool>()[0] = ok;
  return accepted;
}

TrainOut bn_train(
    const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
    const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
    const c10::optional<Tensor>& num_batches_tracked, double momentum, bool cumulative, double eps) {
  auto [y, stats] = train_forward(x, weight, bias, eps);
  auto dopt = x.options().dtype(at::kDouble);
  Tensor new_rm, new_rv, new_count, accepted;
  const bool update = running_mean.has_value() && running_mean->defined() && running_var.has_value() &&
                      running_var->defined();
  if (!update) {
    new_rm = at::empty({0}, dopt);
    new_rv = at::empty({0}, dopt);
    new_count = at::empty({0}, x.options().dtype(at::kLong));
    accepted = at::empty({0}, x.options().dtype(at::kBool));
    return {y, stats, new_rm, new_rv, new_count, accepted};
  }
  const Tensor& rm = *running_mean;
  const Tensor& rv = *running_var;
  // The same guard as the composite core (see running_update).
  const Update u = running_update(stats, x.scalar_type(), rm, rv, num_batches_tracked, momentum, cumulative);
  new_rm = u.ok ? from_values(u.mean, rm) : rm.clone();
  new_rv = u.ok ? from_values(u.var, rv) : rv.clone();
  new_count = at::empty(u.has_count ? num_batches_tracked->sizes() : at::IntArrayRef{0}, x.options().dtype(at::kLong));
  if (u.has_count) new_count.data_ptr<int64_t>()[0] = u.count + (u.ok ? 1 : 0);
  return {y, stats, new_rm, new_rv, new_count, accepted_flag(x, u.ok)};
}

// Write per-channel float64 values into a (C,) tensor of any floating dtype, in place.
void store_values(const std::vector<double>& v, Tensor& t) {
  if (!t.is_contiguous()) {
    t.copy_(from_values(v, t));
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "bnlab_store_values", [&] {
    scalar_t* p = t.data_ptr<scalar_t>();
    for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<scalar_t>(v[i]);
  });
  t.unsafeGetTensorImpl()->bump_version();  // what an in-place torch op does (autograd checks it)
}

// The training forward of a BN module in eager mode: as bn_train, but the running statistics (and
// the counter) are updated in place, as torch's native batch norm does, instead of being returned:
// a small layer (the Ioffe MLP's BatchNorm1d(100) at batch 60) is dominated by per-call costs, and
// three returned tensors plus three Python-side copy_ calls were a third of it. Graph capture keeps
// the functional bn_train.
using TrainInplaceOut = std::tuple<Tensor, Tensor, Tensor>;

TrainInplaceOut bn_train_(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                          Tensor& running_mean, Tensor& running_var, const c10::optional<Tensor>& num_batches_tracked,
                          double momentum, bool cumulative, double eps) {
  auto [y, stats] = train_forward(x, weight, bias, eps);
  const Update u = running_update(stats, x.scalar_type(), running_mean, running_var, num_batches_tracked, momentum,
                                  cumulative);
  if (u.ok) {
    store_values(u.mean, running_mean);
    store_values(u.var, running_var);
    if (u.has_count) {
      Tensor count = *num_batches_tracked;
      count.data_ptr<int64_t>()[0] = u.count + 1;
      count.unsafeGetTensorImpl()->bump_version();
    }
  }
  return {y, stats, accepted_flag(x, u.ok)};
}

template <typename scalar_t>
void backward_impl(const Tensor& x, const Tensor& dy, Tensor& dx, const Layout& L, bool input_grad,
                   const std::vector<double>& w, const std::vector<double>& mean, const std::vector<double>& invstd,
                   std::vector<double>& sdy, std::vector<double>& sdyd) {
  const int64_t C = L.C;
    using O = typename OpMath<scalar_t>::type;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = dy.const_data_ptr<scalar_t>();
    std::vector<O> hi(C), lo(C);
    for (int64_t c = 0; c < C; ++c) {
      hi[c] = static_cast<O>(mean[c]);
      lo[c] = static_cast<O>(mean[c] - static_cast<double>(hi[c]));
    }
    const double m = static_cast<double>(L.R);
    if (!L.rows && input_grad && 2 * static_cast<int64_t>(sizeof(scalar_t)) * L.R <= 2 * kCacheBytes) {
      // A channel's x and dy fit in the core's cache: reduce, then the elementwise pass from cache.
      const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(L.R, 1));
      scalar_t* dp = dx.data_ptr<scalar_t>();
      at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const O h = hi[c], l = lo[c];
          double a = 0, q = 0;
          for (int64_t n = 0; n < L.N; ++n) {
            const scalar_t* xs = xp + (n * C + c) * L.S;
            const scalar_t* gs = gp + (n * C + c) * L.S;
#pragma omp simd reduction(+ : a, q)
            for (int64_t j = 0; j < L.S; ++j) {
              const O g = static_cast<O>(gs[j]);
              a += static_cast<double>(g);
              q += static_cast<double>(g * ((static_cast<O>(xs[j]) - h) - l));
            }
          }
          sdy[c] = a;
          sdyd[c] = q;
          const double sc = w[c] * invstd[c];
          const O s = static_cast<O>(sc), k = static_cast<O>(-sc * invstd[c] * invstd[c] * q / m),
                  e = static_cast<O>(-sc * a / m);
          for (int64_t n = 0; n < L.N; ++n) {
            const scalar_t* xs = xp + (n * C + c) * L.S;
            const scalar_t* gs = gp + (n * C + c) * L.S;
            scalar_t* ds = dp + (n * C + c) * L.S;
#pragma omp simd
            for (int64_t j = 0; j < L.S; ++j) {
              ds[j] = static_cast<scalar_t>(static_cast<O>(gs[j]) * s + ((static_cast<O>(xs[j]) - h) - l) * k + e);
            }
          }
        }
      });
      return;
    }
    if (!L.rows) {
      const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(L.N * L.S, 1));
      at::parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
          const O h = hi[c], l = lo[c];
          double a = 0, q = 0;
          for (int64_t n = 0; n < L.N; ++n) {
            const scalar_t* xs = xp + (n * C + c) * L.S;
            const scalar_t* gs = gp + (n * C + c) * L.S;
#pragma omp simd reduction(+ : a, q)
            for (int64_t j = 0; j < L.S; ++j) {
              const O g = static_cast<O>(gs[j]);
              a += static_cast<double>(g);
              q += static_cast<double>(g * ((static_cast<O>(xs[j]) - h) - l));
            }
          }
          sdy[c] = a;
          sdyd[c] = q;
        }
      });
    } else {
      const int64_t rows_per_block = std::max<int64_t>(1, kRowBlockValues / C);
      const int64_t nblocks = (L.R + rows_per_block - 1) / rows_per_block;
      const int64_t grain = std::max<int64_t>(1, kGrainValues / (rows_per_block * C));
      const int64_t nchunks =
          std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (nblocks + grain - 1) / grain));
      const int64_t per_chunk = (nblocks + nchunks - 1) / nchunks;
      std::vector<double> partial(static_cast<size_t>(nchunks * 2 * C), 0.0);
      at::parallel_for(0, nchunks, 1, [&](int64_t t0, int64_t t1) {
       for (int64_t t = t0; t < t1; ++t) {
        double* a = partial.data() + t * 2 * C;
        double* q = a + C;
        const int64_t b0 = t * per_chunk, b1 = std::min(nblocks, b0 + per_chunk);
        const O* h = hi.data();
        const O* l = lo.data();
        for (int64_t r = b0 * rows_per_block; r < std::min(L.R, b1 * rows_per_block); ++r) {
          const scalar_t* xs = xp + r * C;
          const scalar_t* gs = gp + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            const O g = static_cast<O>(gs[c]);
            a[c] += static_cast<double>(g);
            q[c] += static_cast<double>(g * ((static_cast<O>(xs[c]) - h[c]) - l[c]));
          }
        }
       }
      });
      for (int64_t t = 0; t < nchunks; ++t) {
        for (int64_t c = 0; c < C; ++c) {
          sdy[c] += partial[static_cast<size_t>(t * 2 * C + c)];
          sdyd[c] += partial[static_cast<size_t>(t * 2 * C + C + c)];
        }
      }
    }
    if (!input_grad) return;
    std::vector<O> av(C), kv(C), ev(C);
    for (int64_t c = 0; c < C; ++c) {
      const double s = w[c] * invstd[c];
      av[c] = static_cast<O>(s);
      kv[c] = static_cast<O>(-s * invstd[c] * invstd[c] * sdyd[c] / m);
      ev[c] = static_cast<O>(-s * sdy[c] / m);
    }
    scalar_t* dp = dx.data_ptr<scalar_t>();
    if (!L.rows) {
      const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(L.S, 1));
      at::parallel_for(0, L.N * C, grain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          const int64_t c = i % C;
          const O h = hi[c], l = lo[c], s = av[c], k = kv[c], e = ev[c];
          const scalar_t* xs = xp + i * L.S;
          const scalar_t* gs = gp + i * L.S;
          scalar_t* ds = dp + i * L.S;
#pragma omp simd
          for (int64_t j = 0; j < L.S; ++j) {
            ds[j] = static_cast<scalar_t>(static_cast<O>(gs[j]) * s + ((static_cast<O>(xs[j]) - h) - l) * k + e);
          }
        }
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, kGrainValues / C);
      at::parallel_for(0, L.R, grain, [&](int64_t r0, int64_t r1) {
        const O* h = hi.data();
        const O* l = lo.data();
        const O* s = av.data();
        const O* k = kv.data();
        const O* e = ev.data();
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xs = xp + r * C;
          const scalar_t* gs = gp + r * C;
          scalar_t* ds = dp + r * C;
#pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            ds[c] = static_cast<scalar_t>(static_cast<O>(gs[c]) * s[c] + ((static_cast<O>(xs[c]) - h[c]) - l[c]) * k[c] + e[c]);
          }
        }
      });
    }
}

// Compact backward: two per-channel reductions (sum dy, sum dy * (x - mean)) and one elementwise pass
// dx = a * dy + k * (x - mean) + e with per-channel a, k, e.
std::tuple<Tensor, Tensor, Tensor> bn_backward(const Tensor& grad_out, const Tensor& x_in,
                                               const c10::optional<Tensor>& weight, const Tensor& stats,
                                               bool input_grad) {
  check_x(x_in);
  Layout L;
  Tensor x = dense_input(x_in, L);
  Tensor dy = like_layout(x, grad_out).to(x.scalar_type());
  const int64_t C = L.C;
  const std::vector<double> w = channel_values(weight, C, 1.0);
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) >= 2 && stats.size(1) == C && stats.scalar_type() == at::kDouble,
              "bnlab kernels: stats must be the (3, C) float64 tensor of bn_train");
  const Tensor st = stats.contiguous();
  const std::vector<double> mean(st.const_data_ptr<double>(), st.const_data_ptr<double>() + C);
  const std::vector<double> invstd(st.const_data_ptr<double>() + C, st.const_data_ptr<double>() + 2 * C);
  std::vector<double> sdy(C, 0.0), sdyd(C, 0.0);
  Tensor dx = input_grad ? empty_out(x) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_bn_backward", [&] {
    backward_impl<scalar_t>(x, dy, dx, L, input_grad, w, mean, invstd, sdy, sdyd);
  });
  std::vector<double> gw(C);
  for (int64_t c = 0; c < C; ++c) gw[c] = sdyd[c] * invstd[c];
  const Tensor& like = (weight.has_value() && weight->defined()) ? *weight : at::empty({0}, x.options().dtype(compute_type(x.scalar_type())));
  return {dx, from_values(gw, like), from_values(sdy, like)};
}

// Eval forward: one fused pass (x - running_mean) * weight / sqrt(running_var + eps) + bias.
Tensor bn_eval(const Tensor& x_in, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
               const Tensor& running_mean, const Tensor& running_var, double eps) {
  check_x(x_in);
  Layout L;
  Tensor x = dense_input(x_in, L);
  const int64_t C = L.C;
  const std::vector<double> w = channel_values(weight, C, 1.0);
  const std::vector<double> b = channel_values(bias, C, 0.0);
  const std::vector<double> rm = channel_values(running_mean, C, 0.0), rv = channel_values(running_var, C, 1.0);
  std::vector<double> a(C);
  for (int64_t c = 0; c < C; ++c) a[c] = w[c] / std::sqrt(rv[c] + eps);
  Tensor y = empty_out(x, /*huge_pages=*/false);
  if (x.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bnlab_bn_eval", [&] {
    affine_pass<scalar_t>(x.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), L, rm, a, b);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------
// Autograd in C++, so that a call costs no Python frame (small layers are dominated by call overhead).

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const c10::TypedOperatorHandle<decltype(bn_train)>& train_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnlab::bn_train", "").typed<decltype(bn_train)>();
  return op;
}
const c10::TypedOperatorHandle<decltype(bn_train_)>& train_inplace_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnlab::bn_train_", "").typed<decltype(bn_train_)>();
  return op;
}
const c10::TypedOperatorHandle<decltype(bn_backward)>& backward_op() {
  static auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("bnlab::bn_backward", "").typed<decltype(bn_backward)>();
  return op;
}
const c10::TypedOperatorHandle<decltype(bn_eval)>& eval_op() {
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("bnlab::bn_eval", "").typed<decltype(bn_eval)>();
  return op;
}

std::vector<int64_t> reduce_dims(int64_t dim) {
  std::vector<int64_t> d{0};
  for (int64_t i = 2; i < dim; ++i) d.push_back(i);
  return d;
}

std::vector<int64_t> channel_shape(int64_t dim) {
  std::vector<int64_t> s(dim, 1);
  s[1] = -1;
  return s;
}

// The gradients of the training forward (x, weight, bias; undefined where not needed). Without grad
// mode: the compact kernel. With it (create_graph=True): the textbook formula in differentiable torch
// ops, so that double backward (any order) works.
std::tuple<Tensor, Tensor, Tensor> train_grads(const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& stats,
                                               double eps, bool need_x, bool need_w, bool need_b) {
  Tensor gx, gw, gb;
  if (at::GradMode::is_enabled()) {
    const auto dims = reduce_dims(x.dim());
    const auto shape = channel_shape(x.dim());
    const at::ScalarType ct = compute_type(x.scalar_type());
    Tensor xc = x.to(ct), g = dy.to(ct);
    Tensor mu = xc.mean(dims, true);
    Tensor xmu = xc - mu;
    Tensor invstd = (xmu * xmu).mean(dims, true).add(eps).rsqrt();
    Tensor xhat = xmu * invstd;
    Tensor scale = w.defined() ? invstd * w.to(ct).reshape(shape) : invstd;
    if (need_x) gx = (scale * (g - g.mean(dims, true) - xhat * (g * xhat).mean(dims, true))).to(x.scalar_type());
    if (need_w) gw = (g * xhat).sum(dims).to(w.scalar_type());
    if (need_b) gb = g.sum(dims).to(w.defined() ? w.scalar_type() : ct);
    return {gx, gw, gb};
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  auto out = backward_op().call(dy, x, w.defined() ? c10::optional<Tensor>(w) : c10::nullopt, stats, need_x);
  if (need_x) gx = std::move(std::get<0>(out));
  if (need_w) gw = std::move(std::get<1>(out));
  if (need_b) gb = std::move(std::get<2>(out));
  return {gx, gw, gb};
}

// bn_train's autograd (the functional operator that graph capture records).
class TrainFn : public torch::autograd::Function<TrainFn> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const c10::optional<Tensor>& weight,
                               const c10::optional<Tensor>& bias, const c10::optional<Tensor>& running_mean,
                               const c10::optional<Tensor>& running_var, const c10::optional<Tensor>& count,
                               double momentum, bool cumulative, double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    // The statistics and the flag never receive a gradient: without this, every backward would
    // allocate zero-filled gradients for them.
    ctx->set_materialize_grads(false);
    auto out = train_op().call(x, weight, bias, running_mean, running_var, count, momentum, cumulative, eps);
    variable_list result = {std::get<0>(out), std::get<1>(out), std::get<2>(out), std::get<3>(out),
                            std::get<4>(out), std::get<5>(out)};
    ctx->mark_non_differentiable({result[1], result[2], result[3], result[4], result[5]});
    const Tensor w = weight.has_value() ? *weight : Tensor();
    ctx->save_for_backward({x, w, result[1]});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return result;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const Tensor& x = saved[0];
    const Tensor& w = saved[1];
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    variable_list result(9);
    if (!grads[0].defined()) return result;
    // needs_input_grad counts only the tensor arguments that were given (an absent weight has no edge)
    const bool need_x = ctx->needs_input_grad(0), need_w = w.defined() && ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(w.defined() ? 2 : 1);
    std::tie(result[0], result[1], result[2]) =
        train_grads(grads[0], x, w, saved[2], ctx->saved_data["eps"].toDouble(), need_x, need_w, need_b);
    return result;
  }
};

TrainOut bn_train_autograd(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                           const c10::optional<Tensor>& running_mean, const c10::optional<Tensor>& running_var,
                           const c10::optional<Tensor>& count, double momentum, bool cumulative, double eps) {
  auto r = TrainFn::apply(x, weight, bias, running_mean, running_var, count, momentum, cumulative, eps);
  return {r[0], r[1], r[2], r[3], r[4], r[5]};
}

// bn_train_'s backward node, written like torch's generated nodes (NativeBatchNormBackward0) rather than
// through torch::autograd::Function: bn_train_ serves only the eager forward of a BN module, where a
// small layer (the Ioffe MLP's BatchNorm1d(100) at batch 60) is dominated by per-call costs, and the
// generic Function machinery (edges for all six tensor arguments, the saved_data map, wrapping of
// every output) cost a fifth of such a layer's forward+backward. The gradients are train_grads, as
// for bn_train. (Like the Function, it has no compiled-autograd support.)
struct BnTrainBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable x_, weight_, stats_;
  bool has_weight = false, has_bias = false;
  double eps = 0;

  std::string name() const override { return "BnTrainBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x_.reset_data();
    weight_.reset_data();
    stats_.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    std::lock_guard<std::mutex> lock(mutex_);
    variable_list result(3);  // edges: x, weight, bias (an absent weight/bias has an invalid edge)
    if (!grads[0].defined()) return result;
    const bool need_x = task_should_compute_output(0), need_w = has_weight && task_should_compute_output(1);
    const bool need_b = has_bias && task_should_compute_output(2);
    std::tie(result[0], result[1], result[2]) =
        train_grads(grads[0], x_.unpack(), weight_.unpack(), stats_.unpack(), eps, need_x, need_w, need_b);
    return result;
  }
};

TrainInplaceOut bn_train__autograd(const Tensor& x, const c10::optional<Tensor>& weight,
                                   const c10::optional<Tensor>& bias, Tensor& running_mean, Tensor& running_var,
                                   const c10::optional<Tensor>& count, double momentum, bool cumulative, double eps) {
  const Tensor w = weight.has_value() ? *weight : Tensor(), b = bias.has_value() ? *bias : Tensor();
  c10::intrusive_ptr<BnTrainBackward> grad_fn;
  if (torch::autograd::compute_requires_grad(x, w, b)) {
    grad_fn = c10::make_intrusive<BnTrainBackward>();
    grad_fn->set_next_edges(torch::autograd::collect_next_edges(x, w, b));
  }
  TrainInplaceOut out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = train_inplace_op().call(x, weight, bias, running_mean, running_var, count, momentum, cumulative, eps);
  }
  if (grad_fn) {  // only the output is differentiable; the statistics and the flag have no history
    torch::autograd::set_history(std::get<0>(out), grad_fn);
    grad_fn->x_ = torch::autograd::SavedVariable(x, false);
    grad_fn->weight_ = torch::autograd::SavedVariable(w, false);
    grad_fn->stats_ = torch::autograd::SavedVariable(std::get<1>(out), false);
    grad_fn->has_weight = w.defined();
    grad_fn->has_bias = b.defined();
    grad_fn->eps = eps;
  }
  return out;
}

class EvalFn : public torch::autograd::Function<EvalFn> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const c10::optional<Tensor>& weight,
                        const c10::optional<Tensor>& bias, const Tensor& running_mean, const Tensor& running_var,
                        double eps) {
    at::AutoDispatchBelowADInplaceOrView guard;
    ctx->save_for_backward({x, weight.has_value() ? *weight : Tensor(), running_mean, running_var});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["has_bias"] = bias.has_value() && bias->defined();
    return eval_op().call(x, weight, bias, running_mean, running_var, eps);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    // The eval map is affine per channel; torch ops, so this is differentiable again.
    auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1], &rm = saved[2], &rv = saved[3];
    const double eps = ctx->saved_data["eps"].toDouble();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    variable_list result(6);
    if (!grads[0].defined()) return result;
    const at::ScalarType ct = compute_type(x.scalar_type());
    const auto dims = reduce_dims(x.dim());
    const auto shape = channel_shape(x.dim());
    Tensor g = grads[0].to(ct);
    Tensor invstd = (rv.to(ct) + eps).rsqrt();
    Tensor scale = w.defined() ? invstd * w.to(ct) : invstd;
    if (ctx->needs_input_grad(0)) result[0] = (g * scale.reshape(shape)).to(x.scalar_type());
    if (w.defined() && ctx->needs_input_grad(1))
      result[1] = ((g * (x.to(ct) - rm.to(ct).reshape(shape))).sum(dims) * invstd).to(w.scalar_type());
    if (has_bias && ctx->needs_input_grad(w.defined() ? 2 : 1))
      result[2] = g.sum(dims).to(w.defined() ? w.scalar_type() : ct);
    return result;
  }
};

Tensor bn_eval_autograd(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                        const Tensor& running_mean, const Tensor& running_var, double eps) {
  return EvalFn::apply(x, weight, bias, running_mean, running_var, eps);
}


// ---------------------------------------------------------------------------------------------------
// ℓp batch norm's one-node training path (bnlab/norm/lp.py, ``_LpTrain``): the same ATen operations, in
// the same order and with the same operands, as that Python code (which mirrors the composite that
// autograd differentiates), so the results are bit-identical; calling them from C++ only removes the
// Python interpreter and argument parsing around each of the ~15 small operations, which on the deep
// linear network's 1000 x 10 layers cost more than the arithmetic.

using LpTrainOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

LpTrainOut lp_train(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias,
                    double p, double eps, double cn) {
  const auto dims = reduce_dims(x.dim());
  const auto shape = channel_shape(x.dim());
  Tensor mu = x.mean(dims, /*keepdim=*/true);
  Tensor d = x - mu;
  Tensor a, top, stat;  // a = |d| and top = its maximum, kept for the p = inf backward; empty otherwise
  if (std::isinf(p)) {
    a = d.abs();
    top = a.amax(dims, /*keepdim=*/true);
    stat = top / cn;
  } else if (p == 1.0) {
    stat = d.abs().mean(dims, /*keepdim=*/true) * std::sqrt(M_PI / 2);
  } else {
    stat = d.pow(2).mean(dims, /*keepdim=*/true).sqrt();
  }
  Tensor s2 = stat.pow(2);
  Tensor r = (s2 + eps).rsqrt();
  const bool has_w = weight.has_value() && weight->defined();
  Tensor scale = has_w ? r * weight->view(shape) : r;
  Tensor out = d * scale;
  if (bias.has_value() && bias->defined()) out = out + bias->view(shape);
  if (!a.defined()) {
    a = at::empty({0}, x.options());
    top = at::empty({0}, x.options());
  }
  return {out, mu, s2, d, stat, r, scale, a, top};
}

// lp_train plus the running-statistics update in place (as the ℓp module's forward does it through the
// functional path: BN's unbiasing factor n/(n-1), skipped when a statistic is not finite). ``accepted``
// says whether the batch was added.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lp_train_(
    const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, Tensor& running_mean,
    Tensor& running_var, const c10::optional<Tensor>& num_batches_tracked, double p, double eps, double cn,
    double momentum, bool cumulative) {
  auto res = lp_train(x, weight, bias, p, eps, cn);
  const int64_t n = x.numel() / x.size(1);
  Tensor bmean = std::get<1>(res).flatten();
  Tensor bvar = std::get<2>(res).flatten() * (static_cast<double>(n) / static_cast<double>(n - 1));
  const bool finite = (at::isfinite(bmean).all() & at::isfinite(bvar).all()).item<bool>();
  if (finite) {
    const bool has_count = num_batches_tracked.has_value() && num_batches_tracked->defined();
    double f = momentum;
    if (has_count) {
      Tensor count = *num_batches_tracked;
      count.add_(1);
      if (cumulative) f = 1.0 / static_cast<double>(count.item<int64_t>());
    }
    running_mean.lerp_(bmean.to(running_mean.scalar_type()), f);
    running_var.lerp_(bvar.to(running_var.scalar_type()), f);
  }
  return std::tuple_cat(res, std::make_tuple(at::scalar_tensor(finite, x.options().dtype(at::kBool))));
}

// The backward of lp_train: the operations autograd's formulas apply to the composite (see
// ``_LpTrain.backward`` in lp.py, line for line). Undefined outputs for gradients not asked for.
std::tuple<Tensor, Tensor, Tensor> lp_backward(const Tensor& g, const Tensor& x, const c10::optional<Tensor>& weight,
                                               const Tensor& d, const Tensor& stat, const Tensor& r,
                                               const Tensor& scale, const Tensor& a, const Tensor& top, double p,
                                               double cn, bool need_x,
                                               bool need_w, bool need_b) {
  const auto dims = reduce_dims(x.dim());
  const auto shape = channel_shape(x.dim());
  const int64_t c = x.size(1);
  const int64_t n = x.numel() / c;
  Tensor gx, gw, gb;
  if (need_b) gb = g.sum(dims, /*keepdim=*/true).reshape({c});
  Tensor gscale = (g * d).sum(dims, /*keepdim=*/true);
  Tensor gr = gscale;
  if (weight.has_value() && weight->defined()) {
    if (need_w) gw = (gscale * r).reshape({c});
    gr = gscale * weight->view(shape);
  }
  if (!need_x) return {gx, gw, gb};
  Tensor gd = g * scale;
  Tensor gstat = ((gr * -0.5) * r.pow(3)) * (stat * 2.0);
  Tensor gd2;
  if (p == 1.0) {
    gd2 = ((gstat * std::sqrt(M_PI / 2)) / n) * d.sgn();
  } else if (p == 2.0) {
    gd2 = ((gstat / (stat * 2)) / n) * (d * 2.0);
  } else {
    Tensor mask = a.eq(top);
    gd2 = ((gstat / cn) / mask.sum(dims, /*keepdim=*/true)) * mask * d.sgn();
  }
  gd = gd + gd2;
  gx = gd + (-gd).sum(dims, /*keepdim=*/true) / n;
  return {gx, gw, gb};
}


// ---------------------------------------------------------------------------------------------------
// 2x2, stride-2 max pooling (no padding, no dilation, floor mode) of NCHW-contiguous float32/float64
// input: VGG's and the ConvNet's pools, which torch's general CPU kernel (any window, stride, padding,
// dilation, with a division-heavy index computation per output) runs far below memory speed. Same
// selection rule as torch's kernel, so the same values, the same chosen element and the same gradients (tested against torch bit for bit, NaN, ties and infinities included): scan the
// window row by row, take a value if it is greater than the maximum so far or NaN (so the first of tied
// maxima, the last NaN), starting from -inf at the window's first element. The chosen element is kept
// as its offset in the window (0..3, one byte) instead of torch's int64 index.

// One output row: branch-free (so the compiler vectorizes it; a branch per comparison mispredicts on
// ReLU outputs). Starting from the first value equals torch's start from -inf: a first value of -inf
// is kept either way, and a NaN is taken either way.
template <typename scalar_t>
void pool2x2_row(const scalar_t* __restrict r0, const scalar_t* __restrict r1, scalar_t* __restrict yr,
                 uint8_t* __restrict orow, int64_t ow) {
  for (int64_t j = 0; j < ow; ++j) {
    scalar_t best = r0[2 * j];
    int32_t k = 0;
    const scalar_t b = r0[2 * j + 1], c = r1[2 * j], d = r1[2 * j + 1];
    bool t = (b > best) | (b != b);
    best = t ? b : best;
    k = t ? 1 : k;
    t = (c > best) | (c != c);
    best = t ? c : best;
    k = t ? 2 : k;
    t = (d > best) | (d != d);
    best = t ? d : best;
    k = t ? 3 : k;
    yr[j] = best;
    orow[j] = static_cast<uint8_t>(k);
  }
}

template <typename scalar_t>
void pool2x2_forward_impl(const scalar_t* x, scalar_t* y, uint8_t* off, int64_t planes, int64_t h, int64_t w,
                          int64_t oh, int64_t ow) {
  const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, h * w));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t i = 0; i < oh; ++i) {
        const scalar_t* r0 = x + p * h * w + 2 * i * w;
        pool2x2_row<scalar_t>(r0, r0 + w, y + (p * oh + i) * ow, off + (p * oh + i) * ow, ow);
      }
    }
  });
}

// One output row of the backward, branch-free: bit masks select 0 + grad or +0.0 (exact, NaN kept).
template <typename scalar_t, typename bits_t>
void pool2x2_backward_row(const scalar_t* __restrict gr, const uint8_t* __restrict orow, scalar_t* __restrict r0,
                          scalar_t* __restrict r1, int64_t ow) {
  static_assert(sizeof(scalar_t) == sizeof(bits_t), "bit width");
  for (int64_t j = 0; j < ow; ++j) {
    const scalar_t v = scalar_t(0) + gr[j];
    bits_t vb;
    std::memcpy(&vb, &v, sizeof(v));
    const bits_t k = orow[j];
    const bits_t m0 = bits_t(0) - bits_t(k == 0), m1 = bits_t(0) - bits_t(k == 1);
    const bits_t m2 = bits_t(0) - bits_t(k == 2), m3 = bits_t(0) - bits_t(k == 3);
    const bits_t o0 = vb & m0, o1 = vb & m1, o2 = vb & m2, o3 = vb & m3;
    std::memcpy(&r0[2 * j], &o0, sizeof(v));
    std::memcpy(&r0[2 * j + 1], &o1, sizeof(v));
    std::memcpy(&r1[2 * j], &o2, sizeof(v));
    std::memcpy(&r1[2 * j + 1], &o3, sizeof(v));
  }
}

std::tuple<Tensor, Tensor> max_pool2x2(const Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "bnlab::max_pool2x2 takes a contiguous (N, C, H, W) float32/float64 tensor");
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(h >= 2 && w >= 2, "bnlab::max_pool2x2 needs H, W >= 2, got ", h, " x ", w);
  const int64_t oh = h / 2, ow = w / 2;
  Tensor y = at::empty({n, c, oh, ow}, x.options());
  Tensor off = at::empty({n, c, oh, ow}, x.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "bnlab_max_pool2x2", [&] {
    pool2x2_forward_impl<scalar_t>(x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), off.data_ptr<uint8_t>(), n * c,
                                   h, w, oh, ow);
  });
  return {y, off};
}

// Backward: each window's chosen element gets 0 + grad (the sum torch's kernel forms on its zeroed
// gradient, which also turns a -0.0 gradient into +0.0), every other element 0.
Tensor max_pool2x2_backward(const Tensor& grad_out, const Tensor& offsets, int64_t h, int64_t w) {
  Tensor g = grad_out.contiguous();
  const Tensor off = offsets.contiguous();
  TORCH_CHECK(g.dim() == 4 && off.sizes() == g.sizes() && off.scalar_type() == at::kByte,
              "bnlab::max_pool2x2_backward: grad_out and offsets must have the forward output's shape");
  const int64_t n = g.size(0), c = g.size(1), oh = g.size(2), ow = g.size(3);
  TORCH_CHECK(h / 2 == oh && w / 2 == ow, "bnlab::max_pool2x2_backward: an input of ", h, " x ", w,
              " does not give the ", oh, " x ", ow, " output of the forward");
  Tensor gi = at::empty({n, c, h, w}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "bnlab_max_pool2x2_backward", [&] {
    const scalar_t* gp = g.data_ptr<scalar_t>();
    const uint8_t* op = off.data_ptr<uint8_t>();
    scalar_t* ip = gi.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kGrainValues / std::max<int64_t>(1, h * w));
    at::parallel_for(0, n * c, grain, [&](int64_t begin, int64_t end) {
      const scalar_t zero = scalar_t(0);
      for (int64_t p = begin; p < end; ++p) {
        scalar_t* plane = ip + p * h * w;
        for (int64_t i = 0; i < oh; ++i) {
          scalar_t* r0 = plane + 2 * i * w;
          scalar_t* r1 = r0 + w;
          const scalar_t* gr = gp + (p * oh + i) * ow;
          const uint8_t* orow = op + (p * oh + i) * ow;
          if constexpr (sizeof(scalar_t) == 4) {
            pool2x2_backward_row<scalar_t, uint32_t>(gr, orow, r0, r1, ow);
          } else {
            pool2x2_backward_row<scalar_t, uint64_t>(gr, orow, r0, r1, ow);
          }
          if (w % 2) r0[w - 1] = r1[w - 1] = zero;  // the column no window covers
        }
        if (h % 2) std::fill(plane + (h - 1) * w, plane + h * w, zero);  // the row no window covers
      }
    });
  });
  return gi;
}

}  // namespace

TORCH_LIBRARY(bnlab, m) {
  m.def("bn_train(Tensor x, Tensor? weight, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        "Tensor? num_batches_tracked, float momentum, bool cumulative, float eps) -> "
        "(Tensor out, Tensor stats, Tensor new_running_mean, Tensor new_running_var, "
        "Tensor new_num_batches_tracked, Tensor accepted)");
  m.def("bn_train_(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
        "Tensor(c!)? num_batches_tracked, float momentum, bool cumulative, float eps) -> "
        "(Tensor out, Tensor stats, Tensor accepted)");
  m.def("bn_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor stats, bool input_grad) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("bn_eval(Tensor x, Tensor? weight, Tensor? bias, Tensor running_mean, Tensor running_var, float eps) -> Tensor");
  m.def("lp_train(Tensor x, Tensor? weight, Tensor? bias, float p, float eps, float cn) -> "
        "(Tensor out, Tensor mu, Tensor s2, Tensor d, Tensor stat, Tensor r, Tensor scale, Tensor a, Tensor top)");
  m.def("lp_train_(Tensor x, Tensor? weight, Tensor? bias, Tensor(a!) running_mean, Tensor(b!) running_var, "
        "Tensor(c!)? num_batches_tracked, float p, float eps, float cn, float momentum, bool cumulative) -> "
        "(Tensor out, Tensor mu, Tensor s2, Tensor d, Tensor stat, Tensor r, Tensor scale, Tensor a, Tensor top, "
        "Tensor accepted)");
  m.def("lp_backward(Tensor grad_out, Tensor x, Tensor? weight, Tensor d, Tensor stat, Tensor r, Tensor scale, "
        "Tensor a, Tensor top, float p, float cn, bool need_x, bool need_w, bool need_b) -> (Tensor, Tensor, Tensor)");
  m.def("max_pool2x2(Tensor x) -> (Tensor out, Tensor offsets)");
  m.def("max_pool2x2_backward(Tensor grad_out, Tensor offsets, int h, int w) -> Tensor");
}

TORCH_LIBRARY_IMPL(bnlab, CPU, m) {
  m.impl("bn_train", &bn_train);
  m.impl("bn_train_", &bn_train_);
  m.impl("bn_backward", &bn_backward);
  m.impl("bn_eval", &bn_eval);
  m.impl("lp_train", &lp_train);
  m.impl("lp_train_", &lp_train_);
  m.impl("lp_backward", &lp_backward);
  m.impl("max_pool2x2", &max_pool2x2);
  m.impl("max_pool2x2_backward", &max_pool2x2_backward);
}

TORCH_LIBRARY_IMPL(bnlab, Autograd, m) {
  m.impl("bn_train", &bn_train_autograd);
  m.impl("bn_train_", &bn_train__autograd);
  m.impl("bn_eval", &bn_eval_autograd);
  // Used inside bn_train's backward without grad mode; double backward differentiates the formula
  // above instead, so differentiating this operator is an error that names it.
  m.impl("bn_backward", torch::autograd::autogradNotImplementedFallback());
  // The ℓp operators run inside a Python autograd.Function (lp.py) that owns their gradient.
  m.impl("lp_train", torch::autograd::autogradNotImplementedFallback());
  m.impl("lp_train_", torch::autograd::autogradNotImplementedFallback());
  m.impl("lp_backward", torch::autograd::autogradNotImplementedFallback());
  m.impl("max_pool2x2", torch::autograd::autogradNotImplementedFallback());  // bnlab.models.pool owns the gradient
  m.impl("max_pool2x2_backward", torch::autograd::autogradNotImplementedFallback());
}
