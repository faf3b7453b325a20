/* The xxh3-128 kernel for AVX2 CPUs (called only where __builtin_cpu_supports says so). */
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2")
#define XXH_VECTOR 2 /* XXH_AVX2 */
#define RP_ISA avx2
#include "kernel.h"
#endif
