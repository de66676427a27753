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

// The LM head's cross-entropy, one block per row of logits (blockDim.x = CE_THREADS): the
// row's loss weight * (logsumexp(x) - x[label]) into row_loss, and dL/dlogits =
// weight * inv_count * (softmax(x) - onehot(label)) written over the row in place. The row's
// maximum and sum of exponentials are reduced in a fixed order, so the result is
// deterministic. The logits are read in their dtype and the arithmetic is f32.
#define CE_THREADS 512

__device__ __forceinline__ void ce_combine(float &m, float &s, float om, float os) {
    float mx = fmaxf(m, om);
    float a = (m == -INFINITY) ? 0.0f : s * expf(m - mx);
    float b = (om == -INFINITY) ? 0.0f : os * expf(om - mx);
    m = mx;
    s = a + b;
}

template <typename T, typename Load, typename Store>
__device__ __forceinline__ void cross_entropy_row(T *x, const size_t v, const uint32_t *labels,
                                                  const float *weights, const float inv_count,
                                                  float *row_loss, Load load, Store store) {
    __shared__ float ms[CE_THREADS / 32], ss[CE_THREADS / 32];
    __shared__ float lse_shared;
    const size_t row = blockIdx.x;
    T *xr = x + row * v;
    float m = -INFINITY, s = 0.0f;
    for (size_t j = threadIdx.x; j < v; j += blockDim.x) {
        float e = load(xr[j]);
        if (e > m) {
            s = (m == -INFINITY ? 0.0f : s * expf(m - e)) + 1.0f;
            m = e;
        } else {
            s += expf(e - m);
        }
    }
    for (int offset = 16; offset > 0; offset >>= 1) {
        float om = __shfl_down_sync(0xffffffffu, m, offset);
        float os = __shfl_down_sync(0xffffffffu, s, offset);
        ce_combine(m, s, om, os);
    }
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        ms[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float bm = ms[0], bs = ss[0];
        for (unsigned w = 1; w < blockDim.x / 32; w++) ce_combine(bm, bs, ms[w], ss[w]);
        float lse = bm + logf(bs);
        lse_shared = lse;
        const uint32_t label = labels[row];
        row_loss[row] = weights[row] * (lse - load(xr[label]));
    }
    __syncthreads();
    const float lse = lse_shared;
    const uint32_t label = labels[row];
    const float c = weights[row] * inv_count;
    for (size_t j = threadIdx.x; j < v; j += blockDim.x) {
        float p = expf(load(xr[j]) - lse);
        xr[j] = store((p - (j == label ? 1.0f : 0.0f)) * c);
    }
}

extern "C" __global__ void lisa_cross_entropy_f32(float *x, const size_t v, const uint32_t *labels,
                                                  const float *weights, const float inv_count,
                                                  float *row_loss) {
    cross_entropy_row(x, v, labels, weights, inv_count, row_loss, [](float e) { return e; },
                      [](float e) { return e; });
}
extern "C" __global__ void lisa_cross_entropy_bf16(__nv_bfloat16 *x, const size_t v,
                                                   const uint32_t *labels, const float *weights,
                                                   const float inv_count, float *row_loss) {
    cross_entropy_row(x, v, labels, weights, inv_count, row_loss,
                      [](__nv_bfloat16 e) { return __bfloat162float(e); },
                      [](float e) { return __float2bfloat16_rn(e); });
}
extern "C" __global__ void lisa_cross_entropy_f16(__half *x, const size_t v, const uint32_t *labels,
                                                  const float *weights, const float inv_count,
                                                  float *row_loss) {
    cross_entropy_row(x, v, labels, weights, inv_count, row_loss,
                      [](__half e) { return __half2float(e); },
                      [](float e) { return __float2half_rn(e); });
}

// SwiGLU, elementwise in f32: y = silu(g) * u; backward dg = dy * u * silu'(g),
// du = dy * silu(g), with silu'(x) = s(x) * (1 + x - silu(x)) for the sigmoid s (the formula of
// the CPU kernel and of the tensor-op path in src/nn/ops.rs).
__device__ __forceinline__ float lisa_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

#define SWIGLU(SUFFIX, T, LOAD, STORE)                                                          \
    extern "C" __global__ void lisa_swiglu_fwd_##SUFFIX(const T *g, const T *u, T *y,          \
                                                        const size_t n) {                       \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;                   \
             i += (size_t)blockDim.x * gridDim.x) {                                             \
            float x = LOAD(g[i]);                                                               \
            y[i] = STORE(x * lisa_sigmoid(x) * LOAD(u[i]));                                     \
        }                                                                                       \
    }                                                                                           \
    extern "C" __global__ void lisa_swiglu_bwd_##SUFFIX(const T *g, const T *u, const T *dy,   \
                                                        T *dg, T *du, const size_t n) {         \
        for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;                   \
             i += (size_t)blockDim.x * gridDim.x) {                                             \
            float x = LOAD(g[i]), s = lisa_sigmoid(x), silu = x * s, d = LOAD(dy[i]);           \
            du[i] = STORE(d * silu);                                                            \
            dg[i] = STORE(d * LOAD(u[i]) * s * (1.0f + x - silu));                              \
        }                                                                                       \
    }

#define LOAD_F32(e) (e)
#define STORE_F32(e) (e)
SWIGLU(f32, float, LOAD_F32, STORE_F32)
SWIGLU(bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
SWIGLU(f16, __half, __half2float, __float2half_rn)

// RMSNorm over rows of h values, one block per row (blockDim.x = RMS_THREADS), f32 inside:
// forward y = x * r * w with r = 1 / sqrt(mean(x^2) + eps); backward, with n = x * r and
// gw = dy * w: dx = (gw - n * mean(gw * n)) * r, and, when gn is not null, dy * n per element
// into gn (f32, summed over rows afterwards for dw). Sums run in a fixed order.
#define RMS_THREADS 256

__device__ __forceinline__ float block_sum(float v, float *lanes) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) lanes[warp] = v;
    __syncthreads();
    float total = 0.0f;
    for (unsigned w = 0; w < blockDim.x / 32; w++) total += lanes[w];
    return total;
}

#define RMS_NORM(SUFFIX, T, LOAD, STORE)                                                        \
    extern "C" __global__ void lisa_rms_norm_fwd_##SUFFIX(const T *x, const T *w, T *y,        \
                                                          const size_t h, const float eps) {    \
        __shared__ float lanes[RMS_THREADS / 32];                                               \
        const T *xr = x + blockIdx.x * h;                                                       \
        T *yr = y + blockIdx.x * h;                                                             \
        float acc = 0.0f;                                                                       \
        for (size_t j = threadIdx.x; j < h; j += blockDim.x) {                                  \
            float e = LOAD(xr[j]);                                                              \
            acc += e * e;                                                                       \
        }                                                                                       \
        const float r = rsqrtf(block_sum(acc, lanes) / (float)h + eps);                         \
        for (size_t j = threadIdx.x; j < h; j += blockDim.x)                                    \
            yr[j] = STORE(LOAD(xr[j]) * r * LOAD(w[j]));                                        \
    }                                                                                           \
    extern "C" __global__ void lisa_rms_norm_bwd_##SUFFIX(const T *x, const T *w, const T *dy, \
                                                          T *dx, float *gn, const size_t h,     \
                                                          const float eps) {                    \
        __shared__ float lanes[RMS_THREADS / 32];                                               \
        const size_t row = blockIdx.x;                                                          \
        const T *xr = x + row * h, *dyr = dy + row * h;                                         \
        float sq = 0.0f;                                                                        \
        for (size_t j = threadIdx.x; j < h; j += blockDim.x) {                                  \
            float e = LOAD(xr[j]);                                                              \
            sq += e * e;                                                                        \
        }                                                                                       \
        const float r = rsqrtf(block_sum(sq, lanes) / (float)h + eps);                          \
        float dot = 0.0f;                                                                       \
        for (size_t j = threadIdx.x; j < h; j += blockDim.x)                                    \
            dot += LOAD(dyr[j]) * LOAD(w[j]) * LOAD(xr[j]) * r;                                 \
        const float mean_dot = block_sum(dot, lanes) / (float)h;                                \
        for (size_t j = threadIdx.x; j < h; j += blockDim.x) {                                  \
            float n = LOAD(xr[j]) * r, d = LOAD(dyr[j]);                                        \
            dx[row * h + j] = STORE((d * LOAD(w[j]) - n * mean_dot) * r);                       \
            if (gn) gn[row * h + j] = d * n;                                                    \
        }                                                                                       \
    }

RMS_NORM(f32, float, LOAD_F32, STORE_F32)
RMS_NORM(bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
RMS_NORM(f16, __half, __half2float, __float2half_rn)

// Attention's softmax over rows of t scores, one block per row (blockDim.x = SOFTMAX_THREADS),
// f32 inside. The rows are the grouped scores (b, kv, n * t, t): row r is query position
// r % t, whose additive mask row is mask[(r % t) * t ..]. Forward, in place over the raw
// products: p = softmax(x * scale + mask). Backward, in place over dp: ds = scale * p *
// (dp - sum(p * dp)). Sums run in a fixed order.
#define SOFTMAX_THREADS 256

__device__ __forceinline__ float block_max(float v, float *lanes) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_down_sync(0xffffffffu, v, offset));
    const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads();
    if (lane == 0) lanes[warp] = v;
    __syncthreads();
    float m = -INFINITY;
    for (unsigned w = 0; w < blockDim.x / 32; w++) m = fmaxf(m, lanes[w]);
    return m;
}

#define ATTN_SOFTMAX(SUFFIX, T, LOAD, STORE)                                                    \
    extern "C" __global__ void lisa_attn_softmax_##SUFFIX(T *x, const T *mask, const size_t t,  \
                                                          const float scale) {                  \
        __shared__ float lanes[SOFTMAX_THREADS / 32];                                           \
        const size_t row = blockIdx.x;                                                          \
        T *xr = x + row * t;                                                                    \
        const T *mr = mask + (row % t) * t;                                                     \
        float m = -INFINITY;                                                                    \
        for (size_t j = threadIdx.x; j < t; j += blockDim.x)                                    \
            m = fmaxf(m, LOAD(xr[j]) * scale + LOAD(mr[j]));                                    \
        m = block_max(m, lanes);                                                                \
        float s = 0.0f;                                                                         \
        for (size_t j = threadIdx.x; j < t; j += blockDim.x) {                                  \
            float e = LOAD(xr[j]) * scale + LOAD(mr[j]);                                        \
            s += (e == -INFINITY) ? 0.0f : expf(e - m);                                         \
        }                                                                                       \
        const float inv = 1.0f / block_sum(s, lanes);                                           \
        for (size_t j = threadIdx.x; j < t; j += blockDim.x) {                                  \
            float e = LOAD(xr[j]) * scale + LOAD(mr[j]);                                        \
            xr[j] = STORE((e == -INFINITY) ? 0.0f : expf(e - m) * inv);                         \
        }                                                                                       \
    }                                                                                           \
    extern "C" __global__ void lisa_attn_softmax_bwd_##SUFFIX(const T *p, T *dp, const size_t t, \
                                                              const float scale) {              \
        __shared__ float lanes[SOFTMAX_THREADS / 32];                                           \
        const size_t row = blockIdx.x;                                                          \
        const T *pr = p + row * t;                                                              \
        T *dr = dp + row * t;                                                                   \
        float dot = 0.0f;                                                                       \
        for (size_t j = threadIdx.x; j < t; j += blockDim.x) dot += LOAD(pr[j]) * LOAD(dr[j]); \
        dot = block_sum(dot, lanes);                                                            \
        for (size_t j = threadIdx.x; j < t; j += blockDim.x)                                    \
            dr[j] = STORE(scale * LOAD(pr[j]) * (LOAD(dr[j]) - dot));                           \
    }

ATTN_SOFTMAX(f32, float, LOAD_F32, STORE_F32)
ATTN_SOFTMAX(bf16, __nv_bfloat16, __bfloat162float, __float2bfloat16_rn)
ATTN_SOFTMAX(f16, __half, __half2float, __float2half_rn)
