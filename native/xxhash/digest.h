/* Fused copy + digest for the shm mover (included by native/shmatomics.c; shared place for other modules).
 *
 * A READ or WRITE record flagged OP_DIGEST is copied in strides of DIGEST_STRIDE bytes; each stride is hashed
 * (xxh3-128, streaming) right after it is copied, while it is still in L1/L2, from the *local* side: the bytes
 * that landed (READ) or the bytes that were sent (WRITE). A separate hashing pass would read the payload from
 * DRAM a second time. The digest is stored in the record's compare/swap words as the 16 canonical (big-endian)
 * bytes that `xxhash.xxh3_128_digest` returns, so Python compares it with a stored checksum directly.
 *
 * xxhash.h is vendored (xxHash 0.8.1, BSD-2-Clause, Yann Collet). On x86-64 its AVX2 kernel is compiled in
 * with a target pragma and used only when the CPU has AVX2 (`digest_available`); otherwise the module says
 * DIGEST = False and the transport leaves hashing to the caller (Completion.digest is None).
 */
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2")
#define XXH_VECTOR 2 /* XXH_AVX2 */
#define RDMAPOOL_DIGEST_NEEDS_AVX2 1
#endif
#include <sched.h>
#define XXH_INLINE_ALL
#include "xxhash.h" /* native/xxhash/xxhash.h */

#define DIGEST_STRIDE (16u * 1024u)

static void copy_digest(void *dst, const void *src, size_t n, int hash_dst, unsigned char out[16]) {
    XXH_ALIGN(64) XXH3_state_t st;
    XXH3_128bits_reset(&st);
    for (size_t off = 0; off < n; off += DIGEST_STRIDE) {
        size_t k = n - off < DIGEST_STRIDE ? n - off : DIGEST_STRIDE;
        memcpy((char *)dst + off, (const char *)src + off, k);
        XXH3_128bits_update(&st, (const char *)(hash_dst ? dst : src) + off, k);
    }
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&st));
    memcpy(out, c.digest, 16);
}

/* Hash n bytes at p that another thread is still writing in order: only the first *progress bytes (an atomic
 * the writer publishes with release stores) are read, so a READ's digest covers exactly the bytes that landed.
 * Used by the shm Mover, whose waiting caller hashes while the Mover thread copies. */
static void digest_trailing(const unsigned char *p, size_t n, const size_t *progress, unsigned char out[16]) {
    XXH_ALIGN(64) XXH3_state_t st;
    XXH3_128bits_reset(&st);
    size_t done = 0;
    unsigned idle = 0;
    while (done < n) {
        size_t avail = __atomic_load_n(progress, __ATOMIC_ACQUIRE);
        if (avail > done) {
            XXH3_128bits_update(&st, p + done, avail - done);
            done = avail;
            idle = 0;
        } else if (++idle % 256 == 0) {
            sched_yield(); /* the writer may share this CPU (a busy machine): let it run */
        } else {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    }
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(&st));
    memcpy(out, c.digest, 16);
}

static void digest_only(const void *p, size_t n, unsigned char out[16]) {
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits(p, n));
    memcpy(out, c.digest, 16);
}

#ifdef RDMAPOOL_DIGEST_NEEDS_AVX2
#pragma GCC pop_options
static int digest_available(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}
#else
static int digest_available(void) { return 1; }
#endif
