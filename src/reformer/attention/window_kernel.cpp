// Blocks of chunk-window attention, forward and backward, fused chunk by chunk (see window_kernel.py and
// fused_chunks.py).
//
// Plain C++ with a C interface, loaded with ctypes (native.py): no PyTorch headers, so it builds quickly. Each
// chunk's small products run in this file's register-tiled product (AVX-512, float32 and float64; `tile_product`)
// or, without AVX-512 (or built with -DREFORMER_BLAS_PRODUCTS, as the tests build it), in the BLAS that PyTorch uses
// (`sgemm_`, `dgemm_` from libtorch_cpu). The gathers, the mask and the elementwise work run on each chunk's tiles
// while they are in cache.
//
// Legend (row-major): G chunks of c queries, d head width, m window parts, w = m * c keys per window,
// E = (G + m - 1) * c extended rows; chunk i's window is extended rows i*c .. i*c + w.
//   rows: (N, d) contiguous, read through indices: query slot s of the block is row q_index[s] (G * c of them),
//   extended row t is row kv_index[t] (E of them) of the key rows and of the value rows; without indices the
//   rows are the block's in order, read in place. Shared query-keys (no key rows, indices needed): the keys are
//   the query rows at kv_index scaled to unit length, x * rsqrt(|x|^2 / d + eps) / sqrt(d).
//   mask (MaskSpec): a dense (G, c, w) additive tensor, or its recipe: positions per query and per window key.
// A chunk's score tiles are kept key by query, (w, c): a query's scores are a column, so that the softmax and
// the score gradients run down the columns with a vector over c queries, and every product reads its right
// operand row by row (the queries and the output gradients are transposed once per chunk, (c, d) -> (d, c)).
//
// Forward, chunk by chunk (in parallel): x = scale*k.q + mask; lse = max + log(sum exp(max(x - max, floor)));
// out = (exp(max(x - max, floor)), 0 below p_floor)^T . v / sum, written to the out rows (in order or by index).
//
// Backward, phase 1, chunk by chunk (in parallel): dO = the gradient rows, times the round's share
// exp(lse_slot - lse_row) when rounds are combined; P = exp(max(scale*k.q + mask - lse, floor)), 0 below p_floor;
// dS = P * (v.dO - rowsum(dO*o)); dq = scale * dS^T.k, added to (or written into) the dq rows.
// Phase 2, extended chunk by extended chunk: dk_j = scale * sum_p dS_{j-p}[part p] q_{j-p},
// dv_j = sum_p P_{j-p}[part p] dO_{j-p}, over p = 0 .. m-1 in that order; shared query-keys: dk_j goes
// through the unit-length scaling. Each thread runs phase 1 on a contiguous share of the chunks, and phase 2 for
// extended chunk j right after chunk j when all of j's chunks are in its share (their tiles are still in
// cache); the other extended chunks (at the shares' edges, and the last m - 1) follow in parallel. Each extended
// chunk is computed by one thread, the same way: the result does not depend on the number of threads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <omp.h>
#if defined(__AVX512F__) && !defined(REFORMER_BLAS_PRODUCTS)
#include <immintrin.h>
#endif

extern "C" {
void sgemm_(const char *transa, const char *transb, const int *m, const int *n, const int *k, const float *alpha,
            const float *a, const int *lda, const float *b, const int *ldb, const float *beta, float *c,
            const int *ldc);
void dgemm_(const char *transa, const char *transb, const int *m, const int *n, const int *k, const double *alpha,
            const double *a, const int *lda, const double *b, const int *ldb, const double *beta, double *c,
            const int *ldc);
}

namespace {

inline void fortran_gemm(const char *ta, const char *tb, const int *m, const int *n, const int *k, const float *alpha,
                         const float *a, const int *lda, const float *b, const int *ldb, const float *beta, float *c,
                         const int *ldc) {
    sgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

inline void fortran_gemm(const char *ta, const char *tb, const int *m, const int *n, const int *k, const double *alpha,
                         const double *a, const int *lda, const double *b, const int *ldb, const double *beta,
                         double *c, const int *ldc) {
    dgemm_(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// The left operand of a product: A(r, k) = data[r * row + k * step], with row == 1 or step == 1 (A or A^T
// row-major).
template <typename T>
struct Left {
    const T *data;
    int64_t row, step;
};

// Row-major C (M x N) = alpha * A B, or C += alpha * A B (accumulate); B row-major (K x N), rows ldb apart. Through
// the BLAS, as the column-major product C^T = B^T A^T.
template <typename T>
void blas_product(int M, int N, int K, T alpha, Left<T> A, const T *B, int64_t ldb, bool accumulate, T *C,
                  int64_t ldc) {
    const bool trans_a = A.step != 1;  // A^T is row-major, rows A.step apart
    const char ta = trans_a ? 'T' : 'N', tb = 'N';
    // The BLAS checks every leading dimension against its operand's width, even where a single row makes the
    // stride meaningless (one row of A or C, one row of B): there, any stride at least the width does.
    const int64_t a_stride = trans_a ? (K == 1 ? std::max<int64_t>(A.step, M) : A.step)
                                     : (M == 1 ? std::max<int64_t>(A.row, K) : A.row);
    const int lda = static_cast<int>(a_stride);
    const int ldb_ = static_cast<int>(K == 1 ? std::max<int64_t>(ldb, N) : ldb);
    const int ldc_ = static_cast<int>(M == 1 ? std::max<int64_t>(ldc, N) : ldc);
    const T beta = accumulate ? T(1) : T(0);
    fortran_gemm(&tb, &ta, &N, &M, &K, &alpha, B, &ldb_, A.data, &lda, &beta, C, &ldc_);
}

#if defined(__AVX512F__) && !defined(REFORMER_BLAS_PRODUCTS)
// The register-tiled product: C is cut into tiles of up to 6 rows by 4 vectors of columns (24 accumulators in
// registers); each step over K loads one row of B's tile and broadcasts one value of A per row. The sum over K
// runs in order, so the result does not depend on anything but the operands.
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
    using Vector = __m512;
    using Mask = __mmask16;
    static constexpr int width = 16;
    static Vector zero() { return _mm512_setzero_ps(); }
    static Vector broadcast(float x) { return _mm512_set1_ps(x); }
    static Vector load(const float *p, Mask m) { return _mm512_maskz_loadu_ps(m, p); }
    static void store(float *p, Vector v, Mask m) { _mm512_mask_storeu_ps(p, m, v); }
    static Vector fma(Vector a, Vector b, Vector c) { return _mm512_fmadd_ps(a, b, c); }
    static Vector mul(Vector a, Vector b) { return _mm512_mul_ps(a, b); }
    static Vector add(Vector a, Vector b) { return _mm512_add_ps(a, b); }
};

template <>
struct Lanes<double> {
    using Vector = __m512d;
    using Mask = __mmask8;
    static constexpr int width = 8;
    static Vector zero() { return _mm512_setzero_pd(); }
    static Vector broadcast(double x) { return _mm512_set1_pd(x); }
    static Vector load(const double *p, Mask m) { return _mm512_maskz_loadu_pd(m, p); }
    static void store(double *p, Vector v, Mask m) { _mm512_mask_storeu_pd(p, m, v); }
    static Vector fma(Vector a, Vector b, Vector c) { return _mm512_fmadd_pd(a, b, c); }
    static Vector mul(Vector a, Vector b) { return _mm512_mul_pd(a, b); }
    static Vector add(Vector a, Vector b) { return _mm512_add_pd(a, b); }
};

// One tile: rows r .. r + R of C, vectors v .. v + V of its columns; the last vector's lanes are `last`. The
// loops are unrolled (the pragmas), so that the accumulators stay in registers: more than twice as fast.
template <typename T, int R, int V>
void product_tile(int K, T alpha, const T *a, int64_t a_row, int64_t a_step, const T *b, int64_t ldb,
                  bool accumulate, T *c, int64_t ldc, typename Lanes<T>::Mask last) {
    using L = Lanes<T>;
    const typename L::Mask full = static_cast<typename L::Mask>(~0u);
    typename L::Vector sum[R][V];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) sum[r][v] = L::zero();
    for (int k = 0; k < K; ++k) {
        const T *b_row = b + k * ldb, *a_column = a + k * a_step;
        typename L::Vector row[V];
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) row[v] = L::load(b_row + v * L::width, v == V - 1 ? last : full);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const typename L::Vector x = L::broadcast(a_column[r * a_row]);
#pragma GCC unroll 4
            for (int v = 0; v < V; ++v) sum[r][v] = L::fma(x, row[v], sum[r][v]);
        }
    }
    const typename L::Vector scale = L::broadcast(alpha);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
        for (int v = 0; v < V; ++v) {
            T *at = c + r * ldc + v * L::width;
            const typename L::Mask lanes = v == V - 1 ? last : full;
            typename L::Vector value = L::mul(scale, sum[r][v]);
            if (accumulate) value = L::add(value, L::load(at, lanes));
            L::store(at, value, lanes);
        }
    }
}

constexpr int TILE_ROWS = 6, TILE_VECTORS = 4;

// Rows first .. first + R of a panel of V vectors, then the rows that remain in tiles of fewer rows.
template <typename T, int V>
void product_panel(int M, int K, T alpha, Left<T> A, const T *b, int64_t ldb, bool accumulate, T *c, int64_t ldc,
                   typename Lanes<T>::Mask last) {
    int r = 0;
    for (; r + TILE_ROWS <= M; r += TILE_ROWS)
        product_tile<T, TILE_ROWS, V>(K, alpha, A.data + r * A.row, A.row, A.step, b, ldb, accumulate, c + r * ldc,
                                      ldc, last);
    const T *a = A.data + r * A.row;
    T *rest = c + r * ldc;
    switch (M - r) {
        case 5: product_tile<T, 5, V>(K, alpha, a, A.row, A.step, b, ldb, accumulate, rest, ldc, last); break;
        case 4: product_tile<T, 4, V>(K, alpha, a, A.row, A.step, b, ldb, accumulate, rest, ldc, last); break;
        case 3: product_tile<T, 3, V>(K, alpha, a, A.row, A.step, b, ldb, accumulate, rest, ldc, last); break;
        case 2: product_tile<T, 2, V>(K, alpha, a, A.row, A.step, b, ldb, accumulate, rest, ldc, last); break;
        case 1: product_tile<T, 1, V>(K, alpha, a, A.row, A.step, b, ldb, accumulate, rest, ldc, last); break;
        default: break;
    }
}

template <typename T>
void tile_product(int M, int N, int K, T alpha, Left<T> A, const T *B, int64_t ldb, bool accumulate, T *C,
                  int64_t ldc) {
    constexpr int width = Lanes<T>::width, panel = TILE_VECTORS * width;
    for (int j = 0; j < N; j += panel) {
        const int columns = N - j < panel ? N - j : panel, vectors = (columns + width - 1) / width;
        const int in_last = columns - (vectors - 1) * width;
        const auto last = static_cast<typename Lanes<T>::Mask>((1u << in_last) - 1u);
        switch (vectors) {
            case 4: product_panel<T, 4>(M, K, alpha, A, B + j, ldb, accumulate, C + j, ldc, last); break;
            case 3: product_panel<T, 3>(M, K, alpha, A, B + j, ldb, accumulate, C + j, ldc, last); break;
            case 2: product_panel<T, 2>(M, K, alpha, A, B + j, ldb, accumulate, C + j, ldc, last); break;
            default: product_panel<T, 1>(M, K, alpha, A, B + j, ldb, accumulate, C + j, ldc, last); break;
        }
    }
}
constexpr bool HAS_TILE_PRODUCT = true;
#else
template <typename T>
void tile_product(int M, int N, int K, T alpha, Left<T> A, const T *B, int64_t ldb, bool accumulate, T *C,
                  int64_t ldc) {
    blas_product(M, N, K, alpha, A, B, ldb, accumulate, C, ldc);
}
constexpr bool HAS_TILE_PRODUCT = false;
#endif

template <typename T>
void product(int M, int N, int K, T alpha, Left<T> A, const T *B, int64_t ldb, bool accumulate, T *C, int64_t ldc) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {  // an empty sum
        for (int r = 0; r < M && !accumulate; ++r) std::memset(C + r * ldc, 0, sizeof(T) * N);
        return;
    }
    if (HAS_TILE_PRODUCT)  // chosen when the library is built: the CPU's AVX-512
        tile_product(M, N, K, alpha, A, B, ldb, accumulate, C, ldc);
    else
        blas_product(M, N, K, alpha, A, B, ldb, accumulate, C, ldc);
}

// out (columns x rows) = in (rows x columns, rows `ld` apart) transposed.
template <typename T>
void transpose(const T *in, int64_t ld, int rows, int columns, T *out) {
    for (int r = 0; r < rows; ++r)
        for (int j = 0; j < columns; ++j) out[static_cast<int64_t>(j) * rows + r] = in[static_cast<int64_t>(r) * ld + j];
}

// exp(x) for x in [-87, 88]: Cephes' expf (2^k times a degree-7 polynomial on [-ln2/2, ln2/2]), written so
// that the compiler vectorises the loop around it. Relative error below 2e-7, as std::exp in float.
inline float exp_poly(float x) {
    const float k = std::nearbyint(x * 1.44269504088896341f);
    const float r = (x - k * 0.693359375f) + k * 2.12194440e-4f;  // x - k ln2, ln2 in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k, a normal number for k >= -126
    float two_k;
    std::memcpy(&two_k, &bits, sizeof two_k);
    return p * two_k;
}

inline double exp_poly(double x) { return std::exp(x); }

// Score tiles are (w, c), key by query: row j holds key j's scores with the c queries, and each loop below runs
// over the queries of a row in vectors, down the rows.

// P = exp(max(scale * s + mask - lse, floor)), 0 below p_floor, written over s; lse: one per query.
template <typename T>
void probabilities_tile(T *s, const T *mask, const T *lse, int c, int w, T scale, T floor, T p_floor) {
    for (int j = 0; j < w; ++j) {
        T *row = s + static_cast<int64_t>(j) * c;
        const T *mask_row = mask + static_cast<int64_t>(j) * c;
#pragma omp simd
        for (int r = 0; r < c; ++r) {
            T x = (mask_row[r] + scale * row[r]) - lse[r];
            x = x < floor ? floor : x;
            const T p = exp_poly(x);
            row[r] = p < p_floor ? T(0) : p;
        }
    }
}

// delta = rowsum(dO * o), one per query.
template <typename T>
void output_deltas(const T *grad, const T *out, int c, int d, T *delta) {
    for (int r = 0; r < c; ++r) {
        const T *g = grad + static_cast<int64_t>(r) * d, *o = out + static_cast<int64_t>(r) * d;
        T sum = 0;
        for (int k = 0; k < d; ++k) sum += g[k] * o[k];
        delta[r] = sum;
    }
}

// dS = P * (dP - delta), written over dP.
template <typename T>
void score_gradients_tile(T *dp, const T *p, const T *delta, int c, int w) {
    for (int j = 0; j < w; ++j) {
        T *row = dp + static_cast<int64_t>(j) * c;
        const T *p_row = p + static_cast<int64_t>(j) * c;
#pragma omp simd
        for (int r = 0; r < c; ++r) row[r] = p_row[r] * (row[r] - delta[r]);
    }
}

// Logits s -> unnormalised weights exp(max(x - colmax, floor)), 0 below p_floor, with x = scale * s + mask,
// written over s; per query: lse = colmax + log(colsum), inv_sum = 1 / colsum (top: c values of scratch).
template <typename T>
void softmax_tile(T *s, const T *mask, int c, int w, T scale, T floor, T p_floor, T *lse, T *inv_sum, T *top) {
    for (int r = 0; r < c; ++r) {
        top[r] = -INFINITY;
        inv_sum[r] = 0;  // the column sums, until the end
    }
    for (int j = 0; j < w; ++j) {
        T *row = s + static_cast<int64_t>(j) * c;
        const T *mask_row = mask + static_cast<int64_t>(j) * c;
#pragma omp simd
        for (int r = 0; r < c; ++r) {
            row[r] = mask_row[r] + scale * row[r];
            top[r] = row[r] > top[r] ? row[r] : top[r];
        }
    }
    for (int j = 0; j < w; ++j) {
        T *row = s + static_cast<int64_t>(j) * c;
#pragma omp simd
        for (int r = 0; r < c; ++r) {
            T x = row[r] - top[r];
            x = x < floor ? floor : x;
            T p = exp_poly(x);
            p = p < p_floor ? T(0) : p;
            row[r] = p;
            inv_sum[r] += p;
        }
    }
    for (int r = 0; r < c; ++r) {
        lse[r] = top[r] + std::log(inv_sum[r]);
        inv_sum[r] = T(1) / inv_sum[r];
    }
}

// The additive mask of a block (fused_chunks.MaskRecipe): a dense (G, c, w) tensor, or built chunk by chunk from
// the (scaled) positions of its queries and window keys, as the recipe's float passes build it: every value is
// 0, masked, 2 * masked or the self value.
struct MaskSpec {
    const void *dense;    // (G, c, w) of T, or null: built from what follows
    const double *q_pos;  // (G, c)
    const double *k_pos;  // (G, w): a key no query may see sits after every query
    const void *bias;     // (G, w) of T, 0 or masked (non-causal masks), or null
    int32_t causal;       // a later key is masked
    int32_t self_mode;    // 0: none; 1: the query's own key is window column diagonal + row; 2: where positions match
    int32_t diagonal;
    int32_t has_band;
    double band;  // a key farther than this from the query is masked
    double self_value, masked_value;
};

inline double clamp_logit(double x, double masked) {
    x = x < masked ? masked : x;
    return x > 0.0 ? 0.0 : x;
}

enum class MaskKind { band_causal, band, causal, bias };

// Key j's row of the mask (c values, one per query), for one kind of mask (the loop vectorises).
template <MaskKind kind, typename T>
void mask_row(T *row, const double *q_pos, double k, T bias, int c, double band, double masked) {
#pragma omp simd
    for (int r = 0; r < c; ++r) {
        const double offset = q_pos[r] - k;
        double value;
        if constexpr (kind == MaskKind::band_causal) {
            value = clamp_logit(band - offset, masked) + clamp_logit(offset, masked);
        } else if constexpr (kind == MaskKind::band) {
            value = clamp_logit(band - (offset < 0.0 ? -offset : offset), masked) + static_cast<double>(bias);
        } else if constexpr (kind == MaskKind::causal) {
            value = clamp_logit(offset, masked);
        } else {
            value = static_cast<double>(bias);
        }
        row[r] = static_cast<T>(value);
    }
}

template <MaskKind kind, typename T>
void mask_rows(T *tile, const double *q_pos, const double *k_pos, const T *bias, int c, int w, double band,
               double masked) {
    for (int j = 0; j < w; ++j)
        mask_row<kind>(tile + static_cast<int64_t>(j) * c, q_pos, k_pos[j], bias == nullptr ? T(0) : bias[j], c,
                       band, masked);
}

// Chunk i's (w, c) tile of the additive mask (key by query), built into `tile` from the recipe or the dense mask.
template <typename T>
const T *mask_tile(const MaskSpec &spec, int i, int c, int w, T *tile) {
    if (spec.dense != nullptr) {  // (c, w) query by key: transposed
        transpose(static_cast<const T *>(spec.dense) + static_cast<int64_t>(i) * c * w, w, c, w, tile);
        return tile;
    }
    const double *q_pos = spec.q_pos + static_cast<int64_t>(i) * c, *k_pos = spec.k_pos + static_cast<int64_t>(i) * w;
    const T *bias = spec.bias == nullptr ? nullptr : static_cast<const T *>(spec.bias) + static_cast<int64_t>(i) * w;
    const double masked = spec.masked_value, band = spec.band;
    if (spec.has_band && spec.causal) {
        mask_rows<MaskKind::band_causal>(tile, q_pos, k_pos, bias, c, w, band, masked);
    } else if (spec.has_band) {
        mask_rows<MaskKind::band>(tile, q_pos, k_pos, bias, c, w, band, masked);
    } else if (spec.causal) {
        mask_rows<MaskKind::causal>(tile, q_pos, k_pos, bias, c, w, band, masked);
    } else {
        mask_rows<MaskKind::bias>(tile, q_pos, k_pos, bias, c, w, band, masked);
    }
    const T self_value = static_cast<T>(spec.self_value);
    if (spec.self_mode == 1) {
        for (int r = 0; r < c && spec.diagonal + r < w; ++r)
            tile[static_cast<int64_t>(spec.diagonal + r) * c + r] = self_value;
    } else if (spec.self_mode == 2) {
        for (int j = 0; j < w; ++j)
            for (int r = 0; r < c; ++r)
                if (k_pos[j] == q_pos[r]) tile[static_cast<int64_t>(j) * c + r] = self_value;
    }
    return tile;
}

// The indices come from the caller: one outside [0, limit) raises the flag (the call then reports an error) and
// reads or writes row 0 instead, so that nothing outside the tensors is ever touched. No pass of its own.
struct Bounds {
    int64_t limit;
    std::atomic<int> *bad;
    int64_t operator()(int64_t index) const {
        if (index >= 0 && index < limit) return index;
        bad->store(1, std::memory_order_relaxed);
        return 0;
    }
};

// How many rows ahead a gather through indices asks the cache for the row it will read (`prefetch_row`): rows
// picked through indices lie scattered over tensors larger than the cache, and a gather that meets its misses
// one row after another waits on the memory's latency. A hint: it changes no result.
constexpr int PREFETCH_AHEAD = 16;

template <typename T>
void prefetch_row(const T *row, int d) {
    const char *at = reinterpret_cast<const char *>(row), *end = reinterpret_cast<const char *>(row + d);
    for (; at < end; at += 64) __builtin_prefetch(at, 0, 3);
}

// Row index[t] of rows, or null past the end (for prefetch_row: an index out of range is the gather's to report).
template <typename T>
const T *row_ahead(const T *rows, const int64_t *index, const Bounds &bounds, int t, int count, int d) {
    if (t >= count || index[t] < 0 || index[t] >= bounds.limit) return nullptr;
    return rows + index[t] * d;
}

template <typename T>
void gather_rows(const T *rows, const int64_t *index, const Bounds &bounds, int count, int d, T *out) {
    for (int t = 0; t < count; ++t) {
        if (const T *ahead = row_ahead(rows, index, bounds, t + PREFETCH_AHEAD, count, d)) prefetch_row(ahead, d);
        std::memcpy(out + static_cast<int64_t>(t) * d, rows + bounds(index[t]) * d, sizeof(T) * d);
    }
}

// s = rsqrt(|x|^2 / d + eps) / sqrt(d) of one row: its unit-length key is x * s.
template <typename T>
T key_scale(const T *x, int d, T eps) {
    T square = 0;
#pragma omp simd reduction(+ : square)
    for (int j = 0; j < d; ++j) square += x[j] * x[j];
    return T(1) / std::sqrt(square / T(d) + eps) / std::sqrt(T(d));
}

template <typename T>
void gather_unit_keys(const T *rows, const int64_t *index, const Bounds &bounds, int count, int d, T eps, T *out) {
    for (int t = 0; t < count; ++t) {
        if (const T *ahead = row_ahead(rows, index, bounds, t + PREFETCH_AHEAD, count, d)) prefetch_row(ahead, d);
        const T *x = rows + bounds(index[t]) * d;
        const T s = key_scale(x, d, eps);
        T *k = out + static_cast<int64_t>(t) * d;
#pragma omp simd
        for (int j = 0; j < d; ++j) k[j] = x[j] * s;
    }
}

// into += the gradient through the unit-length scaling at x, given the key's gradient g: g s - x s^3 (g . x).
template <typename T>
void add_unit_key_backward(T *into, const T *x, const T *g, int d, T eps) {
    const T s = key_scale(x, d, eps);
    T along = 0;
#pragma omp simd reduction(+ : along)
    for (int j = 0; j < d; ++j) along += g[j] * x[j];
    along *= s * s * s;
#pragma omp simd
    for (int j = 0; j < d; ++j) into[j] += g[j] * s - x[j] * along;
}

// values (c, d) times factors (per row; null: 1) into rows first .. first + c of base, or rows index[first ..]
// (within bounds, which go with the index).
template <typename T>
void put_rows(T *base, const int64_t *index, const Bounds *bounds, int64_t first, int c, int d, const T *values,
              bool accumulate, const T *factors = nullptr) {
    for (int r = 0; r < c; ++r) {
        if (index != nullptr)
            if (const T *ahead = row_ahead<T>(base, index + first, *bounds, r + PREFETCH_AHEAD, c, d))
                prefetch_row(ahead, d);
        T *target = base + (index == nullptr ? first + r : (*bounds)(index[first + r])) * d;
        const T *value = values + static_cast<int64_t>(r) * d;
        const T factor = factors == nullptr ? T(1) : factors[r];
        if (accumulate) {
#pragma omp simd
            for (int j = 0; j < d; ++j) target[j] += value[j] * factor;
        } else {
#pragma omp simd
            for (int j = 0; j < d; ++j) target[j] = value[j] * factor;
        }
    }
}

// A block's inputs: rows and the indices that pick its queries and its extended rows (null: the rows in order,
// read in place).
template <typename T>
struct Block {
    int G, c, d, m;
    const T *q_rows, *k_rows, *v_rows;  // k_rows null: shared query-keys
    const int64_t *q_index, *kv_index;  // (G * c), (E)
    T scale, floor, p_floor, key_eps;
    Bounds q_bounds, kv_bounds;  // the rows q_index and kv_index may pick

    int w() const { return m * c; }
    // Chunk i's c queries, w window keys, w window values: in `buffer` (c or w rows), or in place.
    // Chunk i's c rows of `rows` (laid out as the query rows) at its queries: in place, or gathered into buffer.
    const T *query_rows(const T *rows, int i, T *buffer) const {
        if (q_index == nullptr) return rows + static_cast<int64_t>(i) * c * d;
        gather_rows(rows, q_index + static_cast<int64_t>(i) * c, q_bounds, c, d, buffer);
        return buffer;
    }
    void copy_query_rows(const T *rows, int i, T *out) const {
        const T *found = query_rows(rows, i, out);
        if (found != out) std::memcpy(out, found, sizeof(T) * c * d);
    }
    const T *queries(int i, T *buffer) const { return query_rows(q_rows, i, buffer); }
    const T *keys(int i, T *buffer) const {
        if (k_rows == nullptr) {
            gather_unit_keys(q_rows, kv_index + static_cast<int64_t>(i) * c, kv_bounds, w(), d, key_eps, buffer);
            return buffer;
        }
        return window(k_rows, i, buffer);
    }
    const T *values(int i, T *buffer) const { return window(v_rows, i, buffer); }
    const T *window(const T *rows, int i, T *buffer) const {
        if (kv_index == nullptr) return rows + static_cast<int64_t>(i) * c * d;
        gather_rows(rows, kv_index + static_cast<int64_t>(i) * c, kv_bounds, w(), d, buffer);
        return buffer;
    }
    int64_t query_row(int64_t slot) const { return q_index == nullptr ? slot : q_bounds(q_index[slot]); }
};

// A thread's tiles, carved from one allocation: `take(n)` hands out the next n values.
template <typename T>
struct Scratch {
    explicit Scratch(int64_t size) : data(new T[size]), next(data) {}
    ~Scratch() { delete[] data; }
    Scratch(const Scratch &) = delete;
    Scratch &operator=(const Scratch &) = delete;
    T *take(int64_t n) {
        T *at = next;
        next += n;
        return at;
    }
    T *data, *next;
};

template <typename T>
void block_forward(const Block<T> &b, const MaskSpec &spec, T *out, const int64_t *out_index,
                   const Bounds &out_bounds, T *lse) {
    const int c = b.c, d = b.d, w = b.w();
    const int64_t tile = static_cast<int64_t>(c) * w, rows = static_cast<int64_t>(c) * d;
    const int64_t window_rows = static_cast<int64_t>(w) * d;
#pragma omp parallel
    {
        Scratch<T> scratch(2 * tile + 3 * rows + 2 * window_rows + 2 * c);
        T *weights = scratch.take(tile), *mask = scratch.take(tile), *q = scratch.take(rows);
        T *q_t = scratch.take(rows), *o = scratch.take(rows), *k = scratch.take(window_rows);
        T *v = scratch.take(window_rows), *inv_sum = scratch.take(c), *top = scratch.take(c);
#pragma omp for schedule(static)
        for (int i = 0; i < b.G; ++i) {
            transpose(b.queries(i, q), d, c, d, q_t);                                              // (d, c)
            product<T>(w, c, d, T(1), {b.keys(i, k), d, 1}, q_t, c, false, weights, c);           // k.q^T (w, c)
            softmax_tile(weights, mask_tile(spec, i, c, w, mask), c, w, b.scale, b.floor, b.p_floor,
                         lse + static_cast<int64_t>(i) * c, inv_sum, top);
            product<T>(c, d, w, T(1), {weights, 1, c}, b.values(i, v), d, false, o, d);           // P^T.v (c, d)
            put_rows(out, out_index, &out_bounds, static_cast<int64_t>(i) * c, c, d, o, false, inv_sum);
        }
    }
}

// The backward's inputs besides the block: the output's gradient and the output, read at the query rows; the
// block's log-sum-exps (G * c); and, when rounds are combined, every row's combined one (float64).
template <typename T>
struct Gradient {
    const T *grad_rows, *out_rows, *lse;
    const double *lse_rows;  // null: one round, whose share is 1
};

// Where the gradients go: dq rows (in order from dq, or at dq_index), added or written; dk, dv: the E extended
// rows in order, added or written (shared query-keys: dk through the unit-length scaling, always added).
template <typename T>
struct Targets {
    T *dq;
    const int64_t *dq_index;
    Bounds dq_bounds;
    bool dq_accumulate;
    T *dk, *dv;
    bool kv_accumulate;
};

// A thread's tiles for the backward's chunks.
template <typename T>
struct BackwardScratch {
    BackwardScratch(int c, int d, int w)
        : tiles(static_cast<int64_t>(c) * w + 7 * static_cast<int64_t>(c) * d + 2 * static_cast<int64_t>(w) * d + c),
          mask(tiles.take(static_cast<int64_t>(c) * w)), o(tiles.take(static_cast<int64_t>(c) * d)),
          dq(tiles.take(static_cast<int64_t>(c) * d)), q_t(tiles.take(static_cast<int64_t>(c) * d)),
          grad_t(tiles.take(static_cast<int64_t>(c) * d)), dk(tiles.take(static_cast<int64_t>(c) * d)),
          dv(tiles.take(static_cast<int64_t>(c) * d)), k(tiles.take(static_cast<int64_t>(w) * d)),
          v(tiles.take(static_cast<int64_t>(w) * d)), delta(tiles.take(c)) {}
    Scratch<T> tiles;
    T *mask, *o, *dq, *q_t, *grad_t, *dk, *dv, *k, *v, *delta;
};

// Phase 1: chunk i's score tiles P, dS (w, c) (kept for phase 2, with its queries and scaled dO) and its dq.
template <typename T>
void chunk_backward(const Block<T> &b, const MaskSpec &spec, const Gradient<T> &gradient, const Targets<T> &targets,
                    int i, T *p, T *ds, T *grad_i, T *q_i, BackwardScratch<T> &s) {
    const int c = b.c, d = b.d, w = b.w();
    const int64_t first = static_cast<int64_t>(i) * c;
    b.copy_query_rows(b.q_rows, i, q_i);  // phase 2 reads the queries and the scaled dO from the workspace
    b.copy_query_rows(gradient.grad_rows, i, grad_i);
    if (gradient.lse_rows != nullptr) {  // dO times the round's share of the joint softmax
        for (int r = 0; r < c; ++r) {
            const double lse_row = gradient.lse_rows[b.query_row(first + r)];
            const T share = static_cast<T>(std::exp(static_cast<double>(gradient.lse[first + r]) - lse_row));
            T *g = grad_i + static_cast<int64_t>(r) * d;
#pragma omp simd
            for (int j = 0; j < d; ++j) g[j] *= share;
        }
    }
    output_deltas(grad_i, b.query_rows(gradient.out_rows, i, s.o), c, d, s.delta);
    const T *keys = b.keys(i, s.k), *values = b.values(i, s.v);
    transpose(q_i, d, c, d, s.q_t);                                            // (d, c)
    transpose(grad_i, d, c, d, s.grad_t);                                      // (d, c)
    product<T>(w, c, d, T(1), {keys, d, 1}, s.q_t, c, false, p, c);           // k.q^T (w, c)
    probabilities_tile(p, mask_tile(spec, i, c, w, s.mask), gradient.lse + first, c, w, b.scale, b.floor, b.p_floor);
    product<T>(w, c, d, T(1), {values, d, 1}, s.grad_t, c, false, ds, c);     // v.dO^T (w, c)
    score_gradients_tile(ds, p, s.delta, c, w);
    product<T>(c, d, w, b.scale, {ds, 1, c}, keys, d, false, s.dq, d);        // scale dS^T.k (c, d)
    put_rows(targets.dq, targets.dq_index, &targets.dq_bounds, first, c, d, s.dq, targets.dq_accumulate);
}

// Extended chunk j's dk and dv rows from the score tiles of the chunks that see it (the workspace holds them).
template <typename T>
void extended_chunk_backward(const Block<T> &b, const Targets<T> &targets, int j, const T *probabilities,
                             const T *d_scores, const T *grads, const T *queries, T *dk, T *dv) {
    const int c = b.c, d = b.d, w = b.w();
    const int64_t tile = static_cast<int64_t>(c) * w, rows = static_cast<int64_t>(c) * d;
    bool first = true;
    for (int part = 0; part < b.m; ++part) {
        const int i = j - part;
        if (i < 0 || i >= b.G) continue;
        const int64_t at = i * tile + static_cast<int64_t>(part) * c * c;  // part p's rows of chunk i's tiles
        product<T>(c, d, c, T(1), {probabilities + at, c, 1}, grads + i * rows, d, !first, dv, d);   // P dO
        product<T>(c, d, c, b.scale, {d_scores + at, c, 1}, queries + i * rows, d, !first, dk, d);  // dS q
        first = false;
    }
    const int64_t at = static_cast<int64_t>(j) * c;
    put_rows<T>(targets.dv, nullptr, nullptr, at, c, d, dv, targets.kv_accumulate);
    if (b.k_rows != nullptr) {
        put_rows<T>(targets.dk, nullptr, nullptr, at, c, d, dk, targets.kv_accumulate);
    } else {
        for (int r = 0; r < c; ++r)  // shared query-keys always come with indices
            add_unit_key_backward(targets.dk + (at + r) * d, b.q_rows + b.kv_bounds(b.kv_index[at + r]) * d,
                                  dk + static_cast<int64_t>(r) * d, d, b.key_eps);
    }
}

// Thread t's share of G chunks: [first_chunk(G, threads, t), first_chunk(G, threads, t + 1)).
inline int first_chunk(int G, int threads, int t) { return static_cast<int>(static_cast<int64_t>(G) * t / threads); }

// Whether the thread that owns chunk j also owns every chunk that sees extended chunk j (j - m + 1 .. j, those
// in the block): it then computes j's dk and dv right after chunk j, while the chunks' tiles are in cache.
inline bool owns_extended_chunk(int G, int m, int threads, int j) {
    if (j >= G) return false;
    int t = 0;
    while (first_chunk(G, threads, t + 1) <= j) ++t;
    const int oldest = j - m + 1 < 0 ? 0 : j - m + 1;
    return oldest >= first_chunk(G, threads, t);
}

template <typename T>
void block_backward(const Block<T> &b, const MaskSpec &spec, const Gradient<T> &gradient, const Targets<T> &targets,
                    T *probabilities, T *d_scores, T *grads, T *queries) {
    const int c = b.c, d = b.d, m = b.m, w = b.w();
    const int64_t tile = static_cast<int64_t>(c) * w, rows = static_cast<int64_t>(c) * d;
    const int extended_chunks = b.G + m - 1;
#pragma omp parallel
    {
        BackwardScratch<T> scratch(c, d, w);
        const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
        for (int i = first_chunk(b.G, threads, thread); i < first_chunk(b.G, threads, thread + 1); ++i) {
            chunk_backward(b, spec, gradient, targets, i, probabilities + i * tile, d_scores + i * tile,
                           grads + i * rows, queries + i * rows, scratch);
            if (owns_extended_chunk(b.G, m, threads, i))
                extended_chunk_backward(b, targets, i, probabilities, d_scores, grads, queries, scratch.dk,
                                        scratch.dv);
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int j = 0; j < extended_chunks; ++j)  // the rest: their chunks span two threads' shares, or j >= G
            if (!owns_extended_chunk(b.G, m, threads, j))
                extended_chunk_backward(b, targets, j, probabilities, d_scores, grads, queries, scratch.dk,
                                        scratch.dv);
    }
}

}  // namespace

extern "C" {

int reformer_window_kernel_version() { return 7; }

// limits: the rows q_index may pick (the query, gradient and output rows), the rows kv_index may pick (the key
// and value rows), the rows out_index or dq_index may pick. Returns 0, or 1 when an index was out of range (the
// outputs are then undefined).
#define REFORMER_WINDOW_KERNELS(T, SUFFIX)                                                                          \
    int reformer_window_forward_##SUFFIX(int G, int c, int d, int m, const T *q_rows, const T *k_rows,             \
                                         const T *v_rows, const int64_t *q_index, const int64_t *kv_index,         \
                                         const MaskSpec *mask, T scale, T floor, T p_floor, T key_eps, T *out,     \
                                         const int64_t *out_index, T *lse, const int64_t *limits) {                \
        std::atomic<int> bad{0};                                                                                   \
        const Block<T> block{G,        c,     d,       m,       q_rows, k_rows, v_rows, q_index, kv_index, scale, \
                             floor,    p_floor, key_eps, {limits[0], &bad}, {limits[1], &bad}};                   \
        block_forward<T>(block, *mask, out, out_index, Bounds{limits[2], &bad}, lse);                              \
        return bad.load();                                                                                         \
    }                                                                                                              \
    int reformer_window_backward_##SUFFIX(int G, int c, int d, int m, const T *q_rows, const T *k_rows,            \
                                          const T *v_rows, const int64_t *q_index, const int64_t *kv_index,        \
                                          const MaskSpec *mask, T scale, T floor, T p_floor, T key_eps,            \
                                          const T *grad_rows, const T *out_rows, const T *lse,                     \
                                          const double *lse_rows, T *dq, const int64_t *dq_index,                  \
                                          int dq_accumulate, T *dk, T *dv, int kv_accumulate, T *probabilities,    \
                                          T *d_scores, T *grads, T *queries, const int64_t *limits) {              \
        std::atomic<int> bad{0};                                                                                   \
        const Block<T> block{G,        c,     d,       m,       q_rows, k_rows, v_rows, q_index, kv_index, scale, \
                             floor,    p_floor, key_eps, {limits[0], &bad}, {limits[1], &bad}};                   \
        const Gradient<T> gradient{grad_rows, out_rows, lse, lse_rows};                                            \
        const Targets<T> targets{dq, dq_index, {limits[2], &bad}, dq_accumulate != 0, dk, dv, kv_accumulate != 0}; \
        block_backward<T>(block, *mask, gradient, targets, probabilities, d_scores, grads, queries);               \
        return bad.load();                                                                                         \
    }

// The (G, c, w) mask alone (query by key), for the tests.
#define REFORMER_WINDOW_MASK(T, SUFFIX)                                                                             \
    void reformer_window_mask_##SUFFIX(int G, int c, int w, const MaskSpec *mask, T *out) {                        \
        T *tile = new T[static_cast<int64_t>(c) * w];                                                              \
        for (int i = 0; i < G; ++i)                                                                                \
            transpose(mask_tile(*mask, i, c, w, tile), c, w, c, out + static_cast<int64_t>(i) * c * w);            \
        delete[] tile;                                                                                             \
    }

REFORMER_WINDOW_KERNELS(float, f32)
REFORMER_WINDOW_KERNELS(double, f64)
REFORMER_WINDOW_MASK(float, f32)
REFORMER_WINDOW_MASK(double, f64)

// Which products the kernels run: 1 this file's tile product, 0 the BLAS (fixed when the library is built).
int reformer_window_products() { return HAS_TILE_PRODUCT ? 1 : 0; }

}  // extern "C"
