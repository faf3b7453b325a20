/* One xxh3-128 kernel: included by native/xxhash/xxh3_<isa>.c, each compiled for one instruction set (its
 * target pragma and XXH_VECTOR come first), so one module carries several and picks the best the CPU runs
 * (native/xxhash/kernels.h). xxHash's own x86 dispatch (xxh_x86dispatch.c) is not vendored; this is the same idea, smaller. */
#define XXH_INLINE_ALL
#include "xxhash.h" /* native/xxhash/xxhash.h */

#define RP_PASTE(a, b) a##_##b
#define RP_NAME(a, b) RP_PASTE(a, b)
#define RP_HIDDEN __attribute__((visibility("hidden")))

RP_HIDDEN XXH128_hash_t RP_NAME(rp_xxh3_128, RP_ISA)(const void *p, size_t n) { return XXH3_128bits(p, n); }

RP_HIDDEN void RP_NAME(rp_xxh3_128_update, RP_ISA)(XXH3_state_t *st, const void *p, size_t n) {
    XXH3_128bits_update(st, p, n);
}

RP_HIDDEN XXH128_hash_t RP_NAME(rp_xxh3_128_digest, RP_ISA)(const XXH3_state_t *st) {
    return XXH3_128bits_digest(st);
}
