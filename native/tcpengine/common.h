/* Includes, wire constants, small helpers, preemption-aware spinning (part of rdmapool._tcpengine: included by native/tcpengine.c, one translation unit) */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "RDMPTCP1"
#define REQ_HDR 48
#define RESP_HDR 24
#define MAX_SGE 16
#define MAX_OP_LEN (1ULL << 40)
#define IBUF_SIZE (64 * 1024)
#define OUT_IOV 256
#define OUT_ARENA 128
#define SEND_IOV 64
#define RECV_IOV 64
#define SMALL_READ (512 * 1024) /* READ responses smaller than this are gathered into one writev */
/* The most one send or blocking receive system call moves (see io_chunk in regions.h), measured on loopback */
#define IO_CHUNK (512 * 1024)             /* engine: READ responses sent */
#define IO_CHUNK_ENGINE_RECV (256 * 1024) /* engine: WRITE payloads received */
#define IO_CHUNK_INITIATOR_RECV (256 * 1024) /* initiator: large READ payloads received */
#define IO_CHUNK_INITIATOR_SEND (1024 * 1024) /* initiator: requests and WRITE payloads sent (non-blocking) */
#define BLOCKING_RECV_MIN (256 * 1024) /* payloads this large are awaited with MSG_WAITALL, not poll() */

enum { OP_READ = 1, OP_WRITE = 2, OP_CAS = 3, OP_FAA = 4 };
enum { ACC_LOCAL_WRITE = 1, ACC_REMOTE_WRITE = 2, ACC_REMOTE_READ = 4, ACC_REMOTE_ATOMIC = 8 };
enum {
    ST_SUCCESS = 0, ST_LOC_LEN = 1, ST_LOC_PROT = 4, ST_FLUSH = 5, ST_REM_INV_REQ = 9, ST_REM_ACCESS = 10,
    ST_REM_OP = 11, ST_RETRY_EXC = 12, ST_GENERAL = 21
};
enum { EP_READY = 0, EP_ERROR = 1, EP_CLOSED = 2 };

static PyObject *UsageError; /* set from Python: rdmapool.errors.UsageError */

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}
static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}
/* Preemption-aware busy-polling. Spinning wins on an idle host (no wake-up latency) and loses badly on an
 * oversubscribed one: a spinning thread that the scheduler has descheduled is not woken by arriving data, it
 * waits for its next time slice. A spinner that finds a gap of more than SPIN_GAP_NS between two of its own
 * iterations has been descheduled; it then blocks instead of spinning for its next SPIN_BACKOFF waits. */
#define SPIN_GAP_NS 30000ULL
#define SPIN_BACKOFF 256

typedef struct {
    uint64_t until, last;
    int backoff;
} spinner;

static inline void spin_start(spinner *sp, uint64_t now, int spin_us) {
    sp->last = now;
    if (sp->backoff > 0) { sp->backoff--; sp->until = 0; return; }
    sp->until = now + (uint64_t)spin_us * 1000ULL;
}

/* true while the caller should keep spinning */
static inline int spin_more(spinner *sp, uint64_t now) {
    if (now >= sp->until) return 0;
    if (now - sp->last > SPIN_GAP_NS) { sp->backoff = SPIN_BACKOFF; sp->until = 0; return 0; }
    sp->last = now;
    return 1;
}

static inline void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); } /* x86/arm64 little-endian hosts */
static inline uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
