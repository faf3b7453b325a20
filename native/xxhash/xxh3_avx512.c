/* The xxh3-128 kernel for AVX-512 CPUs (called only where __builtin_cpu_supports says so): ~20-35% faster
 * than AVX2 on data in cache, the same from DRAM (docs/decisions.md). */
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f")
#define XXH_VECTOR 3 /* XXH_AVX512 */
#define RP_ISA avx512
#include "kernel.h"
#endif
