/* Fused copy + digest for the shm mover (included by native/shmatomics.c; shared place for other modules).
 *
 * A READ or WRITE record flagged OP_DIGEST is copied in strides of DIGEST_STRIDE bytes; each stride is hashed
 * (xxh3-128, streaming) right after it is copied, while it is still in L1/L2, from the *local* side: the bytes
 * that landed (READ) or the bytes that were sent (WRITE). A separate hashing pass would read the payload from
 * DRAM a second time. The digest is stored in the record's compare/swap words as the 16 canonical (big-endian)
 * bytes that `xxhash.xxh3_128_digest` returns, so Python compares it with a stored checksum directly.
 *
 * xxhash.h is vendored (xxHash 0.8.1, BSD-2-Clause, Yann Collet). The kernel is the best this CPU runs
 * (native/xxhash/kernels.h: AVX-512, AVX2). An x86 CPU without AVX2 gets no transport digests
 * (`digest_available`): the module says DIGEST = False and the transport leaves hashing to the caller
 * (Completion.digest is None), whose xxhash package is as fast as the baseline kernel.
 */
#include <sched.h>
#include "kernels.h" /* native/xxhash/kernels.h */

#define DIGEST_STRIDE (16u * 1024u)

static void copy_digest(void *dst, const void *src, size_t n, int hash_dst, unsigned char out[16]) {
    XXH_ALIGN(64) XXH3_state_t st;
    XXH3_128bits_reset(&st);
    for (size_t off = 0; off < n; off += DIGEST_STRIDE) {
        size_t k = n - off < DIGEST_STRIDE ? n - off : DIGEST_STRIDE;
        memcpy((char *)dst + off, (const char *)src + off, k);
        XXH.update(&st, (const char *)(hash_dst ? dst : src) + off, k);
    }
    xxh3_canonical(XXH.digest(&st), out);
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
            XXH.update(&st, p + done, avail - done);
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
    xxh3_canonical(XXH.digest(&st), out);
}

static void digest_only(const void *p, size_t n, unsigned char out[16]) { xxh3_canonical(XXH.oneshot(p, n), out); }

/* Whether transports should digest on this CPU (after `xxh3_pick`). */
static int digest_available(void) { return XXH.vector; }
