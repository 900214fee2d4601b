// The per-chunk epilogue of the fused safety loss on CPU: logits -> losses and d(loss)/d(logits), in place.
//
// Same contract as safety_epilogue_torch in scft_fast/ops/safety_epilogue.py (read it first); Python calls this
// as safety_epilogue_cpu (scft_fast/ops/cpu_extension.py). One OpenMP task per block of rows, and
// per row three sweeps over data that stays in the core's L2 (a 32000-wide float32 row is 125 KiB):
//   1. z = raw (or softcap * tanh(raw / softcap)) and the row max m,
//   2. e = exp(z - m) and s = sum(e)                    lse = m + log(s),
//   3. grad = (a + b) / s * e  (* (1 - tanh^2)), then the two target entries get -a and -b.
// The contract's options ride in the same sweeps: label smoothing and the token stats add a sum of z and an argmax
// to sweep 1 and a sum of e * (z - m) to sweep 2 (a separate instantiation, so the plain loss runs none of it); the
// z-loss changes the weight of sweep 3; compute_grad = false skips sweep 3.
// A single online sweep would need two exps per element (rescaling the running sum); exp is what costs here,
// the extra sweeps over L2 cost little, so the row is swept three times and DRAM sees it once.
//
// The sweeps are written on 8-lane vectors with branch-free polynomial exp and tanh; the hot functions are
// compiled for x86-64-v4, x86-64-v3 and baseline x86-64 (GCC target_clones) and the dynamic loader picks the
// best one the running CPU supports, so one build, without -march, serves any x86-64 machine.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SCFT_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SCFT_CPU_CLONES
#endif

#define SCFT_INLINE inline __attribute__((always_inline))

namespace {

// Explicit 8-lane vectors (GCC/Clang vector extensions) rather than auto-vectorized loops: GCC 12 turns the
// clamps of a scalar exp into branches and then refuses to vectorize the loop (measured: 8 ns/element, scalar).
// These lower to one AVX/AVX2 register op in the x86-64-v3 clone and to two SSE ops in the baseline clone.
constexpr int kLanes = 8;
typedef float vfloat __attribute__((vector_size(4 * kLanes)));
typedef int32_t vint __attribute__((vector_size(4 * kLanes)));
typedef uint32_t vuint __attribute__((vector_size(4 * kLanes)));
typedef uint16_t vu16 __attribute__((vector_size(2 * kLanes)));

SCFT_INLINE vfloat splat(float v) { return vfloat{} + v; }

// Cephes expf: exp(x) = 2^n * p(r), r = x - n ln2, |r| <= ln2 / 2, about 1 ulp. Results below 2^-126 are
// flushed to 0 through the exponent (a softmax weight under 1e-38), so no denormal is ever produced.
SCFT_INLINE vfloat exp_vec(vfloat x) {
  x = x > -100.0f ? x : splat(-100.0f);
  x = x < 88.0f ? x : splat(88.0f);
  // Round to nearest with the 1.5 * 2^23 trick: no dependence on SSE4.1's roundps.
  const vfloat n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const vfloat r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vint biased = __builtin_convertvector(n, vint) + 127;
  biased = biased > 0 ? biased : vint{};
  return p * reinterpret_cast<vfloat>(biased << 23);
}

// Cephes tanhf: an odd polynomial below 0.625 (where 1 - 2 / (e^2x + 1) would cancel), that formula above.
SCFT_INLINE vfloat tanh_vec(vfloat x) {
  const vint sign = reinterpret_cast<vint>(x) & INT32_MIN;
  const vfloat ax = reinterpret_cast<vfloat>(reinterpret_cast<vint>(x) & INT32_MAX);
  const vfloat x2 = x * x;
  vfloat p = splat(-5.70498872745e-3f);
  p = p * x2 + 2.06390887954e-2f;
  p = p * x2 - 5.37397155531e-2f;
  p = p * x2 + 1.33314422036e-1f;
  p = p * x2 - 3.33332819422e-1f;
  const vfloat small = p * x2 * x + x;
  const vfloat large_abs = 1.0f - 2.0f / (exp_vec(2.0f * ax) + 1.0f);
  const vfloat large = reinterpret_cast<vfloat>(reinterpret_cast<vint>(large_abs) | sign);
  return ax >= 0.625f ? large : small;  // NaN takes the polynomial, which keeps it NaN
}

SCFT_INLINE float load(float v) { return v; }
SCFT_INLINE float load(c10::BFloat16 v) { return static_cast<float>(v); }
SCFT_INLINE float load(c10::Half v) { return static_cast<float>(v); }
template <typename T>
SCFT_INLINE T store(float v) { return static_cast<T>(v); }

// Vector loads and stores of n <= kLanes elements (n < kLanes only at the end of a row).
SCFT_INLINE vfloat load_full(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SCFT_INLINE vfloat load_full(const c10::BFloat16* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<vfloat>(__builtin_convertvector(h, vuint) << 16);
}
SCFT_INLINE vfloat load_full(const c10::Half* p) {
  float tmp[kLanes];
  for (int j = 0; j < kLanes; ++j) tmp[j] = load(p[j]);
  return load_full(tmp);
}
SCFT_INLINE void store_full(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
SCFT_INLINE void store_full(c10::BFloat16* p, vfloat v) {
  // Round to nearest even, NaN kept quiet: what c10::BFloat16(float) does, one lane at a time.
  const vuint u = reinterpret_cast<vuint>(v);
  const vuint rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const vuint bits = v != v ? vuint{} + 0x7fc0u : rounded;
  const vu16 h = __builtin_convertvector(bits, vu16);
  std::memcpy(p, &h, sizeof(h));
}
SCFT_INLINE void store_full(c10::Half* p, vfloat v) {
  float tmp[kLanes];
  std::memcpy(tmp, &v, sizeof(v));
  for (int j = 0; j < kLanes; ++j) p[j] = store<c10::Half>(tmp[j]);
}
template <typename T>
SCFT_INLINE vfloat load_n(const T* p, int64_t n) {
  if (n == kLanes) return load_full(p);
  float tmp[kLanes] = {};
  for (int64_t j = 0; j < n; ++j) tmp[j] = load(p[j]);
  return load_full(tmp);
}
template <typename T>
SCFT_INLINE void store_n(T* p, vfloat v, int64_t n) {
  if (n == kLanes) return store_full(p, v);
  float tmp[kLanes];
  std::memcpy(tmp, &v, sizeof(v));
  for (int64_t j = 0; j < n; ++j) p[j] = store<T>(tmp[j]);
}
// Calls f(i, n) on [i, i + n) for consecutive blocks of kLanes elements, the last one possibly shorter.
template <typename F>
SCFT_INLINE void for_each_block(int64_t len, F&& f) {
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) f(i, int64_t{kLanes});
  if (i < len) f(i, len - i);
}
SCFT_INLINE vint lanes_below(int64_t n) {
  return vint{0, 1, 2, 3, 4, 5, 6, 7} < static_cast<int32_t>(n);
}

// A per-row weight: one value for every row (stride 0) or one per row (stride 1).
struct Scale {
  const float* data;
  int64_t stride;
  SCFT_INLINE float at(int64_t r) const { return data[r * stride]; }
};

// The columns of row_stats (safety_epilogue.py: ROW_LM_CE, ROW_TR_CE, ROW_LSE, ROW_ENTROPY, ROW_CORRECT).
constexpr int64_t kRowStats = 5;

// What every row of a chunk shares. lm_scale / tr_scale / z_scale are the per-row weights a, b and c of the contract.
struct Chunk {
  int64_t vocab;
  const int64_t* lm_target;  // (c,)
  const int64_t* tr_target;  // (c,)
  int64_t ignore_index;
  Scale lm_scale;
  Scale tr_scale;
  Scale z_scale;  // data is nullptr without a z-loss
  float softcap;  // > 0, or 0 for none
  float label_smoothing;  // eps in [0, 1)
  bool token_stats;   // row_stats gets the entropy and the correct flag
  bool compute_grad;  // false: the row is left as it is (no sweep 3)
  float* lm_ce;       // (c,) out: the row's LM cross-entropy, 0 when ignored
  float* tr_ce;       // (c,) out: the row's transition cross-entropy, 0 when ignored
  float* row_stats;   // (c, kRowStats) out, or nullptr
};

SCFT_INLINE void write_row_stats(const Chunk& ch, int64_t r, float lse, float entropy, float correct) {
  float* stats = ch.row_stats + r * kRowStats;
  stats[0] = ch.lm_ce[r];
  stats[1] = ch.tr_ce[r];
  stats[2] = lse;
  stats[3] = entropy;
  stats[4] = correct;
}

// One row. zbuf and ebuf are float32 scratch of length vocab (ebuf only used for softcap on 16-bit storage).
// kExtras: label smoothing or the token stats, which add a sum of z and a first-index argmax to sweep 1 and a sum of
// e * (z - m) (for the entropy) to sweep 2; without it the sweeps are exactly those of the plain loss.
template <typename T, bool kSoftcap, bool kExtras>
SCFT_INLINE void epilogue_row(const Chunk& ch, int64_t r, T* row, float* zbuf, float* ebuf_scratch) {
  const int64_t V = ch.vocab;
  const int64_t lm = ch.lm_target[r], tr = ch.tr_target[r];
  const bool lm_valid = lm != ch.ignore_index, tr_valid = tr != ch.ignore_index;
  constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
  if (!lm_valid && !tr_valid) {
    if (ch.compute_grad) {
      std::memset(static_cast<void*>(row), 0, V * sizeof(T));  // +0 has all bits clear in every storage dtype
    }
    ch.lm_ce[r] = ch.tr_ce[r] = 0.0f;
    if (ch.row_stats) write_row_stats(ch, r, kNaN, 0.0f, 0.0f);
    return;
  }
  constexpr bool kFloat = std::is_same_v<T, float>;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const float cap = ch.softcap, inv_cap = kSoftcap ? 1.0f / ch.softcap : 0.0f;

  // Sweep 1. With softcap zbuf holds t = tanh(raw / cap) (z = cap * t, and max z = cap * max t as cap > 0):
  // t is needed again for the chain rule in sweep 3.
  constexpr bool kOwnZ = kFloat && !kSoftcap;  // z is the float32 row itself
  const float* z_src = kOwnZ ? reinterpret_cast<const float*>(row) : zbuf;
  vfloat vmax = splat(kNegInf);
  vint varg{};    // kExtras: per lane, the first index of its max
  vfloat vzsum{};  // kExtras: per lane, the sum of z (of t with softcap)
  for_each_block(V, [&](int64_t i, int64_t n) {
    vfloat v = load_n(row + i, n);
    if constexpr (kSoftcap) v = tanh_vec(v * inv_cap);
    if constexpr (!kOwnZ) store_n(zbuf + i, v, n);
    if constexpr (kExtras) {
      const vint in_row = lanes_below(n);
      varg = (v > vmax) & in_row ? vint{0, 1, 2, 3, 4, 5, 6, 7} + static_cast<int32_t>(i) : varg;
      vzsum += in_row ? v : vfloat{};
    }
    vmax = (vmax > v) | ~lanes_below(n) ? vmax : v;
  });
  float m = kNegInf;
  for (int j = 0; j < kLanes; ++j) m = vmax[j] > m ? vmax[j] : m;
  int64_t argmax = V;
  float z_mean = 0.0f;
  if constexpr (kExtras) {
    for (int j = 0; j < kLanes; ++j) argmax = vmax[j] == m && varg[j] < argmax ? varg[j] : argmax;
    for (int j = 0; j < kLanes; ++j) z_mean += vzsum[j];
    z_mean = (kSoftcap ? cap * z_mean : z_mean) / static_cast<float>(V);
  }
  if constexpr (kSoftcap) m *= cap;
  auto z_at = [&](int64_t i) { return kSoftcap ? cap * z_src[i] : z_src[i]; };
  float z_lm = lm_valid ? z_at(lm) : 0.0f, z_tr = tr_valid ? z_at(tr) : 0.0f;
  const float t_lm = kSoftcap && lm_valid ? z_src[lm] : 0.0f, t_tr = kSoftcap && tr_valid ? z_src[tr] : 0.0f;
  const float eps = ch.label_smoothing;
  if constexpr (kExtras) {
    if (eps > 0.0f) {  // (1 - eps) * CE + eps * (lse - mean z), as torch's cross_entropy(label_smoothing=eps)
      z_lm = (1.0f - eps) * z_lm + eps * z_mean;
      z_tr = (1.0f - eps) * z_tr + eps * z_mean;
    }
  }

  // Sweep 2. e overwrites what is no longer needed: the float32 row (its raw values are now in zbuf, or are z
  // itself), else zbuf unless zbuf must keep t for sweep 3.
  float* ebuf = kFloat ? reinterpret_cast<float*>(row) : (kSoftcap ? ebuf_scratch : zbuf);
  vfloat vsum{};
  vfloat vu{};  // kExtras: sum of e * (z - m), for the entropy log(s) - u / s
  vint vnan{};  // z - m is NaN for a NaN logit, and for infinite ones without softcap
  for_each_block(V, [&](int64_t i, int64_t n) {
    vfloat z = load_n(z_src + i, n);
    if constexpr (kSoftcap) z *= cap;
    const vfloat d = z - m;
    vnan |= d != d;
    vfloat e = exp_vec(d);
    e = lanes_below(n) ? e : vfloat{};
    store_n(ebuf + i, e, n);
    vsum += e;
    if constexpr (kExtras) vu += e * d;
  });
  bool nan = false;
  float s = 0.0f, u = 0.0f;
  for (int j = 0; j < kLanes; ++j) {
    nan |= vnan[j] != 0;
    s += vsum[j];
    if constexpr (kExtras) u += vu[j];
  }
  if (nan) {  // as in safety_epilogue_torch: NaN losses and a NaN gradient row, not finite numbers made of NaN
    if (ch.compute_grad) {
      for (int64_t i = 0; i < V; ++i) row[i] = store<T>(kNaN);
    }
    ch.lm_ce[r] = lm_valid ? kNaN : 0.0f;
    ch.tr_ce[r] = tr_valid ? kNaN : 0.0f;
    if (ch.row_stats) write_row_stats(ch, r, kNaN, ch.token_stats && lm_valid ? kNaN : 0.0f, 0.0f);
    return;
  }
  const float lse = m + std::log(s);
  ch.lm_ce[r] = lm_valid ? lse - z_lm : 0.0f;
  ch.tr_ce[r] = tr_valid ? lse - z_tr : 0.0f;
  if (ch.row_stats) {
    const bool stats = kExtras && ch.token_stats && lm_valid;
    write_row_stats(ch, r, lse, stats ? std::log(s) - u / s : 0.0f, stats && argmax == lm ? 1.0f : 0.0f);
  }
  if (!ch.compute_grad) return;
  const float e_lm = lm_valid ? ebuf[lm] : 0.0f, e_tr = tr_valid ? ebuf[tr] : 0.0f;

  // Sweep 3.
  float a = lm_valid ? ch.lm_scale.at(r) : 0.0f, b = tr_valid ? ch.tr_scale.at(r) : 0.0f;
  float weight = a + b;
  if (ch.z_scale.data) weight += 2.0f * ch.z_scale.at(r) * lse;
  const float k = weight / s;
  float uniform = 0.0f;  // eps * (a + b) / V, the smoothed targets' share of every entry
  if constexpr (kExtras) {
    uniform = eps * (a + b) / static_cast<float>(V);
    a *= 1.0f - eps;
    b *= 1.0f - eps;
  }
  for_each_block(V, [&](int64_t i, int64_t n) {
    vfloat g = load_n(ebuf + i, n) * k;
    if constexpr (kExtras) g -= uniform;
    if constexpr (kSoftcap) {
      const vfloat t = load_n(zbuf + i, n);
      g *= 1.0f - t * t;
    }
    store_n(row + i, g, n);
  });
  // The one-hot terms, applied before the softcap factor as in the contract; lm == tr gets both.
  if (lm_valid) {
    float g = (kExtras ? e_lm * k - uniform : e_lm * k) - a - (tr == lm ? b : 0.0f);
    if constexpr (kSoftcap) g *= 1.0f - t_lm * t_lm;
    row[lm] = store<T>(g);
  }
  if (tr_valid && tr != lm) {
    float g = (kExtras ? e_tr * k - uniform : e_tr * k) - b;
    if constexpr (kSoftcap) g *= 1.0f - t_tr * t_tr;
    row[tr] = store<T>(g);
  }
}

template <typename T>
SCFT_INLINE void epilogue_rows(const Chunk& ch, T* logits, int64_t begin, int64_t end, float* zbuf, float* ebuf) {
  const bool extras = ch.label_smoothing > 0.0f || (ch.row_stats && ch.token_stats);
  for (int64_t r = begin; r < end; ++r) {
    T* row = logits + r * ch.vocab;
    if (ch.softcap > 0.0f) {
      if (extras) {
        epilogue_row<T, true, true>(ch, r, row, zbuf, ebuf);
      } else {
        epilogue_row<T, true, false>(ch, r, row, zbuf, ebuf);
      }
    } else if (extras) {
      epilogue_row<T, false, true>(ch, r, row, zbuf, ebuf);
    } else {
      epilogue_row<T, false, false>(ch, r, row, zbuf, ebuf);
    }
  }
}

// The multiversioned entry points, one per storage dtype: everything above is inlined into each clone.
SCFT_CPU_CLONES void epilogue_rows_float(const Chunk& ch, float* x, int64_t b, int64_t e, float* z, float* s) {
  epilogue_rows(ch, x, b, e, z, s);
}
SCFT_CPU_CLONES void epilogue_rows_bfloat16(const Chunk& ch, c10::BFloat16* x, int64_t b, int64_t e, float* z,
                                            float* s) {
  epilogue_rows(ch, x, b, e, z, s);
}
SCFT_CPU_CLONES void epilogue_rows_half(const Chunk& ch, c10::Half* x, int64_t b, int64_t e, float* z, float* s) {
  epilogue_rows(ch, x, b, e, z, s);
}

Scale scale_arg(const at::Tensor& t, const char* name, int64_t rows) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  (t.dim() == 0 || (t.dim() == 1 && t.size(0) == rows)),
              name, " must be a 0-dim or (", rows, ",) contiguous float32 CPU tensor, got ", t.scalar_type(),
              " of shape ", t.sizes(), " on ", t.device());
  return Scale{t.data_ptr<float>(), t.dim() == 0 ? 0 : 1};
}

void check_targets(const at::Tensor& target, const char* name, int64_t rows, int64_t vocab, int64_t ignore_index) {
  TORCH_CHECK(target.device().is_cpu() && target.scalar_type() == at::kLong && target.dim() == 1 &&
                  target.size(0) == rows && target.is_contiguous(),
              name, " must be a contiguous (", rows, ",) int64 CPU tensor, got ", target.scalar_type(), " of shape ",
              target.sizes());
  const int64_t* p = target.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(p[r] == ignore_index || (p[r] >= 0 && p[r] < vocab), name, "[", r, "] = ", p[r],
                " is neither ignore_index (", ignore_index, ") nor in [0, ", vocab, ")");
  }
}

}  // namespace

at::Tensor safety_epilogue(at::Tensor logits, const at::Tensor& lm_target, const at::Tensor& tr_target,
                           const at::Tensor& lm_scale, const at::Tensor& tr_scale, std::optional<double> softcap,
                           int64_t ignore_index, double label_smoothing, const std::optional<at::Tensor>& z_scale,
                           const std::optional<at::Tensor>& row_stats, bool token_stats, bool compute_grad) {
  TORCH_CHECK(logits.device().is_cpu() && logits.dim() == 2 && logits.is_contiguous(),
              "logits must be a contiguous (c, V) CPU tensor, got shape ", logits.sizes(), " on ", logits.device());
  const auto dtype = logits.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "logits must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK(!softcap.has_value() || *softcap > 0.0, "softcap must be None or > 0, got ", softcap.value_or(0.0));
  TORCH_CHECK(label_smoothing >= 0.0 && label_smoothing < 1.0, "label_smoothing must be in [0, 1), got ",
              label_smoothing);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_targets(lm_target, "lm_target", rows, vocab, ignore_index);
  check_targets(tr_target, "tr_target", rows, vocab, ignore_index);
  float* stats = nullptr;
  if (row_stats.has_value()) {
    const at::Tensor& t = *row_stats;
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
                    t.size(0) == rows && t.size(1) == kRowStats,
                "row_stats must be a contiguous (", rows, ", ", kRowStats, ") float32 CPU tensor, got ",
                t.scalar_type(), " of shape ", t.sizes());
    stats = t.data_ptr<float>();
  }

  std::unique_ptr<float[]> ce(new float[2 * rows]);
  const Chunk ch{vocab,
                 lm_target.data_ptr<int64_t>(),
                 tr_target.data_ptr<int64_t>(),
                 ignore_index,
                 scale_arg(lm_scale, "lm_scale", rows),
                 scale_arg(tr_scale, "tr_scale", rows),
                 z_scale.has_value() ? scale_arg(*z_scale, "z_scale", rows) : Scale{nullptr, 0},
                 static_cast<float>(softcap.value_or(0.0)),
                 static_cast<float>(label_smoothing),
                 token_stats,
                 compute_grad,
                 ce.get(),
                 ce.get() + rows,
                 stats};
  if (rows > 0 && vocab > 0) {
    void* data = logits.data_ptr();
    const bool float32 = dtype == at::kFloat;
    const bool two_buffers = !float32 && ch.softcap > 0.0f;
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      const int64_t scratch_len = float32 && ch.softcap == 0.0f ? 0 : (two_buffers ? 2 : 1) * vocab;
      std::unique_ptr<float[]> scratch(new float[scratch_len]);
      float* zbuf = scratch.get();
      float* ebuf = two_buffers ? zbuf + vocab : nullptr;
      if (float32) {
        epilogue_rows_float(ch, static_cast<float*>(data), begin, end, zbuf, ebuf);
      } else if (dtype == at::kBFloat16) {
        epilogue_rows_bfloat16(ch, static_cast<c10::BFloat16*>(data), begin, end, zbuf, ebuf);
      } else {
        epilogue_rows_half(ch, static_cast<c10::Half*>(data), begin, end, zbuf, ebuf);
      }
    });
  }
  // Summed serially in double, in row order: the result does not depend on the thread count.
  double lm_sum = 0.0, tr_sum = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    lm_sum += ch.lm_ce[r];
    tr_sum += ch.tr_ce[r];
  }
  at::Tensor sums = at::empty({2}, logits.options().dtype(at::kFloat));
  sums.data_ptr<float>()[0] = static_cast<float>(lm_sum);
  sums.data_ptr<float>()[1] = static_cast<float>(tr_sum);
  return sums;
}

// The loader compares this with the hash of the source it would build, so a stale prebuilt scft_fast._C (an
// in-place build from before an edit of this file) is not used.
#ifndef SCFT_BUILD_KEY
#define SCFT_BUILD_KEY unknown
#endif
#define SCFT_STRINGIFY(x) SCFT_STRINGIFY_(x)
#define SCFT_STRINGIFY_(x) #x

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.attr("build_key") = SCFT_STRINGIFY(SCFT_BUILD_KEY);
  m.def("safety_epilogue", &safety_epilogue, "The fused safety loss epilogue on CPU (see scft_fast/ops/safety_epilogue.py)",
        pybind11::arg("logits"), pybind11::arg("lm_target"), pybind11::arg("tr_target"), pybind11::arg("lm_scale"),
        pybind11::arg("tr_scale"), pybind11::arg("softcap"), pybind11::arg("ignore_index"),
        pybind11::arg("label_smoothing"), pybind11::arg("z_scale"), pybind11::arg("row_stats"),
        pybind11::arg("token_stats"), pybind11::arg("compute_grad"), pybind11::call_guard<pybind11::gil_scoped_release>());
}
