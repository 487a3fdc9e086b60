// One block of chunk-window attention, forward and backward, fused chunk by chunk (see window_kernel.py).
//
// Plain C++ with a C interface, loaded with ctypes (native.py): no PyTorch headers, so it builds quickly. Matrix products call the BLAS that PyTorch itself uses (`sgemm_`, `dgemm_` from
// libtorch_cpu); the elementwise work runs on each chunk's (c, w) tile while it is in cache.
//
// Legend (row-major, contiguous): G chunks of c queries, d head width, m window parts, w = m * c keys
// per window, E = (G + m - 1) * c extended rows; chunk i's window is extended rows i*c .. i*c + w.
//   grad, q, out: (G, c, d)   k, v: (E, d)   lse: (G, c)   mask: (G, c, w) additive
//   dq: (G, c, d)   dk, dv: (E, d)   probabilities, d_scores: (G, c, w) workspace
//
// Forward, chunk by chunk (in parallel): x = scale*q.k + mask; lse = max + log(sum exp(max(x - max, floor)));
// out = (exp(max(x - max, floor)), 0 below p_floor) . v / sum.
//
// Backward, phase 1, chunk by chunk (in parallel): P = exp(max(scale*q.k + mask - lse, floor)), 0 below p_floor;
// dS = P * (dO.v - rowsum(dO*o)); dq = scale * dS.k.
// Phase 2, extended chunk by extended chunk (in parallel): dk_j = scale * sum_p dS_{j-p}[part p]^T q_{j-p},
// dv_j = sum_p P_{j-p}[part p]^T dO_{j-p}, over p = 0 .. m-1 in that order (each extended chunk is written
// by one thread, in a fixed order: the result does not depend on the number of threads).

#include <cmath>
#include <cstdint>
#include <cstring>

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

template <typename T>
void block_forward(int G, int c, int d, int m, const T *q, const T *k, const T *v, const T *mask, T scale, T floor,
                   T p_floor, T *out, T *lse) {
    const int w = m * c;
    const int64_t tile = static_cast<int64_t>(c) * w, rows = static_cast<int64_t>(c) * d;
#pragma omp parallel
    {
        T *weights = new T[tile + c];  // this thread's (c, w) tile and its c inverse sums
        T *inv_sum = weights + tile;
#pragma omp for schedule(static)
        for (int i = 0; i < G; ++i) {
            T *out_i = out + i * rows;
            gemm<T>(false, true, c, w, d, T(1), q + i * rows, d, k + i * rows, d, T(0), weights, w);  // q.k^T
            softmax_tile(weights, mask + i * tile, c, w, scale, floor, p_floor, lse + static_cast<int64_t>(i) * c,
                         inv_sum);
            gemm<T>(false, false, c, d, w, T(1), weights, w, v + i * rows, d, T(0), out_i, d);  // P.v (c, d)
            for (int r = 0; r < c; ++r) {
                T *o = out_i + static_cast<int64_t>(r) * d;
                const T factor = inv_sum[r];
#pragma omp simd
                for (int j = 0; j < d; ++j) o[j] *= factor;
            }
        }
        delete[] weights;
    }
}

template <typename T>
void block_backward(int G, int c, int d, int m, const T *grad, const T *q, const T *k, const T *v, const T *out,
                    const T *lse, const T *mask, T scale, T floor, T p_floor, T *dq, T *dk, T *dv, T *probabilities,
                    T *d_scores) {
    const int w = m * c;
    const int64_t tile = static_cast<int64_t>(c) * w, rows = static_cast<int64_t>(c) * d;
#pragma omp parallel for schedule(static)
    for (int i = 0; i < G; ++i) {
        const T *q_i = q + i * rows, *grad_i = grad + i * rows;
        const T *k_window = k + i * rows, *v_window = v + i * rows;  // w rows from extended row i * c
        T *p = probabilities + i * tile, *ds = d_scores + i * tile;
        gemm<T>(false, true, c, w, d, T(1), q_i, d, k_window, d, T(0), p, w);  // q.k^T (c, w)
        probabilities_tile(p, mask + i * tile, lse + static_cast<int64_t>(i) * c, c, w, scale, floor, p_floor);
        gemm<T>(false, true, c, w, d, T(1), grad_i, d, v_window, d, T(0), ds, w);  // dO.v^T (c, w)
        score_gradients_tile(ds, p, grad_i, out + i * rows, c, w, d);
        gemm<T>(false, false, c, d, w, scale, ds, w, k_window, d, T(0), dq + i * rows, d);  // scale dS.k (c, d)
    }
    const int extended_chunks = G + m - 1;
#pragma omp parallel for schedule(static)
    for (int j = 0; j < extended_chunks; ++j) {
        T *dk_j = dk + j * rows, *dv_j = dv + j * rows;
        bool first = true;
        for (int part = 0; part < m; ++part) {
            const int i = j - part;
            if (i < 0 || i >= G) continue;
            const T beta = first ? T(0) : T(1);
            const T *p_part = probabilities + i * tile + static_cast<int64_t>(part) * c;  // (c, c), row stride w
            const T *ds_part = d_scores + i * tile + static_cast<int64_t>(part) * c;
            gemm<T>(true, false, c, d, c, T(1), p_part, w, grad + i * rows, d, beta, dv_j, d);  // P^T dO
            gemm<T>(true, false, c, d, c, scale, ds_part, w, q + i * rows, d, beta, dk_j, d);  // scale dS^T q
            first = false;
        }
    }
}

}  // namespace

extern "C" {

int reformer_window_kernel_version() { return 2; }

void reformer_window_block_forward_f32(int G, int c, int d, int m, const float *q, const float *k, const float *v,
                                       const float *mask, float scale, float floor, float p_floor, float *out,
                                       float *lse) {
    block_forward<float>(G, c, d, m, q, k, v, mask, scale, floor, p_floor, out, lse);
}

void reformer_window_block_forward_f64(int G, int c, int d, int m, const double *q, const double *k, const double *v,
                                       const double *mask, double scale, double floor, double p_floor, double *out,
                                       double *lse) {
    block_forward<double>(G, c, d, m, q, k, v, mask, scale, floor, p_floor, out, lse);
}

void reformer_window_block_backward_f32(int G, int c, int d, int m, const float *grad, const float *q, const float *k,
                                        const float *v, const float *out, const float *lse, const float *mask,
                                        float scale, float floor, float p_floor, float *dq, float *dk, float *dv,
                                        float *probabilities, float *d_scores) {
    block_backward<float>(G, c, d, m, grad, q, k, v, out, lse, mask, scale, floor, p_floor, dq, dk, dv,
                          probabilities, d_scores);
}

void reformer_window_block_backward_f64(int G, int c, int d, int m, const double *grad, const double *q,
                                        const double *k, const double *v, const double *out, const double *lse,
                                        const double *mask, double scale, double floor, double p_floor, double *dq,
                                        double *dk, double *dv, double *probabilities, double *d_scores) {
    block_backward<double>(G, c, d, m, grad, q, k, v, out, lse, mask, scale, floor, p_floor, dq, dk, dv,
                           probabilities, d_scores);
}

}  // extern "C"
