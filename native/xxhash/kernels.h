/* The fastest xxh3-128 kernel this CPU runs, picked once at module init (`xxh3_pick`).
 *
 * Every payload checksum of the native paths goes through `XXH`: the hash pool's workers, the shm Mover's
 * fused copy + digest and the tcp engine's READ digests. Before, the pool compiled xxhash for the baseline
 * (SSE2: one worker hashed a 1 MiB block at 9.4 GB/s on the H200 host, 19.9 with AVX-512) and the transports
 * for AVX2 only; on this VM the xxhash package, which dispatches at run time, hashed data in cache faster than
 * either. The kernels live in native/xxhash/xxh3_<isa>.c, one instruction set each;
 * the streaming state (XXH3_state_t) is the same struct for all of them. */
#ifndef RDMAPOOL_XXH3_KERNELS_H
#define RDMAPOOL_XXH3_KERNELS_H
#include <stdlib.h>
#include <string.h>
#define XXH_INLINE_ALL
#include "xxhash.h" /* native/xxhash/xxhash.h: types and the canonical form */

#define RP_DECLARE(isa)                                                                                       \
    XXH128_hash_t rp_xxh3_128_##isa(const void *p, size_t n);                                                 \
    void rp_xxh3_128_update_##isa(XXH3_state_t *st, const void *p, size_t n);                                \
    XXH128_hash_t rp_xxh3_128_digest_##isa(const XXH3_state_t *st);
RP_DECLARE(base)
#if defined(__x86_64__) && defined(__GNUC__)
RP_DECLARE(avx2)
RP_DECLARE(avx512)
#endif

typedef struct {
    const char *isa; /* "avx512", "avx2" or "base" */
    int vector;      /* 1 where the CPU has AVX2 or better, or is not x86 (its own vector unit): worth digesting in
                        the transports (whatever RDMAPOOL_XXH3_KERNEL picked) */
    XXH128_hash_t (*oneshot)(const void *p, size_t n);
    void (*update)(XXH3_state_t *st, const void *p, size_t n);
    XXH128_hash_t (*digest)(const XXH3_state_t *st);
} xxh3_kernel;

static xxh3_kernel XXH = {"base", 0, rp_xxh3_128_base, rp_xxh3_128_update_base, rp_xxh3_128_digest_base};

/* RDMAPOOL_XXH3_KERNEL=avx2 or base caps the choice (to compare kernels, or to keep a CPU that slows its clock
 * under AVX-512 off it); a kernel the CPU lacks is never picked. -1 (and a Python ValueError) for any other
 * value: a module init calls this and fails loudly rather than guess. */
static int xxh3_pick(void) {
    const char *cap = getenv("RDMAPOOL_XXH3_KERNEL");
    int allow = !cap || !*cap || strcmp(cap, "avx512") == 0 ? 2 : strcmp(cap, "avx2") == 0 ? 1
              : strcmp(cap, "base") == 0 ? 0 : -1;
    if (allow < 0) {
        PyErr_Format(PyExc_ValueError, "RDMAPOOL_XXH3_KERNEL must be avx512, avx2 or base, not %.40s", cap);
        return -1;
    }
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (allow >= 2 && __builtin_cpu_supports("avx512f")) {
        XXH = (xxh3_kernel){"avx512", 1, rp_xxh3_128_avx512, rp_xxh3_128_update_avx512, rp_xxh3_128_digest_avx512};
    } else if (allow >= 1 && __builtin_cpu_supports("avx2")) {
        XXH = (xxh3_kernel){"avx2", 1, rp_xxh3_128_avx2, rp_xxh3_128_update_avx2, rp_xxh3_128_digest_avx2};
    }
    XXH.vector = __builtin_cpu_supports("avx2");
#else
    XXH.vector = 1;
#endif
    return 0;
}

/* The 16 canonical (big-endian) bytes `xxhash.xxh3_128_digest` returns. */
static inline void xxh3_canonical(XXH128_hash_t h, unsigned char out[16]) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, h);
    memcpy(out, c.digest, 16);
}
#endif
