// Celo's per-element CPU kernels (backend="cpp"), built and loaded by celo_hf/backends/cpp.py.
//
// The three kernels of celo_hf/backends/eager.py (pass 0 square_sums, pass 1 accumulate_, pass 2
// mlp_step_), hand-written so that each pass is one loop over the
// elements in SIMD registers: every element is read once per pass, intermediate values never leave
// registers, nothing of full size is allocated. The maths of one element is written once, as
// templates over `float` (a row's last few elements) and `Vec` (W elements at a time). Pass 0 also
// comes as celo_factored_moments, which goes on to prepare everything the factored moments give the
// other passes. Passes 1 and 2 split their rows over threads in fixed blocks (see Blocks).
//
// Layout. A call covers B same-shaped tensors, each a grid of `a` rows by `b` columns (a matrix keeps
// its rows; anything else arrives as one row). Per-element arrays are float32 with unit stride along a
// row; `*_sb` is the stride between tensors and `*_sa` between rows, `m_sk` between decays (in
// elements). A preconditioner is the product row[i] * col[j] of a row factor (B, K, a) and a column
// factor (B, K, b); the first layer's extra input the sum row[i] + col[j] of (B, H, a) and (B, H, b)
// parts. Small arrays are contiguous float32.
//
// Everything about the rule's layout comes from celo_hf/layout.py as compile-time defines
// (layout.c_defines): the configuration (CELO_K decays, CELO_H hidden units, CELO_L hidden layers after
// the first; the paper's Celo: 3, 4, 1), the constants (CELO_GRAD_CLIP, ...) and where each feature
// group starts among the channels (CELO_CH_GRAD, ...). celo_layout reports them back for the tests.
//
// Arguments arrive as the structures GridArgs, Factors, MlpArgs and FactoredArgs below, mirrored field
// by field by ctypes structures in cpp.py.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#ifndef CELO_K
#error "compile with the defines of celo_hf.layout.c_defines(config)"
#endif


#define UNROLL _Pragma("GCC unroll 64")

namespace {

#if defined(__AVX512F__)
constexpr int W = 16;
typedef float Vec __attribute__((vector_size(64)));
typedef int32_t IVec __attribute__((vector_size(64)));
inline Vec sqrt_(Vec x) { return (Vec)_mm512_sqrt_ps((__m512)x); }
inline Vec floor_(Vec x) { return (Vec)_mm512_roundscale_ps((__m512)x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline bool all_within(Vec x, float bound) {
    return _mm512_cmp_ps_mask(_mm512_abs_ps((__m512)x), _mm512_set1_ps(bound), _CMP_NLE_UQ) == 0;
}
#elif defined(__AVX__)
constexpr int W = 8;
typedef float Vec __attribute__((vector_size(32)));
typedef int32_t IVec __attribute__((vector_size(32)));
inline Vec sqrt_(Vec x) { return (Vec)_mm256_sqrt_ps((__m256)x); }
inline Vec floor_(Vec x) { return (Vec)_mm256_floor_ps((__m256)x); }
inline bool all_within(Vec x, float bound) {
    const __m256 magnitude = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), (__m256)x);
    return _mm256_movemask_ps(_mm256_cmp_ps(magnitude, _mm256_set1_ps(bound), _CMP_NLE_UQ)) == 0;
}
#else
constexpr int W = 4;
typedef float Vec __attribute__((vector_size(16)));
typedef int32_t IVec __attribute__((vector_size(16)));
inline Vec sqrt_(Vec x) {
    for (int l = 0; l < W; ++l) x[l] = std::sqrt(x[l]);
    return x;
}
inline Vec floor_(Vec x) {
    for (int l = 0; l < W; ++l) x[l] = std::floor(x[l]);
    return x;
}
inline bool all_within(Vec x, float bound) {
    for (int l = 0; l < W; ++l)
        if (!(std::fabs(x[l]) <= bound)) return false;
    return true;
}
#endif

constexpr int K = CELO_K;
constexpr int H = CELO_H;
constexpr int L = CELO_L;
constexpr int L1 = L > 0 ? L : 1;  // array extent (zero-length arrays are not C++)
// Channels: g, clip(g), p, m (K), rms, m * r (K), r, g * q_g (K), g * r, m * q_m (K), starting at:
constexpr int CH_GRAD = CELO_CH_GRAD;
constexpr int CH_CLIPPED_GRAD = CELO_CH_CLIPPED_GRAD;
constexpr int CH_PARAM = CELO_CH_PARAM;
constexpr int CH_MOMENTUM = CELO_CH_MOMENTUM;
constexpr int CH_RMS = CELO_CH_RMS;
constexpr int CH_MOMENTUM_OVER_RMS = CELO_CH_MOMENTUM_OVER_RMS;
constexpr int CH_RSQRT_RMS = CELO_CH_RSQRT_RMS;
constexpr int CH_FACTORED_GRAD = CELO_CH_FACTORED_GRAD;
constexpr int CH_GRAD_OVER_RMS = CELO_CH_GRAD_OVER_RMS;
constexpr int CH_FACTORED_MOMENTUM = CELO_CH_FACTORED_MOMENTUM;
constexpr int C = CELO_CH_CHANNELS;

constexpr float GRAD_CLIP = CELO_GRAD_CLIP;
constexpr float FEATURE_GRAD_CLIP = CELO_FEATURE_GRAD_CLIP;
constexpr float RMS_EPS = CELO_RMS_EPS;
constexpr float FACTORED_EPS = CELO_FACTORED_EPS;
constexpr float FACTOR_FLOOR = CELO_FACTOR_FLOOR;
constexpr float ROW_COL_EPS = CELO_ROW_COL_EPS;
constexpr float NORMALISER_EPS = CELO_NORMALISER_EPS;
constexpr float PARAM_SCALE_EPS = CELO_PARAM_SCALE_EPS;  // used by the caller; reported by celo_layout
// Elements summed in float32 SIMD lanes before the partial sums are added to float64 totals (keeps
// long rows about as accurate as a pairwise sum).
constexpr int64_t SEGMENT = 1024;

// ---- the same operations on a float and on W floats ----

inline float sqrt_(float x) { return std::sqrt(x); }
inline float floor_(float x) { return std::floor(x); }
inline bool all_within(float x, float bound) { return std::fabs(x) <= bound; }

template <typename T> inline T splat(float x);
template <> inline float splat<float>(float x) { return x; }
template <> inline Vec splat<Vec>(float x) { return Vec{} + x; }

template <typename T> inline T load(const float* p);
template <> inline float load<float>(const float* p) { return *p; }
template <> inline Vec load<Vec>(const float* p) {
    Vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store(float* p, float v) { *p = v; }
inline void store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// 2^n for integral n in [-126, 127].
inline float pow2(float n) {
    const uint32_t bits = static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23;
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}
inline Vec pow2(Vec n) { return (Vec)((__builtin_convertvector(n, IVec) + 127) << 23); }

template <typename T> inline T clamp(T x, float lo, float hi) {
    x = x < lo ? lo : x;
    return x > hi ? hi : x;
}
template <typename T> inline T relu(T x) { return x > 0.0f ? x : 0.0f; }

// x, rounded to float32 where it stands: the compiler may not fuse it into a multiply-add. The moving
// averages are computed as torch computes them (two rounded products, then their rounded sum), so the
// state they carry from step to step matches the eager path's closely.
template <typename T> inline T rounded(T x) {
#if defined(__x86_64__) || defined(__i386__)
    asm("" : "+v"(x));
#endif
    return x;
}
template <typename T> inline T rsqrt(T x) { return 1.0f / sqrt_(x); }

// exp(x) to about 1 ulp (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n).
template <typename T> inline T exp_any(T x) {
    x = clamp(x, -87.3f, 88.7f);
    const T n = floor_(x * 1.44269504088896341f + 0.5f);
    T r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    T y = splat<T>(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    return y * pow2(n);
}

// exp(x); where every |x| <= 1/16 (the usual case: Celo's step takes exp(0.001 * magnitude)), the
// degree-4 Taylor polynomial, whose error (< 1e-8 relative) is below float32 rounding.
constexpr float SMALL_EXP = 0.0625f;
template <typename T> inline T exp_(T x) {
    if (!all_within(x, SMALL_EXP)) return exp_any(x);
    T y = x * (1.0f / 24.0f) + (1.0f / 6.0f);
    y = y * x + 0.5f;
    y = y * x + 1.0f;
    return y * x + 1.0f;
}

// ---- one element ----

// Pointers and per-row values for row i of tensor t.
struct Row {
    const float* p;
    const float* g;
    float* m[K];
    float* rms;
    float qg_row[K], qm_row[K], h_row[H];
    const float *qg_col[K], *qm_col[K], *h_col[H];
};

}  // namespace

extern "C" {

// A chunk of B tensors as grids of `rows` by `cols`: the per-element arrays and their strides.
struct GridArgs {
    int64_t batch, rows, cols;
    float* p;
    const float* g;
    float* m;
    float* rms;
    int64_t p_sb, p_sa, g_sb, g_sa, m_sb, m_sk, m_sa, rms_sb, rms_sa;
};

// The preconditioners' row (B, K, a) and column (B, K, b) factors, and the first layer's extra input
// as row (B, H, a) and column (B, H, b) terms (null in pass 1).
struct Factors {
    const float *qg_row, *qg_col, *qm_row, *qm_col, *h_row, *h_col;
};

}  // extern "C"

namespace {

Row row_at(int64_t t, int64_t i, const GridArgs& a, const Factors& f) {
    const int64_t rows = a.rows, cols = a.cols;
    Row row;
    row.p = a.p + t * a.p_sb + i * a.p_sa;
    row.g = a.g + t * a.g_sb + i * a.g_sa;
    row.rms = a.rms + t * a.rms_sb + i * a.rms_sa;
    for (int k = 0; k < K; ++k) {
        row.m[k] = a.m + t * a.m_sb + k * a.m_sk + i * a.m_sa;
        row.qg_row[k] = f.qg_row[(t * K + k) * rows + i];
        row.qm_row[k] = f.qm_row[(t * K + k) * rows + i];
        row.qg_col[k] = f.qg_col + (t * K + k) * cols;
        row.qm_col[k] = f.qm_col + (t * K + k) * cols;
    }
    if (f.h_row != nullptr) {
        for (int u = 0; u < H; ++u) {
            row.h_row[u] = f.h_row[(t * H + u) * rows + i];
            row.h_col[u] = f.h_col + (t * H + u) * cols;
        }
    }
    return row;
}

// Channel indices of the preconditioned gradient and momentum for decay k.
constexpr int precond_g(int k) { return CH_FACTORED_GRAD + k; }
constexpr int precond_m(int k) { return CH_FACTORED_MOMENTUM + k; }

struct Decays {
    float beta[K], keep[K], rms_beta, rms_keep;
};

// Pass 1 at j: update m and rms in place and add up the squares of the channels, from squared
// quantities (m^2 / (rms + eps) for (m r)^2: no square root). The preconditioned channels, without
// their row factor, go to `row_part` (K for the gradient, then K for the momentum), the others to
// `sum`. SHARED_Q: the gradient and the momentum have the same preconditioner (factored tensors).
template <typename T, bool SHARED_Q>
inline void accumulate_at(const Row& row, const Decays& d, int64_t j, T* sum, T* row_part) {
    const T g = clamp(load<T>(row.g + j), -GRAD_CLIP, GRAD_CLIP);
    const T g2 = g * g;
    const T clipped = clamp(g, -FEATURE_GRAD_CLIP, FEATURE_GRAD_CLIP);
    const T p = load<T>(row.p + j);
    const T rms = rounded(load<T>(row.rms + j) * d.rms_beta) + rounded(d.rms_keep * g2);
    store(row.rms + j, rms);
    const T r2 = 1.0f / (rms + RMS_EPS);
    sum[CH_GRAD] += g2;
    sum[CH_CLIPPED_GRAD] += clipped * clipped;
    sum[CH_PARAM] += p * p;
    sum[CH_RMS] += rms * rms;
    sum[CH_RSQRT_RMS] += r2;
    sum[CH_GRAD_OVER_RMS] += g2 * r2;
    UNROLL
    for (int k = 0; k < K; ++k) {
        const T m = rounded(load<T>(row.m[k] + j) * d.beta[k]) + rounded(d.keep[k] * g);
        store(row.m[k] + j, m);
        const T m2 = m * m;
        sum[CH_MOMENTUM + k] += m2;
        sum[CH_MOMENTUM_OVER_RMS + k] += m2 * r2;
        const T qg = load<T>(row.qg_col[k] + j);
        const T qg2 = qg * qg;
        row_part[k] += g2 * qg2;
        if (SHARED_Q) {
            row_part[K + k] += m2 * qg2;
        } else {
            const T qm = load<T>(row.qm_col[k] + j);
            row_part[K + k] += m2 * (qm * qm);
        }
    }
}

// Pass 1 over tensor t, adding each channel's sum of squares to total (C, float64). Partial sums stay
// in float32 SIMD lanes for about SEGMENT elements (across short rows) before they go to float64.
template <bool SHARED_Q>
void accumulate_rows(
    int64_t t, int64_t first_row, int64_t last_row, const GridArgs& a, const Factors& f, const Decays& d, double* total
) {
    const int64_t cols = a.cols;
    Vec sum[C] = {};
    float sum_tail[C] = {};
    int64_t pending = 0;
    auto flush = [&]() {
        for (int c = 0; c < C; ++c) {
            double lanes = sum_tail[c];
            for (int l = 0; l < W; ++l) lanes += sum[c][l];
            total[c] += lanes;
            sum[c] = Vec{};
            sum_tail[c] = 0.0f;
        }
        pending = 0;
    };
    for (int64_t i = first_row; i < last_row; ++i) {
        const Row row = row_at(t, i, a, f);
        for (int64_t start = 0; start < cols; start += SEGMENT) {
            const int64_t stop = start + SEGMENT < cols ? start + SEGMENT : cols;
            Vec part[2 * K] = {};
            float part_tail[2 * K] = {};
            int64_t j = start;
            for (; j + W <= stop; j += W) accumulate_at<Vec, SHARED_Q>(row, d, j, sum, part);
            for (; j < stop; ++j) accumulate_at<float, SHARED_Q>(row, d, j, sum_tail, part_tail);
            for (int k = 0; k < K; ++k) {
                const float g_scale = row.qg_row[k] * row.qg_row[k], m_scale = row.qm_row[k] * row.qm_row[k];
                sum[precond_g(k)] += g_scale * part[k];
                sum[precond_m(k)] += m_scale * part[K + k];
                sum_tail[precond_g(k)] += g_scale * part_tail[k];
                sum_tail[precond_m(k)] += m_scale * part_tail[K + k];
            }
            pending += stop - start;
            if (pending >= SEGMENT) flush();
        }
    }
    flush();
}

// ---- work split over threads ----

// A call's work in blocks of whole rows of about BLOCK_ELEMENTS elements (the split does not depend on
// the number of threads, and partial sums are combined in block order, so results do not either).
constexpr int64_t BLOCK_ELEMENTS = 1 << 16;

struct Blocks {
    int64_t rows_per_block, per_tensor, count;
    Blocks(int64_t batch, int64_t rows, int64_t cols)
        : rows_per_block(cols >= BLOCK_ELEMENTS ? 1 : BLOCK_ELEMENTS / (cols > 0 ? cols : 1)),
          per_tensor((rows + rows_per_block - 1) / rows_per_block), count(batch * per_tensor) {}
    int64_t tensor(int64_t block) const { return block / per_tensor; }
    int64_t first_row(int64_t block) const { return (block % per_tensor) * rows_per_block; }
    int64_t last_row(int64_t block, int64_t rows) const {
        const int64_t last = first_row(block) + rows_per_block;
        return last < rows ? last : rows;
    }
};

// body(block) for every block, on up to `threads` threads (the caller's one included), each taking a
// contiguous range of blocks.
template <typename Body>
void parallel_for(int64_t count, int threads, const Body& body) {
    const int64_t workers = threads < count ? threads : count;
    if (workers <= 1) {
        for (int64_t block = 0; block < count; ++block) body(block);
        return;
    }
    auto run = [&](int64_t w) {
        for (int64_t block = count * w / workers; block < count * (w + 1) / workers; ++block) body(block);
    };
    std::vector<std::thread> pool;
    for (int64_t w = 1; w < workers; ++w) pool.emplace_back(run, w);
    run(0);
    for (std::thread& thread : pool) thread.join();
}

struct Mlp {
    float first[C][H], weight[L1][H][H], bias[L1][H], direction[H], magnitude[H];
    float direction_bias, magnitude_bias;
};

// Pass 2 at j: features, MLP, p <- p - step, or the raw direction into out_row (when not null). The first layer takes the channels grouped by what they
// multiply (momentum k enters as m_k * (w_m + w_mr r + w_mq q_m), one product per hidden unit instead
// of three products shared by all), which saves multiplications but not accuracy.
template <typename T>
inline void step_at(const Row& row, const Mlp& mlp, int64_t j, float* out_row) {
    const auto& w = mlp.first;
    const T g = clamp(load<T>(row.g + j), -GRAD_CLIP, GRAD_CLIP);
    const T rms = load<T>(row.rms + j);
    const T r = rsqrt(rms + RMS_EPS);
    const T clipped = clamp(g, -FEATURE_GRAD_CLIP, FEATURE_GRAD_CLIP);
    const T p = load<T>(row.p + j);
    const T gr = g * r;
    T m[K], gq[K], qm[K];
    UNROLL
    for (int k = 0; k < K; ++k) {
        m[k] = load<T>(row.m[k] + j);
        gq[k] = g * load<T>(row.qg_col[k] + j);
        qm[k] = load<T>(row.qm_col[k] + j);
    }
    T h[H];
    UNROLL
    for (int u = 0; u < H; ++u) {
        T s = row.h_row[u] + load<T>(row.h_col[u] + j);
        s += w[CH_GRAD][u] * g + w[CH_CLIPPED_GRAD][u] * clipped + w[CH_PARAM][u] * p + w[CH_RMS][u] * rms
             + w[CH_RSQRT_RMS][u] * r + w[CH_GRAD_OVER_RMS][u] * gr;
        UNROLL
        for (int k = 0; k < K; ++k) s += w[precond_g(k)][u] * gq[k];
        UNROLL
        for (int k = 0; k < K; ++k)
            s += m[k] * (w[CH_MOMENTUM + k][u] + r * w[CH_MOMENTUM_OVER_RMS + k][u] + qm[k] * w[precond_m(k)][u]);
        h[u] = relu(s);
    }
    UNROLL
    for (int layer = 0; layer < L; ++layer) {
        T next[H];
        UNROLL
        for (int o = 0; o < H; ++o) {
            T s = splat<T>(mlp.bias[layer][o]);
            UNROLL
            for (int u = 0; u < H; ++u) s += mlp.weight[layer][o][u] * h[u];
            next[o] = relu(s);
        }
        UNROLL
        for (int o = 0; o < H; ++o) h[o] = next[o];
    }
    // The last layer's rows come pre-scaled: direction by the step scale, magnitude by exp_mult.
    T direction = splat<T>(mlp.direction_bias), magnitude = splat<T>(mlp.magnitude_bias);
    UNROLL
    for (int u = 0; u < H; ++u) {
        direction += mlp.direction[u] * h[u];
        magnitude += mlp.magnitude[u] * h[u];
    }
    if (out_row != nullptr) {
        store(out_row + j, direction);
        return;
    }
    float* out = const_cast<float*>(row.p) + j;
    store(out, p - direction * exp_(magnitude));
}

// ---- factored second moments ----

// Sums of clip(g)^2 + 1e-30 of one matrix (a, b) along each row (row_sums (a)) and along each column
// (col_sums (b)). Column sums gather SEGMENT / 16 rows in float32, then go into float64 totals.
void square_sums(int64_t rows, int64_t cols, const float* g, int64_t g_sa, float* row_sums, float* col_sums) {
    const int64_t rows_per_flush = SEGMENT / 16;
    std::vector<float> col_part(cols);
    std::vector<double> col_total(cols, 0.0);
    float* part = col_part.data();
    for (int64_t first = 0; first < rows; first += rows_per_flush) {
        const int64_t last = first + rows_per_flush < rows ? first + rows_per_flush : rows;
        std::fill(col_part.begin(), col_part.end(), 0.0f);
        for (int64_t i = first; i < last; ++i) {
            const float* gi = g + i * g_sa;
            double row_total = 0.0;
            for (int64_t start = 0; start < cols; start += SEGMENT) {
                const int64_t stop = start + SEGMENT < cols ? start + SEGMENT : cols;
                Vec lanes = {};
                float tail = 0.0f;
                int64_t j = start;
                for (; j + W <= stop; j += W) {
                    const Vec c = clamp(load<Vec>(gi + j), -GRAD_CLIP, GRAD_CLIP);
                    const Vec sq = c * c + FACTORED_EPS;
                    lanes += sq;
                    store(part + j, load<Vec>(part + j) + sq);
                }
                for (; j < stop; ++j) {
                    const float c = clamp(gi[j], -GRAD_CLIP, GRAD_CLIP);
                    const float sq = c * c + FACTORED_EPS;
                    tail += sq;
                    part[j] += sq;
                }
                for (int l = 0; l < W; ++l) row_total += lanes[l];
                row_total += tail;
            }
            row_sums[i] = static_cast<float>(row_total);
        }
        for (int64_t j = 0; j < cols; ++j) col_total[j] += part[j];
    }
    for (int64_t j = 0; j < cols; ++j) col_sums[j] = static_cast<float>(col_total[j]);
}

// v <- beta v + (1 - beta) (sums / count) for each decay k, v (K, n); rounded like torch's.
void moving_average(float* v, int64_t n, const float* sums, float count, const float* decays) {
    for (int k = 0; k < K; ++k) {
        const float beta = decays[k], keep = 1.0f - decays[k];
        for (int64_t i = 0; i < n; ++i) v[k * n + i] = rounded(v[k * n + i] * beta) + rounded((sums[i] / count) * keep);
    }
}

// First-layer input from a factored accumulator v (K, n) broadcast over the tensor: the feature v and
// rsqrt(v + 1e-8), each normalised by its mean square over the n cells (the tensor-wide mean of a
// broadcast feature), through their first-layer rows (K, H) value_w and rsqrt_w; plus bias (H) if
// given. Writes h (H, n).
void grid_hidden(const float* v, int64_t n, const float* value_w, const float* rsqrt_w, const float* bias, float* h) {
    float wv[K][H], wr[K][H];
    for (int k = 0; k < K; ++k) {
        double value_sq = 0.0, rsqrt_sq = 0.0;
        for (int64_t i = 0; i < n; ++i) {
            const float x = v[k * n + i], r = rsqrt(x + ROW_COL_EPS);
            value_sq += x * x;
            rsqrt_sq += r * r;
        }
        const float value_norm = rsqrt(NORMALISER_EPS + static_cast<float>(value_sq) / static_cast<float>(n));
        const float rsqrt_norm = rsqrt(NORMALISER_EPS + static_cast<float>(rsqrt_sq) / static_cast<float>(n));
        for (int u = 0; u < H; ++u) {
            wv[k][u] = value_w[k * H + u] * value_norm;
            wr[k][u] = rsqrt_w[k * H + u] * rsqrt_norm;
        }
    }
    for (int u = 0; u < H; ++u) {
        for (int64_t i = 0; i < n; ++i) {
            float value_part = 0.0f, rsqrt_part = 0.0f;
            for (int k = 0; k < K; ++k) {
                value_part += wv[k][u] * v[k * n + i];
                rsqrt_part += wr[k][u] * rsqrt(v[k * n + i] + ROW_COL_EPS);
            }
            h[u * n + i] = value_part + rsqrt_part + (bias != nullptr ? bias[u] : 0.0f);
        }
    }
}

}  // namespace

extern "C" {

// What this library was built with (celo_hf/layout.py's values, through the defines): the
// configuration, the channel count and offsets (in the order of layout.ELEMENT_GROUPS) and the
// constants (in the order of layout.CONSTANTS).
struct LayoutReport {
    int32_t k, h, l, channels;
    int32_t offsets[10];
    float constants[8];
};

void celo_layout(LayoutReport* out) {
    *out = LayoutReport{K, H, L, C,
                        {CH_GRAD, CH_CLIPPED_GRAD, CH_PARAM, CH_MOMENTUM, CH_RMS, CH_MOMENTUM_OVER_RMS, CH_RSQRT_RMS,
                         CH_FACTORED_GRAD, CH_GRAD_OVER_RMS, CH_FACTORED_MOMENTUM},
                        {GRAD_CLIP, FEATURE_GRAD_CLIP, RMS_EPS, FACTORED_EPS, FACTOR_FLOOR, ROW_COL_EPS, NORMALISER_EPS,
                         PARAM_SCALE_EPS}};
}

// Pass 0: for each tensor t of a matrix batch g (B, a, b), sums of clip(g)^2 + 1e-30 along each row
// (row_sums (B, a)) and along each column (col_sums (B, b)).
void celo_square_sums(
    int64_t batch, int64_t rows, int64_t cols, const float* g, int64_t g_sb, int64_t g_sa, float* row_sums,
    float* col_sums
) {
    for (int64_t t = 0; t < batch; ++t)
        square_sums(rows, cols, g + t * g_sb, g_sa, row_sums + t * rows, col_sums + t * cols);
}

// Pass 0 and everything that follows from it for a batch of matrices g (B, a, b), the factored axis of
// v_row being d0 (0: v_row (B, K, b) spans the columns, v_col (B, K, a) the rows; 1: the other way).
// Updates v_row and v_col in place and writes, on the grid's rows and columns, the preconditioner's
// factors q_rows (B, K, a) and q_cols (B, K, b), and the first layer's input from the row and column
// features (normalised) plus its bias, h_rows (B, H, a) and h_cols (B, H, b). first (B, F, H) and
// bias (B, H) may have a batch stride of 0; groups: the first rows in `first` of the row, column,
// rsqrt-row and rsqrt-column feature groups.
struct FactoredArgs {
    int64_t batch, rows, cols, d0;
    const float* g;
    int64_t g_sb, g_sa;
    float *v_row, *v_col;
    const float* factored_decays;
    const float* first;
    int64_t first_sb;
    int64_t groups[4];
    const float* bias;
    int64_t bias_sb;
    float *q_rows, *q_cols, *h_rows, *h_cols;
};

void celo_factored_moments(const FactoredArgs* args) {
    const FactoredArgs& a = *args;
    const int64_t batch = a.batch, rows = a.rows, cols = a.cols, g_sb = a.g_sb, g_sa = a.g_sa, first_sb = a.first_sb,
                  bias_sb = a.bias_sb;
    const float *g = a.g, *factored_decays = a.factored_decays, *first = a.first, *bias = a.bias;
    const int64_t* groups = a.groups;
    float *v_row = a.v_row, *v_col = a.v_col, *q_rows = a.q_rows, *q_cols = a.q_cols, *h_rows = a.h_rows,
          *h_cols = a.h_cols;
    const int64_t d0 = a.d0;
    std::vector<float> row_sums(rows), col_sums(cols);
    // v_row averages clip(g)^2 over axis d0, so it lies along the other axis; v_col the other way.
    const bool v_row_on_cols = d0 == 0;
    const int64_t row_len = v_row_on_cols ? cols : rows, col_len = v_row_on_cols ? rows : cols;
    for (int64_t t = 0; t < batch; ++t) {
        square_sums(rows, cols, g + t * g_sb, g_sa, row_sums.data(), col_sums.data());
        const float* along_rows = row_sums.data();  // sums over the columns, one per row
        const float* along_cols = col_sums.data();
        float* vr = v_row + t * K * row_len;
        float* vc = v_col + t * K * col_len;
        moving_average(vr, row_len, v_row_on_cols ? along_cols : along_rows, float(v_row_on_cols ? rows : cols),
                       factored_decays);
        moving_average(vc, col_len, v_row_on_cols ? along_rows : along_cols, float(v_row_on_cols ? cols : rows),
                       factored_decays);
        float* q_vr = (v_row_on_cols ? q_cols + t * K * cols : q_rows + t * K * rows);
        float* q_vc = (v_row_on_cols ? q_rows + t * K * rows : q_cols + t * K * cols);
        for (int k = 0; k < K; ++k) {
            const float* v = vr + k * row_len;
            double total = 0.0;
            for (int64_t n = 0; n < row_len; ++n) total += v[n];
            const float mean = static_cast<float>(total) / static_cast<float>(row_len);
            for (int64_t n = 0; n < row_len; ++n) {
                const float x = v[n] / (mean + FACTOR_FLOOR);
                q_vr[k * row_len + n] = rsqrt(x > FACTOR_FLOOR ? x : FACTOR_FLOOR);
            }
            const float* w = vc + k * col_len;
            for (int64_t n = 0; n < col_len; ++n) q_vc[k * col_len + n] = rsqrt(w[n] > FACTOR_FLOOR ? w[n] : FACTOR_FLOOR);
        }
        const float* weights = first + t * first_sb;
        float* h_vr = (v_row_on_cols ? h_cols + t * H * cols : h_rows + t * H * rows);
        float* h_vc = (v_row_on_cols ? h_rows + t * H * rows : h_cols + t * H * cols);
        grid_hidden(vr, row_len, weights + groups[0] * H, weights + groups[2] * H, bias + t * bias_sb, h_vr);
        grid_hidden(vc, col_len, weights + groups[1] * H, weights + groups[3] * H, nullptr, h_vc);
    }
}

// Pass 1: m <- beta m + (1 - beta) g and rms <- rms_beta rms + rms_keep g^2 in place (g clipped; keep
// = 1 - beta), then each channel's sum of squares over the grid, added to sums (B, C) (float64).
void celo_accumulate(
    const GridArgs* grid, const Factors* factors, const float* momentum_decays, float rms_beta, float rms_keep,
    double* sums, int threads
) {
    const GridArgs& a = *grid;
    const Factors& f = *factors;
    Decays d;
    for (int k = 0; k < K; ++k) {
        d.beta[k] = momentum_decays[k];
        d.keep[k] = 1.0f - momentum_decays[k];
    }
    d.rms_beta = rms_beta;
    d.rms_keep = rms_keep;
    const bool shared_q = f.qg_row == f.qm_row && f.qg_col == f.qm_col;
    const int64_t rows = a.rows;
    const Blocks blocks(a.batch, rows, a.cols);
    std::vector<double> partial(blocks.count * C, 0.0);
    parallel_for(blocks.count, threads, [&](int64_t block) {
        const int64_t t = blocks.tensor(block), first = blocks.first_row(block), last = blocks.last_row(block, rows);
        double* total = partial.data() + block * C;
        if (shared_q)
            accumulate_rows<true>(t, first, last, a, f, d, total);
        else
            accumulate_rows<false>(t, first, last, a, f, d, total);
    });
    for (int64_t block = 0; block < blocks.count; ++block)
        for (int c = 0; c < C; ++c) sums[blocks.tensor(block) * C + c] += partial[block * C + c];
}

// Pass 2's MLP: first (B, C, H) holds the first layer's weights of the channels with the normalisers
// folded in; hidden_w (B, L, H, H) as (out, in), hidden_b (B, L, H); last_w (B, 2, H), last_b (B, 2);
// step_scale (B). direction_out: null (the step is taken), or a (B, rows, cols) grid with strides
// out_sb, out_sa (unit stride along cols) that receives the raw direction instead, p left alone.
struct MlpArgs {
    const float *first, *hidden_w, *hidden_b, *last_w, *last_b, *step_scale;
    float exp_mult;
    float* direction_out;
    int64_t out_sb, out_sa;
};

// Pass 2: features from the stored accumulators, the MLP, and p <- p - direction * exp(exp_mult *
// magnitude) * step_scale[t]; factors->h_row + factors->h_col is the rest of the first layer's
// pre-activation.
void celo_mlp_step(const GridArgs* grid, const Factors* factors, const MlpArgs* weights, int threads) {
    const GridArgs& a = *grid;
    const Factors& f = *factors;
    const int64_t batch = a.batch, rows = a.rows, cols = a.cols;
    const float *first = weights->first, *hidden_w = weights->hidden_w, *hidden_b = weights->hidden_b,
                *last_w = weights->last_w, *last_b = weights->last_b, *step_scale = weights->step_scale;
    const float exp_mult = weights->exp_mult;
    std::vector<Mlp> mlps(batch);
    for (int64_t t = 0; t < batch; ++t) {
        Mlp& mlp = mlps[t];
        for (int c = 0; c < C; ++c)
            for (int u = 0; u < H; ++u) mlp.first[c][u] = first[(t * C + c) * H + u];
        for (int layer = 0; layer < L; ++layer)
            for (int o = 0; o < H; ++o) {
                mlp.bias[layer][o] = hidden_b[(t * L + layer) * H + o];
                for (int u = 0; u < H; ++u) mlp.weight[layer][o][u] = hidden_w[((t * L + layer) * H + o) * H + u];
            }
        const float scale = step_scale[t];
        for (int u = 0; u < H; ++u) {
            mlp.direction[u] = last_w[(t * 2 + 0) * H + u] * scale;
            mlp.magnitude[u] = last_w[(t * 2 + 1) * H + u] * exp_mult;
        }
        mlp.direction_bias = last_b[t * 2 + 0] * scale;
        mlp.magnitude_bias = last_b[t * 2 + 1] * exp_mult;
    }
    const Blocks blocks(batch, rows, cols);
    parallel_for(blocks.count, threads, [&](int64_t block) {
        const int64_t t = blocks.tensor(block);
        const Mlp& mlp = mlps[t];
        Mlp on_row = mlp;
        for (int64_t i = blocks.first_row(block); i < blocks.last_row(block, rows); ++i) {
            const Row row = row_at(t, i, a, f);
            for (int k = 0; k < K; ++k)
                for (int u = 0; u < H; ++u) {
                    on_row.first[precond_g(k)][u] = mlp.first[precond_g(k)][u] * row.qg_row[k];
                    on_row.first[precond_m(k)][u] = mlp.first[precond_m(k)][u] * row.qm_row[k];
                }
            float* out_row = weights->direction_out == nullptr ? nullptr
                             : weights->direction_out + t * weights->out_sb + i * weights->out_sa;
            int64_t j = 0;
            for (; j + W <= cols; j += W) step_at<Vec>(row, on_row, j, out_row);
            for (; j < cols; ++j) step_at<float>(row, on_row, j, out_row);
        }
    });
}

}  // extern "C"
