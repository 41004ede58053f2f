// grc HSTUAttention: the CUDA kernel behind the TensorRT plugin, on the padded layout.
//
// Exactly the math of grc/model/attention.py (hstu_attention_padded), per user b, head h, query i:
//   L = lengths[b], n_ctx = L - num_candidates[b], p(i) = min(i, n_ctx)   (all candidates share a position)
//   allowed(i, j) = j < L and (i < n_ctx ? (causal ? j <= i : j < n_ctx) : (j < n_ctx or j == i))
//   s = alpha * <q_i, k_j> + pos_w[h, clamp(p(i) - p(j), -(P-1), P-1) + P-1] + ts_w[h, bucket(|t_i - t_j|)]
//   out_i = sum_j (allowed ? SiLU(s) / norm : 0) * v_j            (rows i >= L are zero)
//   bucket(dt) = min(floor(log2(1 + dt)), NB - 1), exact in integers (a count-leading-zeros, no float log),
//   dt = |t_i - t_j| exact (unsigned), saturated at INT64_MAX: timestamps further apart than int64 holds
//   (history at INT64_MIN, request at INT64_MAX) land in the last bucket instead of wrapping (any NB)
// Shapes: q, k [B, N, H, Dqk]; v, out [B, N, H, Dv]; lengths, num_candidates [B]; timestamps [B, N];
// pos_w [H, 2P-1]; ts_w [H, NB]. T is float, half or bfloat16 (math in float); I is int32 or int64.
//
// Simple over fast on purpose: one block per (query, head, user), keys in shared-memory tiles, one
// output feature per thread. It is the reference the plugin must match, not a tuned kernel.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>

// A named namespace: nvcc's generated stubs clash with the anonymous namespace inside NvInferRuntime.h.
namespace grc_plugins
{
constexpr int kKeyTile = 128;
constexpr int kMaxHeadDim = 1024;  // one output feature per thread, at most a full block

template <typename T>
__device__ __forceinline__ float toFloat(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float toFloat<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float toFloat<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T fromFloat(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half fromFloat<__half>(float v) { return __float2half(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 fromFloat<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// |a - b| of int64 timestamps, exact in unsigned arithmetic (signed subtraction could overflow),
// saturated at INT64_MAX: the rule of grc.model.attention.abs_time_gap. Host and device, so it is
// checked on a CPU too (plugins/bucket_check.cu).
__host__ __device__ __forceinline__ unsigned long long absTimeGap(long long a, long long b)
{
    unsigned long long const gap = a > b ? static_cast<unsigned long long>(a) - static_cast<unsigned long long>(b)
                                         : static_cast<unsigned long long>(b) - static_cast<unsigned long long>(a);
    unsigned long long const maxGap = 0x7fffffffffffffffULL;
    return gap < maxGap ? gap : maxGap;
}

// floor(log2(1 + gap)) clamped to numBuckets - 1: the index of the highest set bit of 1 + gap
// (gap <= INT64_MAX, so 1 + gap <= 2**63 fits and the bucket is at most 63).
__host__ __device__ __forceinline__ int timeBucket(unsigned long long gap, int numBuckets)
{
#ifdef __CUDA_ARCH__
    int const b = 63 - __clzll(static_cast<long long>(gap + 1));
#else
    int const b = 63 - __builtin_clzll(gap + 1);
#endif
    return b < numBuckets - 1 ? b : numBuckets - 1;
}

struct HstuParams
{
    int n;          // padded tokens per user (N of the layout, not the spec's max_seq_len)
    int heads;      // H
    int dimQk;      // Dqk
    int dimV;       // Dv
    int posBuckets; // P: pos_w has 2P-1 columns
    int timeBuckets;
    float alpha;
    float norm;     // the spec's max_seq_len: a constant, so no score depends on the batch
    int causal;
};

template <typename T, typename I>
__global__ void hstuAttentionPadded(T const* __restrict__ q, T const* __restrict__ k, T const* __restrict__ v,
    I const* __restrict__ lengths, I const* __restrict__ numCandidates, I const* __restrict__ timestamps,
    T const* __restrict__ posW, T const* __restrict__ tsW, T* __restrict__ out, HstuParams p)
{
    __shared__ float qRow[kMaxHeadDim];
    __shared__ float weights[kKeyTile];
    int const i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    long long len = static_cast<long long>(lengths[b]);
    len = len < p.n ? len : p.n;  // a malformed length must not read past the padded row
    long long const nCtx = len - static_cast<long long>(numCandidates[b]);
    size_t const rowQk = ((static_cast<size_t>(b) * p.n + i) * p.heads + h) * p.dimQk;
    size_t const rowV = ((static_cast<size_t>(b) * p.n + i) * p.heads + h) * p.dimV;
    if (i >= len)  // padding query: zeros, like the reference (every weight of the row is masked)
    {
        for (int d = tid; d < p.dimV; d += blockDim.x)
            out[rowV + d] = fromFloat<T>(0.f);
        return;
    }
    for (int d = tid; d < p.dimQk; d += blockDim.x)
        qRow[d] = toFloat(q[rowQk + d]);
    long long const posI = i < nCtx ? i : nCtx;
    long long const tI = static_cast<long long>(timestamps[static_cast<size_t>(b) * p.n + i]);
    bool const isCandidate = i >= nCtx;
    int const maxRel = p.posBuckets - 1;
    float acc = 0.f;
    __syncthreads();
    for (long long j0 = 0; j0 < len; j0 += kKeyTile)
    {
        for (int jj = tid; jj < kKeyTile; jj += blockDim.x)
        {
            long long const j = j0 + jj;
            bool allowed = j < len;
            if (allowed)
                allowed = isCandidate ? (j < nCtx || j == i) : (p.causal ? j <= i : j < nCtx);
            float w = 0.f;
            if (allowed)
            {
                T const* kRow = k + ((static_cast<size_t>(b) * p.n + j) * p.heads + h) * p.dimQk;
                float dot = 0.f;
                for (int d = 0; d < p.dimQk; ++d)
                    dot += qRow[d] * toFloat(kRow[d]);
                long long const posJ = j < nCtx ? j : nCtx;
                long long rel = posI - posJ;
                rel = rel < -maxRel ? -maxRel : (rel > maxRel ? maxRel : rel);
                long long const tJ = static_cast<long long>(timestamps[static_cast<size_t>(b) * p.n + j]);
                float const s = p.alpha * dot + toFloat(posW[h * (2 * p.posBuckets - 1) + rel + maxRel])
                    + toFloat(tsW[h * p.timeBuckets + timeBucket(absTimeGap(tI, tJ), p.timeBuckets)]);
                w = s / (1.f + expf(-s)) / p.norm;  // SiLU(s) / N, divided as the reference divides
            }
            weights[jj] = w;
        }
        __syncthreads();
        if (tid < p.dimV)
        {
            long long const jEnd = len - j0 < kKeyTile ? len - j0 : kKeyTile;
            for (int jj = 0; jj < jEnd; ++jj)
            {
                float const w = weights[jj];
                if (w != 0.f)
                    acc += w * toFloat(v[((static_cast<size_t>(b) * p.n + j0 + jj) * p.heads + h) * p.dimV + tid]);
            }
        }
        __syncthreads();
    }
    if (tid < p.dimV)
        out[rowV + tid] = fromFloat<T>(acc);
}

// Launch on `stream`; returns the launch error (cudaSuccess when queued). batch == 0 is a no-op.
template <typename T, typename I>
cudaError_t launchHstuAttention(T const* q, T const* k, T const* v, I const* lengths, I const* numCandidates,
    I const* timestamps, T const* posW, T const* tsW, T* out, int batch, HstuParams const& p, cudaStream_t stream)
{
    if (batch == 0 || p.n == 0)
        return cudaSuccess;
    if (p.dimV > kMaxHeadDim || p.dimQk > kMaxHeadDim || p.posBuckets < 1 || p.timeBuckets < 1)
        return cudaErrorInvalidValue;
    int const threads = ((p.dimV > 64 ? p.dimV : 64) + 31) / 32 * 32;
    dim3 const grid(p.n, p.heads, batch);
    hstuAttentionPadded<T, I><<<grid, threads, 0, stream>>>(q, k, v, lengths, numCandidates, timestamps, posW, tsW,
        out, p);
    return cudaGetLastError();
}
} // namespace grc_plugins
