// Blocks of chunk-window attention, forward and backward, fused chunk by chunk (see window_kernel.py and
// fused_chunks.py).
//
// Plain C++ with a C interface, loaded with ctypes (native.py): no PyTorch headers, so it builds quickly. Matrix
// products call the BLAS that PyTorch itself uses (`sgemm_`, `dgemm_` from libtorch_cpu); the gathers, the mask
// and the elementwise work run on each chunk's tiles while they are in cache.
//
// Legend (row-major): G chunks of c queries, d head width, m window parts, w = m * c keys per window,
// E = (G + m - 1) * c extended rows; chunk i's window is extended rows i*c .. i*c + w.
//   rows: (N, d) contiguous, read through indices: query slot s of the block is row q_index[s] (G * c of them),
//   extended row t is row kv_index[t] (E of them) of the key rows and of the value rows; without indices the
//   rows are the block's in order, read in place. Shared query-keys (no key rows, indices needed): the keys are
//   the query rows at kv_index scaled to unit length, x * rsqrt(|x|^2 / d + eps) / sqrt(d).
//   mask (MaskSpec): a dense (G, c, w) additive tensor, or its recipe: positions per query and per window key.
//
// Forward, chunk by chunk (in parallel): x = scale*q.k + mask; lse = max + log(sum exp(max(x - max, floor)));
// out = (exp(max(x - max, floor)), 0 below p_floor) . v / sum, written to the out rows (in order or by index).
//
// Backward, phase 1, chunk by chunk (in parallel): dO = the gradient rows, times the round's share
// exp(lse_slot - lse_row) when rounds are combined; P = exp(max(scale*q.k + mask - lse, floor)), 0 below p_floor;
// dS = P * (dO.v - rowsum(dO*o)); dq = scale * dS.k, added to (or written into) the dq rows.
// Phase 2, extended chunk by extended chunk: dk_j = scale * sum_p dS_{j-p}[part p]^T q_{j-p},
// dv_j = sum_p P_{j-p}[part p]^T dO_{j-p}, over p = 0 .. m-1 in that order; shared query-keys: dk_j goes
// through the unit-length scaling. Each thread runs phase 1 on a contiguous share of the chunks, and phase 2 for
// extended chunk j right after chunk j when all of j's chunks are in its share (their tiles are still in
// cache); the other extended chunks (at the shares' edges, and the last m - 1) follow in parallel. Each extended
// chunk is computed by one thread, the same way: the result does not depend on the number of threads.

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>

#include <omp.h>

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

// Row-major C (M x N) = alpha * op(A) op(B) + beta * C, as the column-major product C^T = op(B)^T op(A)^T.
template <typename T>
void gemm(bool trans_a, bool trans_b, int M, int N, int K, T alpha, const T *A, int lda, const T *B, int ldb, T beta,
          T *C, int ldc) {
    const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
    fortran_gemm(&tb, &ta, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
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

// One (c, w) tile: P = exp(max(scale * s + mask - lse, floor)), 0 below p_floor, written over s.
template <typename T>
void probabilities_tile(T *s, const T *mask, const T *lse, int c, int w, T scale, T floor, T p_floor) {
    for (int r = 0; r < c; ++r) {
        T *row = s + static_cast<int64_t>(r) * w;
        const T *mask_row = mask + static_cast<int64_t>(r) * w;
        const T shift = lse[r];
#pragma omp simd
        for (int j = 0; j < w; ++j) {
            T x = (mask_row[j] + scale * row[j]) - shift;
            x = x < floor ? floor : x;
            const T p = exp_poly(x);
            row[j] = p < p_floor ? T(0) : p;
        }
    }
}

// dS = P * (dP - delta), written over dP (one (c, w) tile); delta = rowsum(dO * o).
template <typename T>
void score_gradients_tile(T *dp, const T *p, const T *grad, const T *out, int c, int w, int d) {
    for (int r = 0; r < c; ++r) {
        const T *g = grad + static_cast<int64_t>(r) * d, *o = out + static_cast<int64_t>(r) * d;
        T delta = 0;
        for (int j = 0; j < d; ++j) delta += g[j] * o[j];
        T *row = dp + static_cast<int64_t>(r) * w;
        const T *p_row = p + static_cast<int64_t>(r) * w;
#pragma omp simd
        for (int j = 0; j < w; ++j) row[j] = p_row[j] * (row[j] - delta);
    }
}

// One (c, w) tile of logits s -> unnormalised weights exp(max(x - rowmax, floor)), 0 below p_floor, with
// x = scale * s + mask, written over s; lse[r] = rowmax + log(rowsum), inv_sum[r] = 1 / rowsum.
template <typename T>
void softmax_tile(T *s, const T *mask, int c, int w, T scale, T floor, T p_floor, T *lse, T *inv_sum) {
    for (int r = 0; r < c; ++r) {
        T *row = s + static_cast<int64_t>(r) * w;
        const T *mask_row = mask + static_cast<int64_t>(r) * w;
        T top = -INFINITY;
#pragma omp simd reduction(max : top)
        for (int j = 0; j < w; ++j) {
            row[j] = mask_row[j] + scale * row[j];
            top = row[j] > top ? row[j] : top;
        }
        T sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int j = 0; j < w; ++j) {
            T x = row[j] - top;
            x = x < floor ? floor : x;
            T p = exp_poly(x);
            p = p < p_floor ? T(0) : p;
            row[j] = p;
            sum += p;
        }
        lse[r] = top + std::log(sum);
        inv_sum[r] = T(1) / sum;
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

// One row of the mask (w values) of the query at position q, for one kind of mask (the loop vectorises).
template <MaskKind kind, typename T>
void mask_row(T *row, double q, const double *k_pos, const T *bias, int w, double band, double masked) {
#pragma omp simd
    for (int j = 0; j < w; ++j) {
        const double offset = q - k_pos[j];
        double value;
        if constexpr (kind == MaskKind::band_causal) {
            value = clamp_logit(band - offset, masked) + clamp_logit(offset, masked);
        } else if constexpr (kind == MaskKind::band) {
            value = clamp_logit(band - (offset < 0.0 ? -offset : offset), masked) + static_cast<double>(bias[j]);
        } else if constexpr (kind == MaskKind::causal) {
            value = clamp_logit(offset, masked);
        } else {
            value = static_cast<double>(bias[j]);
        }
        row[j] = static_cast<T>(value);
    }
}

template <MaskKind kind, typename T>
void mask_rows(T *tile, const double *q_pos, const double *k_pos, const T *bias, int c, int w, double band,
               double masked) {
    for (int r = 0; r < c; ++r)
        mask_row<kind>(tile + static_cast<int64_t>(r) * w, q_pos[r], k_pos, bias, w, band, masked);
}

// Chunk i's (c, w) tile of the additive mask: the dense one's, or built into `tile`.
template <typename T>
const T *mask_tile(const MaskSpec &spec, int i, int c, int w, T *tile) {
    if (spec.dense != nullptr) return static_cast<const T *>(spec.dense) + static_cast<int64_t>(i) * c * w;
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
    for (int r = 0; r < c; ++r) {
        T *row = tile + static_cast<int64_t>(r) * w;
        if (spec.self_mode == 1 && spec.diagonal + r < w) {
            row[spec.diagonal + r] = self_value;
        } else if (spec.self_mode == 2) {
            for (int j = 0; j < w; ++j)
                if (k_pos[j] == q_pos[r]) row[j] = self_value;
        }
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

template <typename T>
void gather_rows(const T *rows, const int64_t *index, const Bounds &bounds, int count, int d, T *out) {
    for (int t = 0; t < count; ++t)
        std::memcpy(out + static_cast<int64_t>(t) * d, rows + bounds(index[t]) * d, sizeof(T) * d);
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

template <typename T>
void block_forward(const Block<T> &b, const MaskSpec &spec, T *out, const int64_t *out_index,
                   const Bounds &out_bounds, T *lse) {
    const int c = b.c, d = b.d, w = b.w();
    const int64_t tile = static_cast<int64_t>(c) * w, rows = static_cast<int64_t>(c) * d;
    const int64_t window_rows = static_cast<int64_t>(w) * d;
#pragma omp parallel
    {
        T *buffer = new T[2 * tile + 2 * rows + 2 * window_rows + c];  // this thread's tiles
        T *weights = buffer, *mask = weights + tile, *q = mask + tile, *o = q + rows, *k = o + rows;
        T *v = k + window_rows, *inv_sum = v + window_rows;
#pragma omp for schedule(static)
        for (int i = 0; i < b.G; ++i) {
            gemm<T>(false, true, c, w, d, T(1), b.queries(i, q), d, b.keys(i, k), d, T(0), weights, w);  // q.k^T
            softmax_tile(weights, mask_tile(spec, i, c, w, mask), c, w, b.scale, b.floor, b.p_floor,
                         lse + static_cast<int64_t>(i) * c, inv_sum);
            gemm<T>(false, false, c, d, w, T(1), weights, w, b.values(i, v), d, T(0), o, d);  // P.v (c, d)
            put_rows(out, out_index, &out_bounds, static_cast<int64_t>(i) * c, c, d, o, false, inv_sum);
        }
        delete[] buffer;
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

// Phase 1: chunk i's score tiles P, dS (kept for phase 2, with its queries and scaled dO) and its dq.
template <typename T>
void chunk_backward(const Block<T> &b, const MaskSpec &spec, const Gradient<T> &gradient, const Targets<T> &targets,
                    int i, T *p, T *ds, T *grad_i, T *q_i, T *scratch) {
    const int c = b.c, d = b.d, w = b.w();
    const int64_t first = static_cast<int64_t>(i) * c, rows = static_cast<int64_t>(c) * d;
    T *mask = scratch, *o = mask + static_cast<int64_t>(c) * w, *dq = o + rows, *k = dq + rows;
    T *v = k + static_cast<int64_t>(w) * d;
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
    const T *outputs = b.query_rows(gradient.out_rows, i, o);
    const T *keys = b.keys(i, k), *values = b.values(i, v);
    gemm<T>(false, true, c, w, d, T(1), q_i, d, keys, d, T(0), p, w);  // q.k^T (c, w)
    probabilities_tile(p, mask_tile(spec, i, c, w, mask), gradient.lse + first, c, w, b.scale, b.floor, b.p_floor);
    gemm<T>(false, true, c, w, d, T(1), grad_i, d, values, d, T(0), ds, w);  // dO.v^T (c, w)
    score_gradients_tile(ds, p, grad_i, outputs, c, w, d);
    gemm<T>(false, false, c, d, w, b.scale, ds, w, keys, d, T(0), dq, d);  // scale dS.k (c, d)
    put_rows(targets.dq, targets.dq_index, &targets.dq_bounds, first, c, d, dq, targets.dq_accumulate);
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
        const T beta = first ? T(0) : T(1);
        const T *p_part = probabilities + i * tile + static_cast<int64_t>(part) * c;  // (c, c), row stride w
        const T *ds_part = d_scores + i * tile + static_cast<int64_t>(part) * c;
        gemm<T>(true, false, c, d, c, T(1), p_part, w, grads + i * rows, d, beta, dv, d);        // P^T dO
        gemm<T>(true, false, c, d, c, b.scale, ds_part, w, queries + i * rows, d, beta, dk, d);  // dS^T q
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
        T *scratch = new T[tile + 4 * rows + 2 * static_cast<int64_t>(w) * d];  // mask, o, dq, k, v; dk, dv
        T *dk = scratch + tile + 2 * rows + 2 * static_cast<int64_t>(w) * d, *dv = dk + rows;
        const int threads = omp_get_num_threads(), thread = omp_get_thread_num();
        for (int i = first_chunk(b.G, threads, thread); i < first_chunk(b.G, threads, thread + 1); ++i) {
            chunk_backward(b, spec, gradient, targets, i, probabilities + i * tile, d_scores + i * tile,
                           grads + i * rows, queries + i * rows, scratch);
            if (owns_extended_chunk(b.G, m, threads, i))
                extended_chunk_backward(b, targets, i, probabilities, d_scores, grads, queries, dk, dv);
        }
#pragma omp barrier
#pragma omp for schedule(static)
        for (int j = 0; j < extended_chunks; ++j)  // the rest: their chunks span two threads' shares, or j >= G
            if (!owns_extended_chunk(b.G, m, threads, j))
                extended_chunk_backward(b, targets, j, probabilities, d_scores, grads, queries, dk, dv);
        delete[] scratch;
    }
}

}  // namespace

extern "C" {

int reformer_window_kernel_version() { return 5; }

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

#define REFORMER_WINDOW_MASK(T, SUFFIX)                                                                             \
    void reformer_window_mask_##SUFFIX(int G, int c, int w, const MaskSpec *mask, T *out) {                        \
        for (int i = 0; i < G; ++i) {                                                                              \
            T *tile = out + static_cast<int64_t>(i) * c * w;                                                       \
            const T *built = mask_tile(*mask, i, c, w, tile);                                                      \
            if (built != tile) std::memcpy(tile, built, sizeof(T) * c * w);                                        \
        }                                                                                                          \
    }

REFORMER_WINDOW_KERNELS(float, f32)
REFORMER_WINDOW_KERNELS(double, f64)
REFORMER_WINDOW_MASK(float, f32)  // the mask alone, for the tests
REFORMER_WINDOW_MASK(double, f64)

}  // extern "C"
