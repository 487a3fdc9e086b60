// Angular LSH's bucket digit: argmax of [y ; -y] over the rotations, the first index on ties (see lsh.py).
//
// y is (P, k, m) with a row stride of 1 over the m positions, `k_stride` between rotations and `p_stride`
// between the P outer rows (a slice of the rotations of a contiguous (P, rot, m) tensor); digits is (P, m).
// One pass over y: the running maximum and minimum of every position with their first indices; the digit is
// the maximum's index when max >= -min (y's entries come before -y's), else k + the minimum's index.

#include <cstdint>

namespace {

constexpr int64_t POSITIONS = 256;  // positions per task: a few KiB of running state, in L1

template <typename T>
void signed_argmax(int64_t P, int64_t k, int64_t m, const T *y, int64_t p_stride, int64_t k_stride, int64_t *digits) {
    const int64_t pieces = (m + POSITIONS - 1) / POSITIONS;
#pragma omp parallel for schedule(static)
    for (int64_t task = 0; task < P * pieces; ++task) {
        const int64_t p = task / pieces, first = (task % pieces) * POSITIONS;
        const int64_t count = m - first < POSITIONS ? m - first : POSITIONS;
        const T *rows = y + p * p_stride + first;
        T top[POSITIONS], bottom[POSITIONS];
        int32_t top_at[POSITIONS], bottom_at[POSITIONS];
        for (int64_t j = 0; j < count; ++j) {
            top[j] = bottom[j] = rows[j];
            top_at[j] = bottom_at[j] = 0;
        }
        for (int64_t i = 1; i < k; ++i) {
            const T *row = rows + i * k_stride;
#pragma omp simd
            for (int64_t j = 0; j < count; ++j) {
                const T value = row[j];
                const bool higher = value > top[j], lower = value < bottom[j];  // strict: the first index stays
                top[j] = higher ? value : top[j];
                top_at[j] = higher ? static_cast<int32_t>(i) : top_at[j];
                bottom[j] = lower ? value : bottom[j];
                bottom_at[j] = lower ? static_cast<int32_t>(i) : bottom_at[j];
            }
        }
        int64_t *out = digits + p * m + first;
        for (int64_t j = 0; j < count; ++j) out[j] = top[j] >= -bottom[j] ? top_at[j] : k + bottom_at[j];
    }
}

}  // namespace

extern "C" {

void reformer_signed_argmax_f32(int64_t P, int64_t k, int64_t m, const float *y, int64_t p_stride, int64_t k_stride,
                                int64_t *digits) {
    signed_argmax<float>(P, k, m, y, p_stride, k_stride, digits);
}

void reformer_signed_argmax_f64(int64_t P, int64_t k, int64_t m, const double *y, int64_t p_stride,
                                int64_t k_stride, int64_t *digits) {
    signed_argmax<double>(P, k, m, y, p_stride, k_stride, digits);
}

}  // extern "C"
