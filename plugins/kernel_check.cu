// C entry points over the HSTUAttention kernel, for checking it against the PyTorch reference
// without TensorRT (plugins/check_kernel.py loads this with ctypes and passes device pointers).
#include "hstu_attention_kernel.cuh"

namespace
{
template <typename T>
int run(void const* q, void const* k, void const* v, void const* lengths, void const* numCandidates,
    void const* timestamps, void const* posW, void const* tsW, void* out, int batch, int n, int heads, int dimQk,
    int dimV, int posBuckets, int timeBuckets, float alpha, float norm, int causal)
{
    grc_plugins::HstuParams const p{n, heads, dimQk, dimV, posBuckets, timeBuckets, alpha, norm, causal};
    cudaError_t err = grc_plugins::launchHstuAttention<T, int64_t>(static_cast<T const*>(q), static_cast<T const*>(k),
        static_cast<T const*>(v), static_cast<int64_t const*>(lengths), static_cast<int64_t const*>(numCandidates),
        static_cast<int64_t const*>(timestamps), static_cast<T const*>(posW), static_cast<T const*>(tsW),
        static_cast<T*>(out), batch, p, nullptr);
    if (err == cudaSuccess)
        err = cudaDeviceSynchronize();
    return static_cast<int>(err);
}
} // namespace

#define GRC_CHECK_ENTRY(NAME, T)                                                                                       \
    extern "C" int NAME(void const* q, void const* k, void const* v, void const* lengths, void const* numCandidates,  \
        void const* timestamps, void const* posW, void const* tsW, void* out, int batch, int n, int heads, int dimQk,  \
        int dimV, int posBuckets, int timeBuckets, float alpha, float norm, int causal)                                \
    {                                                                                                                  \
        return run<T>(q, k, v, lengths, numCandidates, timestamps, posW, tsW, out, batch, n, heads, dimQk, dimV,      \
            posBuckets, timeBuckets, alpha, norm, causal);                                                             \
    }

GRC_CHECK_ENTRY(grc_hstu_attention_f32, float)
GRC_CHECK_ENTRY(grc_hstu_attention_f16, __half)
GRC_CHECK_ENTRY(grc_hstu_attention_bf16, __nv_bfloat16)
