// CUDA kernels of candle-lisa, compiled to PTX by build.rs (feature `cuda`) and loaded through
// candle's CUDA device (`CudaDevice::get_or_load_custom_func`).
//
// The AdamW kernels follow the CPU kernel in src/optim/adamw.rs operation for operation, with
// the `_rn` intrinsics so that nvcc never contracts a multiply and an add into an FMA: each
// element gets the same bits as on the CPU. `x * a + 0` is kept as written (it turns -0 into
// +0, as candle's affine op does).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

struct F32Ops {
    typedef float T;
    static __device__ __forceinline__ T mul(T a, T b) { return __fmul_rn(a, b); }
    static __device__ __forceinline__ T add(T a, T b) { return __fadd_rn(a, b); }
    static __device__ __forceinline__ T sub(T a, T b) { return __fsub_rn(a, b); }
    static __device__ __forceinline__ T div(T a, T b) { return __fdiv_rn(a, b); }
    static __device__ __forceinline__ T sqrt(T a) { return __fsqrt_rn(a); }
};

struct F64Ops {
    typedef double T;
    static __device__ __forceinline__ T mul(T a, T b) { return __dmul_rn(a, b); }
    static __device__ __forceinline__ T add(T a, T b) { return __dadd_rn(a, b); }
    static __device__ __forceinline__ T sub(T a, T b) { return __dsub_rn(a, b); }
    static __device__ __forceinline__ T div(T a, T b) { return __ddiv_rn(a, b); }
    static __device__ __forceinline__ T sqrt(T a) { return __dsqrt_rn(a); }
};

// One element of update number t: writes m and v, returns the new weight. The constants are
// those of `Consts` in adamw.rs (bias corrections folded into sm and sv, decay = 1 - lr * wd).
template <typename O>
__device__ __forceinline__ typename O::T adamw_step(
    typename O::T theta, typename O::T g, typename O::T *m, typename O::T *v,
    typename O::T b1, typename O::T omb1, typename O::T b2, typename O::T omb2,
    typename O::T sm, typename O::T sv, typename O::T eps, typename O::T decay,
    typename O::T lr, typename O::T inv_scale) {
    typedef typename O::T T;
    const T zero = 0;
    g = O::mul(g, inv_scale);
    T next_m = O::add(O::add(O::mul(*m, b1), zero), O::add(O::mul(g, omb1), zero));
    T next_v = O::add(O::add(O::mul(*v, b2), zero), O::add(O::mul(O::mul(g, g), omb2), zero));
    T denom = O::add(O::mul(O::sqrt(O::add(O::mul(next_v, sv), zero)), (T)1), eps);
    T adjusted = O::div(O::add(O::mul(next_m, sm), zero), denom);
    *m = next_m;
    *v = next_v;
    return O::sub(O::add(O::mul(theta, decay), zero), O::add(O::mul(adjusted, lr), zero));
}

#define ADAMW_FULL(NAME, OPS)                                                                 \
    extern "C" __global__ void NAME(OPS::T *theta, const OPS::T *g, OPS::T *m, OPS::T *v,     \
                                    const size_t n, OPS::T b1, OPS::T omb1, OPS::T b2,          \
                                    OPS::T omb2, OPS::T sm, OPS::T sv, OPS::T eps,              \
                                    OPS::T decay, OPS::T lr, OPS::T inv_scale) {                \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;                   \
             i += (size_t)blockDim.x * gridDim.x) {                                             \
            OPS::T mi = m[i], vi = v[i];                                                        \
            theta[i] = adamw_step<OPS>(theta[i], g[i], &mi, &vi, b1, omb1, b2, omb2, sm, sv,    \
                                       eps, decay, lr, inv_scale);                              \
            m[i] = mi;                                                                          \
            v[i] = vi;                                                                          \
        }                                                                                       \
    }

ADAMW_FULL(lisa_adamw_f32, F32Ops)
ADAMW_FULL(lisa_adamw_f64, F64Ops)

// Half-precision parameters: the f32 update runs on the master copy, the gradient is widened
// exactly, and the parameter receives the new master value rounded to nearest-even.
#define ADAMW_HALF(NAME, H, TO_F32, FROM_F32)                                                 \
    extern "C" __global__ void NAME(H *theta, const H *g, float *master, float *m, float *v,  \
                                    const size_t n, float b1, float omb1, float b2,             \
                                    float omb2, float sm, float sv, float eps, float decay,     \
                                    float lr, float inv_scale) {                                \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;                   \
             i += (size_t)blockDim.x * gridDim.x) {                                             \
            float mi = m[i], vi = v[i];                                                         \
            float w = adamw_step<F32Ops>(master[i], TO_F32(g[i]), &mi, &vi, b1, omb1, b2, omb2, \
                                         sm, sv, eps, decay, lr, inv_scale);                    \
            master[i] = w;                                                                      \
            m[i] = mi;                                                                          \
            v[i] = vi;                                                                          \
            theta[i] = FROM_F32(w);                                                             \
        }                                                                                       \
    }

ADAMW_HALF(lisa_adamw_bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
ADAMW_HALF(lisa_adamw_f16, __half, __half2float, __float2half_rn)

// Sum of squares, one partial sum per block (summed on the host in block order, so the result
// does not depend on scheduling). Squares are summed in f64: no finite input overflows, so the
// sum is non-finite exactly when an element is NaN or infinite. blockDim.x must be 256.
template <typename T, typename F>
__device__ __forceinline__ void sum_squares(const T *x, const size_t n, double *partial, F widen) {
    __shared__ double lanes[256];
    double acc = 0.0;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)blockDim.x * gridDim.x) {
        double e = widen(x[i]);
        acc += e * e;
    }
    lanes[threadIdx.x] = acc;
    __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) lanes[threadIdx.x] += lanes[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = lanes[0];
}

extern "C" __global__ void lisa_sum_squares_f32(const float *x, const size_t n, double *partial) {
    sum_squares(x, n, partial, [](float e) { return (double)e; });
}
extern "C" __global__ void lisa_sum_squares_f64(const double *x, const size_t n, double *partial) {
    sum_squares(x, n, partial, [](double e) { return e; });
}
extern "C" __global__ void lisa_sum_squares_bf16(const __nv_bfloat16 *x, const size_t n,
                                                 double *partial) {
    sum_squares(x, n, partial, [](__nv_bfloat16 e) { return (double)__bfloat162float(e); });
}
extern "C" __global__ void lisa_sum_squares_f16(const __half *x, const size_t n, double *partial) {
    sum_squares(x, n, partial, [](__half e) { return (double)__half2float(e); });
}
