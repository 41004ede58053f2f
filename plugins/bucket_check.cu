// Host program over the plugin kernel's time-gap and bucket functions (the same __host__ __device__
// code the kernel runs), so they are checked on a machine without a GPU: reads "a b numBuckets"
// lines (int64 timestamps) from stdin, prints "gap bucket" per line. tests/kernels/test_plugin_time_bucket.py
// builds it with nvcc and compares with the integer rule.
#include "hstu_attention_kernel.cuh"

#include <cstdio>

int main()
{
    long long a = 0, b = 0;
    int numBuckets = 0;
    while (std::scanf("%lld %lld %d", &a, &b, &numBuckets) == 3)
    {
        unsigned long long const gap = grc_plugins::absTimeGap(a, b);
        std::printf("%llu %d\n", gap, grc_plugins::timeBucket(gap, numBuckets));
    }
    return 0;
}
