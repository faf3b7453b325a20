/* rdmapool._tcpengine: the hot path of the `tcp` transport.
 *
 * Theory of operation
 * -------------------
 * Engine (one per TcpTransport): a region table and a server. The server is one accept thread plus one thread
 * per accepted connection. A connection thread parses request frames and executes them directly against the
 * registered regions: READ payloads go from region memory to the socket with sendmsg() iovecs pointing into the
 * region, WRITE payloads come from the socket into region memory with recv() aimed at the region, CAS/FAA are
 * __atomic operations on the region's 8 bytes. No Python code and no GIL are involved on this side.
 *
 * Small responses are gathered (iovecs + a small header arena) and flushed with one sendmsg() when the input
 * runs dry, so a batch of thousands of small READs costs a few syscalls, not thousands. Before any mutating
 * request (WRITE, CAS, FAA) the pending output is flushed, so a READ queued earlier on the same connection
 * never returns bytes written by a later request of that connection (in-order execution per endpoint).
 *
 * Region safety (why deregister cannot race into a use-after-free): every use of region memory by an engine
 * thread is bracketed by a pin: under the table mutex the thread looks the region up by rkey, checks bounds and
 * access flags and increments region->inflight; it decrements (under the same mutex) when it no longer touches
 * the bytes (after the recv, after the flush of the sendmsg that referenced them). deregister() removes the
 * region from the table under the mutex (no new pin can be taken from then on: later requests fail with
 * REM_ACCESS_ERR) and then waits on a condition variable until inflight drops to 0. A peer that stalls while
 * a pin is held (a half-sent WRITE payload, a reader that stops reading) cannot hold deregister forever: after
 * a grace period deregister shuts down the sockets of the connections that hold pins on the region, which
 * makes their blocked syscalls return, and they unpin. Only when inflight is 0 does deregister return and the
 * Python side release the buffer. If even that times out, deregister reports "busy" and Python keeps the
 * buffer alive (leaks it) rather than free memory a thread may still touch. Client endpoints pin their local
 * SGE regions (by lkey) from post to completion in the same way.
 *
 * Endpoint (client side, one TCP connection = one queue pair): post() frames the requests into a ring and
 * pushes as much as the socket takes without blocking (sendmsg with iovecs: frame headers plus, for WRITE,
 * the local SGEs themselves). Progress (send the rest, receive responses) is driven by poll()/wait() in the
 * caller's thread with the GIL released: responses are received with recvmsg() whose iovecs chain
 * [header, payload SGEs, next header, ...] so READ payloads land straight in the local buffers. wait()
 * busy-polls for spin_us before blocking in poll(2). Responses come back in request order (one connection,
 * executed in order), so completions are delivered in posting order.
 *
 * Wire format (little-endian, see docs/transport.md): hello "RDMPTCP1" both ways; request = 48-byte header
 * {u8 op, u8 flags(bit0 signaled), u16 0, u32 rkey, u64 tag, u64 addr, u64 len, u64 compare, u64 swap}
 * + len payload bytes for WRITE; response = 24-byte header {u8 status, u8 op, u16 0, u32 0, u64 tag, u64 len}
 * + len payload bytes (READ data or the 8-byte old value of an atomic). Unsignalled WRITEs get no response
 * unless they fail. After an error response the server executes nothing more on that connection (it drains
 * and discards input until the peer closes), as a responder QP in error does.
 */
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
#define SMALL_READ (64 * 1024)
#define BLOCKING_RECV_MIN (64 * 1024) /* payloads this large are awaited with MSG_WAITALL, not poll() */

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

/* ------------------------------------------------------------------ region table */

typedef struct region {
    uint32_t rkey, lkey;
    uint64_t base, len;
    int access;
    int dead;
    long inflight;
    Py_buffer view; /* held while registered (view.obj NULL for raw pointers) */
} region;

#define MAX_PINS 160

struct sconn;
typedef struct engine {
    pthread_mutex_t lock; /* region table, pins, connection list */
    pthread_cond_t cond;  /* signalled when a dead region's inflight drops to 0 or a conn thread exits */
    region **regions;
    int nregions, capregions;
    int listen_fd;
    int port;
    int spin_us;
    int closing, closed;
    int nthreads; /* live connection threads */
    int accept_running;
    pthread_t accept_thread;
    struct sconn *conns;
    /* background progress of this process's client endpoints (progress_main) */
    pthread_mutex_t eplock;
    pthread_cond_t epcond;
    void **eps;
    int neps, capeps;
    int progress_running, progress_stop;
    pthread_t progress_thread;
    pid_t pid; /* the creating process: a forked child has none of the threads and must not touch them */
} engine;

typedef struct sconn {
    engine *eng;
    int fd;
    struct sconn *next, *prev;
    region *pins[MAX_PINS];
    int npins;
    uint8_t *ibuf;
    size_t ipos, ilen;
    struct iovec out[OUT_IOV];
    int nout;
    uint8_t arena[OUT_ARENA][RESP_HDR + 8];
    int narena;
    spinner spin;
} sconn;

/* caller holds eng->lock */
static region *find_rkey(engine *e, uint32_t rkey) {
    for (int i = 0; i < e->nregions; i++)
        if (e->regions[i]->rkey == rkey) return e->regions[i];
    return NULL;
}
static region *find_lkey(engine *e, uint32_t lkey) {
    for (int i = 0; i < e->nregions; i++)
        if (e->regions[i]->lkey == lkey) return e->regions[i];
    return NULL;
}

static inline int in_bounds(const region *r, uint64_t addr, uint64_t len) {
    return addr >= r->base && len <= r->len && addr - r->base <= r->len - len;
}

/* Pin a region for [addr, addr+len) with `need` access; returns NULL and *status on failure. */
static region *pin_remote(engine *e, uint32_t rkey, uint64_t addr, uint64_t len, int need, int *status,
                          region **pins, int *npins) {
    pthread_mutex_lock(&e->lock);
    region *r = find_rkey(e, rkey);
    if (!r || !in_bounds(r, addr, len) || (r->access & need) != need) {
        pthread_mutex_unlock(&e->lock);
        *status = ST_REM_ACCESS;
        return NULL;
    }
    r->inflight++;
    if (pins) pins[(*npins)++] = r;
    pthread_mutex_unlock(&e->lock);
    return r;
}

static void unpin_locked(engine *e, region *r) {
    if (--r->inflight == 0 && r->dead) pthread_cond_broadcast(&e->cond);
}

static void unpin_all(engine *e, region **pins, int *npins) {
    if (!*npins) return;
    pthread_mutex_lock(&e->lock);
    for (int i = 0; i < *npins; i++) unpin_locked(e, pins[i]);
    *npins = 0;
    pthread_mutex_unlock(&e->lock);
}

/* ------------------------------------------------------------------ socket helpers */

/* Socket buffers. On loopback, 1 MiB buffers beat both 4 MiB and the kernel's autotuning (1 MiB READs, same
 * minute, 8 MiB in flight: 1.95-2.25 GB/s vs 1.05-1.25 and 1.2-1.6; see docs/decisions.md): the bytes in flight
 * stay in cache between the sender's copy-in and the receiver's copy-out. Elsewhere the kernel's autotuning knows
 * the path better. RDMAPOOL_TCP_SOCKBUF=<bytes> overrides both (0 = autotuning). */
#define LOOPBACK_SOCKBUF (1 << 20)

static int sockbuf_override(void) {
    static int cached = -2;
    if (cached == -2) {
        const char *v = getenv("RDMAPOOL_TCP_SOCKBUF");
        cached = v ? atoi(v) : -1;
        if (v && cached < 0) cached = 0;
    }
    return cached;
}

static int peer_is_loopback(int fd) {
    struct sockaddr_in sa;
    socklen_t sl = sizeof sa;
    if (getpeername(fd, (struct sockaddr *)&sa, &sl) != 0 || sa.sin_family != AF_INET) return 0;
    return (ntohl(sa.sin_addr.s_addr) >> 24) == 127;
}

/* call once connected */
static void tune_socket(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int buf = sockbuf_override();
    if (buf < 0) buf = peer_is_loopback(fd) ? LOOPBACK_SOCKBUF : 0;
    if (buf > 0) {
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof buf);
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof buf);
    }
}

static int send_all_iov(int fd, struct iovec *iov, int n) {
    while (n > 0) {
        struct msghdr m = {0};
        m.msg_iov = iov;
        m.msg_iovlen = n > 1024 ? 1024 : n;
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        while (n > 0 && (size_t)w >= iov->iov_len) { w -= iov->iov_len; iov++; n--; }
        if (n > 0) { iov->iov_base = (char *)iov->iov_base + w; iov->iov_len -= w; }
    }
    return 0;
}

static int recv_exact(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len) {
        ssize_t r = recv(fd, p, len, MSG_WAITALL);
        if (r == 0) return -1;
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += r; len -= r;
    }
    return 0;
}

/* ------------------------------------------------------------------ server side */

static int srv_flush(sconn *c) {
    int rc = 0;
    if (c->nout) rc = send_all_iov(c->fd, c->out, c->nout);
    c->nout = 0;
    c->narena = 0;
    unpin_all(c->eng, c->pins, &c->npins);
    return rc;
}

/* Make at least `need` bytes available in ibuf (need <= IBUF_SIZE). Flushes output before blocking and
 * busy-polls for spin_us first. Returns -1 when the peer is gone or the engine closes. */
static int srv_fill(sconn *c, size_t need) {
    if (c->ilen - c->ipos >= need) return 0;
    if (c->ipos) {
        memmove(c->ibuf, c->ibuf + c->ipos, c->ilen - c->ipos);
        c->ilen -= c->ipos;
        c->ipos = 0;
    }
    int spinning = 0;
    while (c->ilen < need) {
        ssize_t r = recv(c->fd, c->ibuf + c->ilen, IBUF_SIZE - c->ilen, MSG_DONTWAIT);
        if (r > 0) { c->ilen += r; continue; }
        if (r == 0) return -1;
        if (errno == EINTR) continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK) return -1;
        if (c->nout && srv_flush(c) < 0) return -1;
        uint64_t t = now_ns();
        if (!spinning) { spin_start(&c->spin, t, c->eng->spin_us); spinning = 1; }
        if (spin_more(&c->spin, t)) { sched_yield(); continue; }
        struct pollfd p = {.fd = c->fd, .events = POLLIN};
        if (poll(&p, 1, -1) < 0 && errno != EINTR) return -1;
        spinning = 0;
    }
    return 0;
}

static void srv_queue(sconn *c, void *base, size_t len) {
    c->out[c->nout].iov_base = base;
    c->out[c->nout].iov_len = len;
    c->nout++;
}

static uint8_t *srv_resp(sconn *c, int status, int op, uint64_t tag, uint64_t len) {
    uint8_t *h = c->arena[c->narena++];
    memset(h, 0, RESP_HDR);
    h[0] = (uint8_t)status;
    h[1] = (uint8_t)op;
    put64(h + 8, tag);
    put64(h + 16, len);
    return h;
}

/* Error path: answer, then execute nothing more; drain until the peer closes. */
static void srv_fail(sconn *c, int status, int op, uint64_t tag) {
    if (c->nout && srv_flush(c) < 0) return;
    uint8_t *h = srv_resp(c, status, op, tag, 0);
    srv_queue(c, h, RESP_HDR);
    if (srv_flush(c) < 0) return;
    char sink[4096];
    for (;;) {
        ssize_t r = recv(c->fd, sink, sizeof sink, 0);
        if (r == 0 || (r < 0 && errno != EINTR)) return;
    }
}

/* Serve one connection until it closes or breaks; never touches Python. */
static void serve(sconn *c) {
    char hello[8];
    if (recv_exact(c->fd, hello, 8) < 0 || memcmp(hello, MAGIC, 8) != 0) return;
    if (send(c->fd, MAGIC, 8, MSG_NOSIGNAL) != 8) return;
    for (;;) {
        if (srv_fill(c, REQ_HDR) < 0) return;
        uint8_t *h = c->ibuf + c->ipos;
        int op = h[0], signaled = h[1] & 1;
        uint32_t rkey = get32(h + 4);
        uint64_t tag = get64(h + 8), addr = get64(h + 16), len = get64(h + 24);
        uint64_t cmp = get64(h + 32), swp = get64(h + 40);
        c->ipos += REQ_HDR;
        if (op < OP_READ || op > OP_FAA || len > MAX_OP_LEN) return; /* malformed: cannot resync, drop it */
        int status = ST_SUCCESS;
        if (op == OP_READ) {
            if (c->nout + 2 > OUT_IOV || c->narena + 1 > OUT_ARENA || c->npins + 1 > MAX_PINS)
                if (srv_flush(c) < 0) return;
            region *r = pin_remote(c->eng, rkey, addr, len, ACC_REMOTE_READ, &status, c->pins, &c->npins);
            if (!r) { srv_fail(c, status, op, tag); return; }
            srv_queue(c, srv_resp(c, ST_SUCCESS, op, tag, len), RESP_HDR);
            if (len) srv_queue(c, (void *)(uintptr_t)addr, len);
            if (len >= SMALL_READ && srv_flush(c) < 0) return;
            continue;
        }
        /* mutating request: everything queued earlier must leave first (in-order execution) */
        if (c->nout && srv_flush(c) < 0) return;
        if (op == OP_WRITE) {
            region *r = pin_remote(c->eng, rkey, addr, len, ACC_REMOTE_WRITE, &status, c->pins, &c->npins);
            if (!r) { srv_fail(c, status, op, tag); return; }
            uint8_t *dst = (uint8_t *)(uintptr_t)addr;
            size_t have = c->ilen - c->ipos;
            size_t take = have < len ? have : len;
            memcpy(dst, c->ibuf + c->ipos, take); /* bytes that arrived with the header (< 64 KiB) */
            c->ipos += take;
            if (len > take && recv_exact(c->fd, dst + take, len - take) < 0) { unpin_all(c->eng, c->pins, &c->npins); return; }
            unpin_all(c->eng, c->pins, &c->npins);
            if (signaled) srv_queue(c, srv_resp(c, ST_SUCCESS, op, tag, 0), RESP_HDR);
            continue;
        }
        /* CAS / FAA */
        if (len != 8) return;
        if (addr % 8) { srv_fail(c, ST_REM_INV_REQ, op, tag); return; }
        region *r = pin_remote(c->eng, rkey, addr, 8, ACC_REMOTE_ATOMIC, &status, c->pins, &c->npins);
        if (!r) { srv_fail(c, status, op, tag); return; }
        uint64_t *p = (uint64_t *)(uintptr_t)addr, old;
        if (op == OP_CAS) {
            old = cmp;
            __atomic_compare_exchange_n(p, &old, swp, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
        } else {
            old = __atomic_fetch_add(p, cmp, __ATOMIC_SEQ_CST);
        }
        unpin_all(c->eng, c->pins, &c->npins);
        uint8_t *rh = srv_resp(c, ST_SUCCESS, op, tag, 8);
        put64(rh + RESP_HDR, old);
        srv_queue(c, rh, RESP_HDR + 8);
    }
}

static void *conn_main(void *arg) {
    sconn *c = arg;
    engine *e = c->eng;
    serve(c);
    srv_flush(c);
    unpin_all(e, c->pins, &c->npins);
    pthread_mutex_lock(&e->lock);
    if (c->prev) c->prev->next = c->next; else e->conns = c->next;
    if (c->next) c->next->prev = c->prev;
    close(c->fd);
    e->nthreads--;
    pthread_cond_broadcast(&e->cond);
    pthread_mutex_unlock(&e->lock);
    free(c->ibuf);
    free(c);
    return NULL;
}

static void *accept_main(void *arg) {
    engine *e = arg;
    for (;;) {
        int fd = accept4(e->listen_fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (e->closing) return NULL;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) { usleep(10000); continue; }
            return NULL;
        }
        tune_socket(fd);
        /* a client host that vanishes without a RST must not pin a thread (and its regions) forever */
        int one = 1, idle = 10, intvl = 2, cnt = 3;
        unsigned int uto = 30000;
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &uto, sizeof uto);
        sconn *c = calloc(1, sizeof *c);
        uint8_t *ibuf = malloc(IBUF_SIZE);
        if (!c || !ibuf) { free(c); free(ibuf); close(fd); continue; }
        c->eng = e; c->fd = fd; c->ibuf = ibuf;
        pthread_mutex_lock(&e->lock);
        if (e->closing) { pthread_mutex_unlock(&e->lock); close(fd); free(ibuf); free(c); return NULL; }
        c->next = e->conns;
        if (e->conns) e->conns->prev = c;
        e->conns = c;
        e->nthreads++;
        pthread_mutex_unlock(&e->lock);
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 256 * 1024);
        if (pthread_create(&t, &attr, conn_main, c) != 0) {
            pthread_mutex_lock(&e->lock);
            if (c->prev) c->prev->next = c->next; else e->conns = c->next;
            if (c->next) c->next->prev = c->prev;
            e->nthreads--;
            pthread_mutex_unlock(&e->lock);
            close(fd); free(ibuf); free(c);
        }
        pthread_attr_destroy(&attr);
    }
}

/* ------------------------------------------------------------------ Engine type */

typedef struct {
    PyObject_HEAD
    engine *e;
} EngineObject;

static uint32_t random_key(engine *e) {
    for (;;) {
        uint32_t k = 0;
        if (getrandom(&k, sizeof k, 0) != sizeof k) k = (uint32_t)now_ns() * 2654435761u;
        if (k && !find_rkey(e, k) && !find_lkey(e, k)) return k;
    }
}

static int Engine_init(EngineObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"host", "port", "spin_us", NULL};
    const char *host = "127.0.0.1";
    int port = 0, spin_us = 50;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|sii", kwlist, &host, &port, &spin_us)) return -1;
    if (self->e) { PyErr_SetString(PyExc_RuntimeError, "engine already initialised"); return -1; }
    engine *e = calloc(1, sizeof *e);
    if (!e) { PyErr_NoMemory(); return -1; }
    pthread_mutex_init(&e->lock, NULL);
    pthread_cond_init(&e->cond, NULL);
    pthread_mutex_init(&e->eplock, NULL);
    pthread_cond_init(&e->epcond, NULL);
    e->spin_us = spin_us < 0 ? 0 : spin_us;
    e->pid = getpid();
    e->listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (e->listen_fd < 0 || inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        if (e->listen_fd >= 0) close(e->listen_fd);
        free(e);
        PyErr_Format(UsageError ? UsageError : PyExc_ValueError, "cannot listen on %s: need an IPv4 address", host);
        return -1;
    }
    int one = 1;
    setsockopt(e->listen_fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(e->listen_fd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(e->listen_fd, 128) < 0) {
        int err = errno;
        close(e->listen_fd);
        free(e);
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    socklen_t sl = sizeof sa;
    getsockname(e->listen_fd, (struct sockaddr *)&sa, &sl);
    e->port = ntohs(sa.sin_port);
    if (pthread_create(&e->accept_thread, NULL, accept_main, e) != 0) {
        close(e->listen_fd);
        free(e);
        PyErr_SetString(PyExc_OSError, "cannot start the accept thread");
        return -1;
    }
    e->accept_running = 1;
    self->e = e;
    return 0;
}

static PyObject *engine_closed(void) {
    PyErr_SetString(UsageError ? UsageError : PyExc_ValueError, "the tcp transport is closed");
    return NULL;
}

/* register(buffer_or_None, addr, length, access) -> (rkey, lkey, addr) */
static PyObject *Engine_register(EngineObject *self, PyObject *args) {
    PyObject *obj;
    unsigned long long addr = 0, length = 0;
    int access;
    if (!PyArg_ParseTuple(args, "OKKi", &obj, &addr, &length, &access)) return NULL;
    engine *e = self->e;
    if (!e || e->closing) return engine_closed();
    region *r = calloc(1, sizeof *r);
    if (!r) return PyErr_NoMemory();
    if (obj != Py_None) {
        if (PyObject_GetBuffer(obj, &r->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) { free(r); return NULL; }
        addr = (uintptr_t)r->view.buf;
        length = (unsigned long long)r->view.len;
    }
    r->base = addr; r->len = length; r->access = access;
    pthread_mutex_lock(&e->lock);
    if (e->nregions == e->capregions) {
        int cap = e->capregions ? e->capregions * 2 : 16;
        region **n = realloc(e->regions, cap * sizeof *n);
        if (!n) {
            pthread_mutex_unlock(&e->lock);
            if (r->view.obj) PyBuffer_Release(&r->view);
            free(r);
            return PyErr_NoMemory();
        }
        e->regions = n; e->capregions = cap;
    }
    r->rkey = random_key(e);
    r->lkey = random_key(e);
    e->regions[e->nregions++] = r;
    pthread_mutex_unlock(&e->lock);
    return Py_BuildValue("IIK", r->rkey, r->lkey, (unsigned long long)r->base);
}

/* deregister(rkey, timeout) -> True when the memory may be freed, False when a thread still holds it */
static PyObject *Engine_deregister(EngineObject *self, PyObject *args) {
    unsigned int rkey;
    double timeout;
    if (!PyArg_ParseTuple(args, "Id", &rkey, &timeout)) return NULL;
    engine *e = self->e;
    if (!e) return engine_closed();
    region *r = NULL;
    int drained = 0;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&e->lock);
    for (int i = 0; i < e->nregions; i++)
        if (e->regions[i]->rkey == rkey) {
            r = e->regions[i];
            e->regions[i] = e->regions[--e->nregions];
            break;
        }
    if (r) {
        r->dead = 1;
        uint64_t start = now_ns(), grace = 200000000ULL, limit = (uint64_t)(timeout * 1e9);
        int kicked = 0;
        while (r->inflight > 0) {
            uint64_t t = now_ns();
            if (t - start >= limit) break;
            if (!kicked && t - start >= grace) {
                /* a stalled peer holds a pin: break its connection so the blocked syscall returns */
                for (sconn *c = e->conns; c; c = c->next)
                    for (int i = 0; i < c->npins; i++)
                        if (c->pins[i] == r) { shutdown(c->fd, SHUT_RDWR); break; }
                kicked = 1;
            }
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_nsec += 10000000;
            if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
            pthread_cond_timedwait(&e->cond, &e->lock, &ts);
        }
        drained = r->inflight == 0;
    }
    pthread_mutex_unlock(&e->lock);
    Py_END_ALLOW_THREADS
    if (!r) {
        PyErr_Format(UsageError ? UsageError : PyExc_ValueError, "no registered region with key %u", rkey);
        return NULL;
    }
    if (!drained) Py_RETURN_FALSE; /* the region struct and its buffer are leaked on purpose */
    if (r->view.obj) PyBuffer_Release(&r->view);
    free(r);
    Py_RETURN_TRUE;
}

static void engine_shutdown(engine *e) {
    pthread_mutex_lock(&e->lock);
    e->closing = 1;
    pthread_mutex_unlock(&e->lock);
    pthread_mutex_lock(&e->eplock);
    e->progress_stop = 1;
    pthread_cond_broadcast(&e->epcond);
    pthread_mutex_unlock(&e->eplock);
    if (e->progress_running) { pthread_join(e->progress_thread, NULL); e->progress_running = 0; }
    shutdown(e->listen_fd, SHUT_RDWR);
    if (e->accept_running) { pthread_join(e->accept_thread, NULL); e->accept_running = 0; }
    close(e->listen_fd);
    pthread_mutex_lock(&e->lock);
    for (sconn *c = e->conns; c; c = c->next) shutdown(c->fd, SHUT_RDWR);
    uint64_t start = now_ns();
    while (e->nthreads > 0 && now_ns() - start < 5000000000ULL) {
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 10000000;
        if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
        pthread_cond_timedwait(&e->cond, &e->lock, &ts);
    }
    pthread_mutex_unlock(&e->lock);
}

/* Stop serving and drop every region. The engine struct itself lives until the Python object dies, because
 * endpoints (which hold a reference) may still unpin through it. A region still pinned, or a thread that would
 * not stop, is leaked rather than freed under someone's feet. */
static PyObject *Engine_close(EngineObject *self, PyObject *unused) {
    engine *e = self->e;
    if (!e || e->closed) Py_RETURN_NONE;
    if (e->pid != getpid()) { /* inherited through fork: the threads and locks belong to the parent */
        self->e = NULL;
        Py_RETURN_NONE;
    }
    Py_BEGIN_ALLOW_THREADS
    engine_shutdown(e);
    Py_END_ALLOW_THREADS
    e->closed = 1;
    if (e->nthreads > 0) {
        self->e = NULL; /* leak: a thread still runs on it */
        PyErr_SetString(PyExc_RuntimeError, "tcp engine threads did not stop within 5 s; engine leaked");
        return NULL;
    }
    pthread_mutex_lock(&e->lock);
    for (int i = 0; i < e->nregions; i++) {
        region *r = e->regions[i];
        r->dead = 1;
        if (r->inflight == 0) {
            if (r->view.obj) PyBuffer_Release(&r->view);
            free(r);
        }
    }
    e->nregions = 0;
    pthread_mutex_unlock(&e->lock);
    Py_RETURN_NONE;
}

static void Engine_dealloc(EngineObject *self) {
    PyObject *r = Engine_close(self, NULL);
    if (!r) PyErr_Clear(); else Py_DECREF(r);
    engine *e = self->e;
    if (e) {
        free(e->regions);
        free(e->eps);
        pthread_mutex_destroy(&e->eplock);
        pthread_cond_destroy(&e->epcond);
        pthread_mutex_destroy(&e->lock);
        pthread_cond_destroy(&e->cond);
        free(e);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Engine_port(EngineObject *self, void *c) { return PyLong_FromLong(self->e ? self->e->port : -1); }
static PyObject *Engine_threads(EngineObject *self, void *c) {
    if (!self->e) return PyLong_FromLong(0);
    pthread_mutex_lock(&self->e->lock);
    int n = self->e->nthreads;
    pthread_mutex_unlock(&self->e->lock);
    return PyLong_FromLong(n);
}

static PyMethodDef Engine_methods[] = {
    {"register", (PyCFunction)Engine_register, METH_VARARGS, "register(buffer|None, addr, length, access) -> (rkey, lkey, addr)"},
    {"deregister", (PyCFunction)Engine_deregister, METH_VARARGS, "deregister(rkey, timeout) -> drained"},
    {"close", (PyCFunction)Engine_close, METH_NOARGS, "stop serving and free the engine"},
    {NULL}};
static PyGetSetDef Engine_getset[] = {
    {"port", (getter)Engine_port, NULL, "listening port", NULL},
    {"serving_threads", (getter)Engine_threads, NULL, "live connection threads", NULL},
    {NULL}};
static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "rdmapool._tcpengine.Engine",
    .tp_basicsize = sizeof(EngineObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

/* ------------------------------------------------------------------ client endpoint */

typedef struct {
    uint64_t addr, len;
} sge_t;

typedef struct cop {
    uint64_t seq, wr_id, len;
    uint8_t opcode, signaled, expect;
    int nsge;
    sge_t sge[MAX_SGE];
    region *pins[MAX_SGE];
    int npins;
    uint8_t req[REQ_HDR];
    uint8_t resp[RESP_HDR];
} cop;

typedef struct {
    uint64_t wr_id, byte_len;
    int status, opcode, counted;
} cqe_t;

typedef struct {
    PyObject_HEAD
    PyObject *engine_obj;
    engine *e;
    int fd;
    int state;
    int spin_us;
    pthread_mutex_t lock;
    cop *ring;
    uint64_t cap; /* power of two */
    uint64_t head, recv_seq, send_seq, tail; /* head <= recv_seq, send_seq <= tail */
    uint64_t recv_off, send_off;
    cqe_t *cq;
    uint64_t cq_cap, cq_head, cq_tail;
    long outstanding;
    uint64_t rcvtimeo_ns;
    spinner spin;
    uint64_t last_progress_ns; /* when anyone last drove this endpoint (under lock) */
    int waiters;               /* callers inside wait(): the background thread keeps off */
    int registered;            /* in engine->eps */
} EndpointObject;

static inline cop *OP(EndpointObject *s, uint64_t seq) { return &s->ring[seq & (s->cap - 1)]; }

static int cq_push(EndpointObject *s, uint64_t wr_id, int status, int opcode, uint64_t byte_len, int counted) {
    if (s->cq_tail - s->cq_head == s->cq_cap) {
        uint64_t ncap = s->cq_cap ? s->cq_cap * 2 : 256;
        cqe_t *n = malloc(ncap * sizeof *n);
        if (!n) return -1;
        for (uint64_t i = s->cq_head; i < s->cq_tail; i++) n[i - s->cq_head] = s->cq[i & (s->cq_cap - 1)];
        free(s->cq);
        s->cq = n; s->cq_tail -= s->cq_head; s->cq_head = 0; s->cq_cap = ncap;
    }
    cqe_t *c = &s->cq[s->cq_tail++ & (s->cq_cap - 1)];
    c->wr_id = wr_id; c->status = status; c->opcode = opcode; c->byte_len = byte_len; c->counted = counted;
    return 0;
}

static void ep_close_fd(EndpointObject *s) {
    if (s->fd >= 0) { shutdown(s->fd, SHUT_RDWR); close(s->fd); s->fd = -1; }
}

/* Move to ERROR: `bad` (if in [head, tail)) completes with `status`, ops before it succeeded silently
 * (they are unsignalled WRITEs executed before it), everything after it flushes. */
static void ep_fail_ex(EndpointObject *s, uint64_t bad, int status, int flush_before) {
    for (uint64_t q = s->head; q < s->tail; q++) {
        cop *o = OP(s, q);
        if (q == bad) cq_push(s, o->wr_id, status, o->opcode, 0, o->signaled);
        else if (q > bad || flush_before) cq_push(s, o->wr_id, ST_FLUSH, o->opcode, 0, o->signaled);
        unpin_all(s->e, o->pins, &o->npins);
    }
    s->head = s->recv_seq = s->send_seq = s->tail;
    s->recv_off = s->send_off = 0;
    s->state = EP_ERROR;
    ep_close_fd(s);
}

static void ep_fail(EndpointObject *s, uint64_t bad, int status) { ep_fail_ex(s, bad, status, 0); }

static void complete_upto(EndpointObject *s, uint64_t seq) {
    for (uint64_t q = s->head; q <= seq; q++) {
        cop *o = OP(s, q);
        if (o->signaled) cq_push(s, o->wr_id, ST_SUCCESS, o->opcode, o->len, 1);
        unpin_all(s->e, o->pins, &o->npins);
    }
    s->head = seq + 1;
}

static inline uint64_t resp_payload(const cop *o) { return o->opcode == OP_WRITE ? 0 : o->len; }

static void skip_silent(EndpointObject *s) {
    while (s->recv_seq < s->tail && !OP(s, s->recv_seq)->expect) s->recv_seq++;
}

/* Add the bytes [off, off+len) of an SGE list to an iovec array. */
static int add_sgl(struct iovec *iov, int n, int max, const cop *o, uint64_t off) {
    for (int i = 0; i < o->nsge && n < max; i++) {
        if (off >= o->sge[i].len) { off -= o->sge[i].len; continue; }
        iov[n].iov_base = (void *)(uintptr_t)(o->sge[i].addr + off);
        iov[n].iov_len = o->sge[i].len - off;
        n++;
        off = 0;
    }
    return n;
}

/* Send without blocking. Returns -1 if the endpoint failed. */
static int ep_progress_send(EndpointObject *s) {
    while (s->send_seq < s->tail) {
        struct iovec iov[SEND_IOV];
        int n = 0;
        uint64_t off = s->send_off;
        for (uint64_t q = s->send_seq; q < s->tail && n < SEND_IOV - 1; q++) {
            cop *o = OP(s, q);
            if (off < REQ_HDR) {
                iov[n].iov_base = o->req + off;
                iov[n].iov_len = REQ_HDR - off;
                n++;
                off = 0;
            } else off -= REQ_HDR;
            if (o->opcode == OP_WRITE) n = add_sgl(iov, n, SEND_IOV, o, off);
            off = 0;
        }
        struct msghdr m = {0};
        m.msg_iov = iov;
        m.msg_iovlen = n;
        ssize_t w = sendmsg(s->fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            ep_fail(s, s->head, ST_RETRY_EXC);
            return -1;
        }
        uint64_t left = (uint64_t)w;
        while (left && s->send_seq < s->tail) {
            cop *o = OP(s, s->send_seq);
            uint64_t total = REQ_HDR + (o->opcode == OP_WRITE ? o->len : 0);
            uint64_t rem = total - s->send_off;
            if (left >= rem) { left -= rem; s->send_seq++; s->send_off = 0; }
            else { s->send_off += left; left = 0; }
        }
        /* zero-length tails (none: every op has a header) */
    }
    return 0;
}

/* Receive without blocking; returns bytes consumed (0 if nothing), -1 if the endpoint failed. */
static long ep_progress_recv_mode(EndpointObject *s, int block_one);
static long ep_progress_recv(EndpointObject *s) { return ep_progress_recv_mode(s, 0); }

/* block_one: wait (MSG_WAITALL, bounded by SO_RCVTIMEO) for the rest of the current response. Used by wait() for large payloads instead of poll()+recv, which
 * costs one wake-up per few socket-buffer fills. */
static long ep_progress_recv_mode(EndpointObject *s, int block_one) {
    skip_silent(s);
    if (s->head >= s->tail) return 0;
    struct iovec iov[RECV_IOV];
    int n = 0;
    uint64_t off = s->recv_off;
    if (block_one) {
        /* header and payload of this one response; an error header is followed by nothing (the server
         * executes nothing after an error), so the recv then ends at the SO_RCVTIMEO slice: errors on large
         * READs are reported up to 100 ms late, never wrongly */
        cop *o = OP(s, s->recv_seq);
        if (off < RESP_HDR) {
            iov[0].iov_base = o->resp + off;
            iov[0].iov_len = RESP_HDR - off;
            n = add_sgl(iov, 1, RECV_IOV, o, 0);
        } else n = add_sgl(iov, 0, RECV_IOV, o, off - RESP_HDR);
    }
    for (uint64_t q = s->recv_seq; !block_one && q < s->tail && n < RECV_IOV - 1; q++) {
        cop *o = OP(s, q);
        if (!o->expect) continue;
        if (off < RESP_HDR) {
            iov[n].iov_base = o->resp + off;
            iov[n].iov_len = RESP_HDR - off;
            n++;
            off = 0;
        } else off -= RESP_HDR;
        if (resp_payload(o)) n = add_sgl(iov, n, RECV_IOV, o, off);
        off = 0;
    }
    if (n == 0) {
        /* only silent WRITEs outstanding: still watch for an error response or EOF */
        uint8_t scratch[RESP_HDR];
        ssize_t r = recv(s->fd, scratch, RESP_HDR, MSG_DONTWAIT | MSG_PEEK);
        if (r == 0) { ep_fail(s, s->head, ST_RETRY_EXC); return -1; }
        if (r < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
            ep_fail(s, s->head, ST_RETRY_EXC);
            return -1;
        }
        if (r < RESP_HDR) return 0;
        recv(s->fd, scratch, RESP_HDR, MSG_DONTWAIT);
        uint64_t tag = get64(scratch + 8);
        ep_fail(s, (tag >= s->head && tag < s->tail) ? tag : s->head, scratch[0] ? scratch[0] : ST_GENERAL);
        return -1;
    }
    struct msghdr m = {0};
    m.msg_iov = iov;
    m.msg_iovlen = n;
    ssize_t r = recvmsg(s->fd, &m, block_one ? MSG_WAITALL : MSG_DONTWAIT);
    if (r == 0) { ep_fail(s, s->head, ST_RETRY_EXC); return -1; }
    if (r < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
        ep_fail(s, s->head, ST_RETRY_EXC);
        return -1;
    }
    uint64_t left = (uint64_t)r;
    while (left) {
        skip_silent(s);
        if (s->recv_seq >= s->tail) { ep_fail(s, s->head, ST_GENERAL); return -1; }
        cop *o = OP(s, s->recv_seq);
        if (s->recv_off < RESP_HDR) {
            uint64_t take = RESP_HDR - s->recv_off;
            if (take > left) take = left;
            s->recv_off += take; left -= take;
            if (s->recv_off < RESP_HDR) break;
            int status = o->resp[0];
            uint64_t tag = get64(o->resp + 8), plen = get64(o->resp + 16);
            if (status != ST_SUCCESS) {
                uint64_t bad = (tag >= s->head && tag <= s->recv_seq) ? tag : s->recv_seq;
                ep_fail(s, bad, status);
                return -1;
            }
            if (tag != o->seq || plen != resp_payload(o)) { ep_fail(s, s->recv_seq, ST_GENERAL); return -1; }
        }
        uint64_t need = RESP_HDR + resp_payload(o) - s->recv_off;
        uint64_t take = need < left ? need : left;
        s->recv_off += take; left -= take;
        if (take == need) {
            complete_upto(s, s->recv_seq);
            s->recv_seq++;
            s->recv_off = 0;
        }
    }
    skip_silent(s);
    return r;
}

static int ep_progress(EndpointObject *s) {
    s->last_progress_ns = now_ns();
    if (s->state != EP_READY || s->fd < 0) return 0;
    if (ep_progress_send(s) < 0) return -1;
    long got;
    do {
        got = ep_progress_recv(s);
        if (got < 0) return -1;
        skip_silent(s);
        /* a large payload in progress is left to wait()'s MSG_WAITALL recv: looping here on the chunks that
         * trickle in costs a syscall per chunk and the CPU the sender needs (measured: 1 MiB READ ~77% of the
         * raw socket with the loop) */
        if (s->recv_seq < s->tail && resp_payload(OP(s, s->recv_seq)) >= BLOCKING_RECV_MIN && s->recv_off) break;
    } while (got > 0 && s->head < s->tail);
    if (s->send_seq < s->tail && s->state == EP_READY) ep_progress_send(s);
    return 0;
}

static int ep_grow(EndpointObject *s, uint64_t need) {
    uint64_t used = s->tail - s->head;
    if (used + need <= s->cap) return 0;
    uint64_t ncap = s->cap ? s->cap : 256;
    while (ncap < used + need) ncap *= 2;
    cop *n = malloc(ncap * sizeof *n);
    if (!n) return -1;
    for (uint64_t q = s->head; q < s->tail; q++) n[q & (ncap - 1)] = *OP(s, q);
    free(s->ring);
    s->ring = n;
    s->cap = ncap;
    return 0;
}

/* Background progress. Hardware moves the bytes of posted requests whether or not anyone polls; here the caller's
 * poll()/wait() does, so a batch larger than the socket buffers would stall while the caller computes. One thread
 * per engine ticks every BG_TICK_NS while endpoints exist and drives (non-blocking) any endpoint that has requests
 * outstanding, nobody inside wait(), and no progress for BG_IDLE_NS. It never runs on the latency path: a caller
 * that posts and waits keeps the endpoint fresh, and waiters are skipped (their poll(2) would not see data the
 * background thread consumed). trylock only, so it never blocks a caller for longer than one non-blocking pass. */
#define BG_TICK_NS 1000000ULL
#define BG_IDLE_NS 500000ULL

static void *progress_main(void *arg) {
    engine *e = arg;
    pthread_mutex_lock(&e->eplock);
    while (!e->progress_stop) {
        for (int i = 0; i < e->neps; i++) {
            EndpointObject *s = e->eps[i];
            if (pthread_mutex_trylock(&s->lock) != 0) continue;
            if (!s->waiters && s->state == EP_READY && s->head < s->tail &&
                now_ns() - s->last_progress_ns >= BG_IDLE_NS)
                ep_progress(s);
            pthread_mutex_unlock(&s->lock);
        }
        if (!e->neps) {
            pthread_cond_wait(&e->epcond, &e->eplock);
            continue;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += BG_TICK_NS;
        if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
        pthread_cond_timedwait(&e->epcond, &e->eplock, &ts);
    }
    pthread_mutex_unlock(&e->eplock);
    return NULL;
}

static void ep_register(EndpointObject *s) {
    engine *e = s->e;
    pthread_mutex_lock(&e->eplock);
    if (e->neps == e->capeps) {
        int cap = e->capeps ? e->capeps * 2 : 16;
        void **n = realloc(e->eps, cap * sizeof *n);
        if (!n) { pthread_mutex_unlock(&e->eplock); return; } /* no background progress for it: still correct */
        e->eps = n;
        e->capeps = cap;
    }
    e->eps[e->neps++] = s;
    s->registered = 1;
    if (!e->progress_running && !e->progress_stop &&
        pthread_create(&e->progress_thread, NULL, progress_main, e) == 0)
        e->progress_running = 1;
    pthread_cond_broadcast(&e->epcond);
    pthread_mutex_unlock(&e->eplock);
}

static void ep_unregister(EndpointObject *s) {
    if (!s->registered) return;
    engine *e = s->e;
    pthread_mutex_lock(&e->eplock);
    for (int i = 0; i < e->neps; i++)
        if (e->eps[i] == s) { e->eps[i] = e->eps[--e->neps]; break; }
    s->registered = 0;
    pthread_mutex_unlock(&e->eplock);
}

static int Endpoint_init(EndpointObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"engine", "host", "port", "timeout", "spin_us", NULL};
    PyObject *eng;
    const char *host;
    int port, spin_us = 50;
    double timeout = 5.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!si|di", kwlist, &EngineType, &eng, &host, &port, &timeout, &spin_us))
        return -1;
    if (!((EngineObject *)eng)->e || ((EngineObject *)eng)->e->closed) { engine_closed(); return -1; }
    self->fd = -1;
    pthread_mutex_init(&self->lock, NULL);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1 || port <= 0 || port > 65535) {
        PyErr_Format(UsageError, "bad tcp peer address %s:%d (need an IPv4 address and a port)", host, port);
        return -1;
    }
    int fd = -1, ok = 0, err = 0;
    Py_BEGIN_ALLOW_THREADS
    fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0) {
        struct timeval tv = {.tv_sec = (long)timeout, .tv_usec = (long)((timeout - (long)timeout) * 1e6)};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        char hello[8];
        if (connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) {
            tune_socket(fd);
            if (send(fd, MAGIC, 8, MSG_NOSIGNAL) == 8 && recv_exact(fd, hello, 8) == 0 && memcmp(hello, MAGIC, 8) == 0)
                ok = 1;
        }
        err = errno;
        struct timeval zero = {0};
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &zero, sizeof zero);
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &zero, sizeof zero);
        /* a peer that vanishes without a RST still ends the endpoint: keepalive + user timeout */
        int one = 1, idle = 2, intvl = 1, cnt = 3;
        unsigned int uto = 10000;
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof idle);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof intvl);
        setsockopt(fd, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof cnt);
        setsockopt(fd, IPPROTO_TCP, TCP_USER_TIMEOUT, &uto, sizeof uto);
    } else err = errno;
    Py_END_ALLOW_THREADS
    if (!ok) {
        if (fd >= 0) close(fd);
        errno = err;
        PyErr_Format(PyExc_ConnectionError, "tcp connect to %s:%d failed: %s", host, port, strerror(err ? err : EPROTO));
        return -1;
    }
    Py_INCREF(eng);
    self->engine_obj = eng;
    self->e = ((EngineObject *)eng)->e;
    self->fd = fd;
    self->spin_us = spin_us < 0 ? 0 : spin_us;
    self->state = EP_READY;
    ep_register(self);
    return 0;
}

typedef struct {
    uint64_t wr_id, remote, cmp, swp;
    uint32_t rkey;
    int opcode, signaled, nsge;
    uint64_t sge[MAX_SGE][2];
    uint32_t lkey[MAX_SGE];
} pending_t;

static int get_u64(PyObject *o, const char *name, uint64_t *out) {
    PyObject *v = PyObject_GetAttrString(o, name);
    if (!v) return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(UsageError, "work request field %s must be a non-negative integer below 2**64", name);
        return -1;
    }
    *out = x;
    return 0;
}

static int parse_wr(PyObject *wr, pending_t *p) {
    uint64_t v;
    if (get_u64(wr, "wr_id", &p->wr_id) < 0 || get_u64(wr, "opcode", &v) < 0) return -1;
    p->opcode = (int)v;
    if (get_u64(wr, "remote_addr", &p->remote) < 0 || get_u64(wr, "rkey", &v) < 0) return -1;
    if (v >= (1ULL << 32)) { PyErr_Format(UsageError, "wr %llu: rkey does not fit in 32 bits", (unsigned long long)p->wr_id); return -1; }
    p->rkey = (uint32_t)v;
    if (get_u64(wr, "compare", &p->cmp) < 0 || get_u64(wr, "swap", &p->swp) < 0) return -1;
    PyObject *sig = PyObject_GetAttrString(wr, "signaled");
    if (!sig) return -1;
    p->signaled = PyObject_IsTrue(sig);
    Py_DECREF(sig);
    PyObject *sgl = PyObject_GetAttrString(wr, "sgl");
    if (!sgl) return -1;
    PyObject *seq = PySequence_Fast(sgl, "sgl must be a sequence of Sge");
    Py_DECREF(sgl);
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n == 0 || n > MAX_SGE) {
        Py_DECREF(seq);
        PyErr_Format(UsageError, "wr %llu: scatter/gather list needs 1 to %d entries, got %zd",
                     (unsigned long long)p->wr_id, MAX_SGE, n);
        return -1;
    }
    p->nsge = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *g = PySequence_Fast_GET_ITEM(seq, i);
        uint64_t lk;
        if (get_u64(g, "addr", &p->sge[i][0]) < 0 || get_u64(g, "length", &p->sge[i][1]) < 0 ||
            get_u64(g, "lkey", &lk) < 0) { Py_DECREF(seq); return -1; }
        p->lkey[i] = (uint32_t)lk;
    }
    Py_DECREF(seq);
    if (p->opcode < OP_READ || p->opcode > OP_FAA) {
        PyErr_Format(UsageError, "wr %llu: unknown opcode %d", (unsigned long long)p->wr_id, p->opcode);
        return -1;
    }
    if (p->opcode >= OP_CAS) {
        if (p->nsge != 1 || p->sge[0][1] != 8) {
            PyErr_Format(UsageError, "wr %llu: atomics need exactly one 8-byte SGE", (unsigned long long)p->wr_id);
            return -1;
        }
        if (p->remote % 8) {
            PyErr_Format(UsageError, "wr %llu: atomic remote address %#llx is not 8-byte aligned",
                         (unsigned long long)p->wr_id, (unsigned long long)p->remote);
            return -1;
        }
    }
    return 0;
}

/* Append one validated request to the ring (caller holds s->lock, GIL may be released). Local SGEs are
 * pinned here; a bad lkey is a LOC_PROT_ERR completion and moves the endpoint to ERROR, as on verbs. */
static void ep_enqueue(EndpointObject *s, const pending_t *p) {
    if (s->state != EP_READY) {
        cq_push(s, p->wr_id, ST_FLUSH, p->opcode, 0, p->signaled);
        return;
    }
    cop *o = OP(s, s->tail);
    o->seq = s->tail;
    o->wr_id = p->wr_id;
    o->opcode = (uint8_t)p->opcode;
    o->signaled = (uint8_t)p->signaled;
    o->expect = p->opcode != OP_WRITE || p->signaled;
    o->nsge = p->nsge;
    o->npins = 0;
    o->len = 0;
    int need = p->opcode == OP_WRITE ? 0 : ACC_LOCAL_WRITE;
    int bad = 0;
    pthread_mutex_lock(&s->e->lock);
    for (int i = 0; i < p->nsge; i++) {
        region *r = find_lkey(s->e, p->lkey[i]);
        if (!r || !in_bounds(r, p->sge[i][0], p->sge[i][1]) || (r->access & need) != need) { bad = 1; break; }
        r->inflight++;
        o->pins[o->npins++] = r;
        o->sge[i].addr = p->sge[i][0];
        o->sge[i].len = p->sge[i][1];
        o->len += p->sge[i][1];
    }
    if (bad) for (int i = 0; i < o->npins; i++) unpin_locked(s->e, o->pins[i]);
    pthread_mutex_unlock(&s->e->lock);
    if (bad) {
        o->npins = 0;
        s->tail++; /* make it part of the queue so ep_fail reports it, then fail there */
        ep_fail_ex(s, o->seq, ST_LOC_PROT, 1); /* requests still in flight before it are flushed too */
        return;
    }
    uint8_t *h = o->req;
    memset(h, 0, REQ_HDR);
    h[0] = (uint8_t)p->opcode;
    h[1] = p->signaled ? 1 : 0;
    put32(h + 4, p->rkey);
    put64(h + 8, o->seq);
    put64(h + 16, p->remote);
    put64(h + 24, o->len);
    put64(h + 32, p->cmp);
    put64(h + 40, p->swp);
    s->tail++;
}

static PyObject *ep_closed_err(void) {
    PyErr_SetString(UsageError, "endpoint is closed");
    return NULL;
}

static void ep_post_pending(EndpointObject *s, pending_t *ps, Py_ssize_t n) {
    pthread_mutex_lock(&s->lock);
    if (ep_grow(s, (uint64_t)n) == 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            if (ps[i].signaled) s->outstanding++;
            ep_enqueue(s, &ps[i]);
        }
        ep_progress(s);
    } else {
        for (Py_ssize_t i = 0; i < n; i++) cq_push(s, ps[i].wr_id, ST_GENERAL, ps[i].opcode, 0, ps[i].signaled);
    }
    pthread_mutex_unlock(&s->lock);
}

static PyObject *Endpoint_post(EndpointObject *self, PyObject *arg) {
    if (self->state == EP_CLOSED) return ep_closed_err();
    PyObject *seq = PySequence_Fast(arg, "post needs a sequence of WorkRequest");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    pending_t *ps = PyMem_Malloc((n ? n : 1) * sizeof *ps);
    if (!ps) { Py_DECREF(seq); return PyErr_NoMemory(); }
    for (Py_ssize_t i = 0; i < n; i++)
        if (parse_wr(PySequence_Fast_GET_ITEM(seq, i), &ps[i]) < 0) { PyMem_Free(ps); Py_DECREF(seq); return NULL; }
    Py_DECREF(seq);
    Py_BEGIN_ALLOW_THREADS
    ep_post_pending(self, ps, n);
    Py_END_ALLOW_THREADS
    PyMem_Free(ps);
    Py_RETURN_NONE;
}

/* post_plan(local_addr, local_len, local_lkey, remote_addr, remote_rkey, pairs, opcode, wr_id_base, signal_every)
 * The first five are buffers of uint64 (the prepared plan); pairs is a buffer of int64 (local, remote) index
 * pairs. Returns the number of signalled requests. */
static PyObject *Endpoint_post_plan(EndpointObject *self, PyObject *args) {
    Py_buffer b[6];
    int opcode, signal_every;
    unsigned long long base;
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*iKi", &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &opcode, &base, &signal_every))
        return NULL;
    PyObject *result = NULL;
    pending_t *ps = NULL;
    if (self->state == EP_CLOSED) { ep_closed_err(); goto out; }
    const uint64_t *la = b[0].buf, *ll = b[1].buf, *lk = b[2].buf, *ra = b[3].buf, *rk = b[4].buf;
    const int64_t *pairs = b[5].buf;
    Py_ssize_t nl = b[0].len / 8, nr = b[3].len / 8, n = b[5].len / 16;
    if ((opcode != OP_READ && opcode != OP_WRITE) || signal_every < 1) {
        PyErr_SetString(UsageError, "post_plan needs opcode READ or WRITE and signal_every >= 1");
        goto out;
    }
    ps = PyMem_Malloc((n ? n : 1) * sizeof *ps);
    if (!ps) { PyErr_NoMemory(); goto out; }
    long signalled = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t li = pairs[2 * i], ri = pairs[2 * i + 1];
        if (li < 0 || li >= nl || ri < 0 || ri >= nr) {
            PyErr_Format(UsageError, "pair %zd: index (%lld, %lld) outside the plan (%zd local, %zd remote)", i,
                         (long long)li, (long long)ri, nl, nr);
            goto out;
        }
        pending_t *p = &ps[i];
        p->wr_id = base + (uint64_t)i;
        p->opcode = opcode;
        p->remote = ra[ri];
        p->rkey = (uint32_t)rk[ri];
        p->cmp = p->swp = 0;
        p->signaled = ((i + 1) % signal_every == 0) || i == n - 1;
        signalled += p->signaled;
        p->nsge = 1;
        p->sge[0][0] = la[li];
        p->sge[0][1] = ll[li];
        p->lkey[0] = (uint32_t)lk[li];
    }
    Py_BEGIN_ALLOW_THREADS
    ep_post_pending(self, ps, n);
    Py_END_ALLOW_THREADS
    result = PyLong_FromLong(signalled);
out:
    PyMem_Free(ps);
    for (int i = 0; i < 6; i++) if (b[i].obj) PyBuffer_Release(&b[i]);
    return result;
}

static PyObject *drain_cq(EndpointObject *s, Py_ssize_t max) {
    Py_ssize_t n = (Py_ssize_t)(s->cq_tail - s->cq_head);
    if (n > max) n = max;
    PyObject *list = PyList_New(n);
    if (!list) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        cqe_t *c = &s->cq[s->cq_head & (s->cq_cap - 1)];
        PyObject *t = Py_BuildValue("KiiK", (unsigned long long)c->wr_id, c->status, c->opcode,
                                    (unsigned long long)c->byte_len);
        if (!t) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, t);
        if (c->counted) s->outstanding--;
        s->cq_head++;
    }
    return list;
}

static PyObject *Endpoint_poll(EndpointObject *self, PyObject *args) {
    Py_ssize_t max = 64;
    if (!PyArg_ParseTuple(args, "|n", &max)) return NULL;
    if (self->state == EP_CLOSED) return ep_closed_err();
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    ep_progress(self);
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    PyObject *r = drain_cq(self, max);
    pthread_mutex_unlock(&self->lock);
    return r;
}

/* wait(count, timeout) -> list of up to `count` completions; fewer only when the timeout passed. */
static PyObject *Endpoint_wait(EndpointObject *self, PyObject *args) {
    Py_ssize_t count;
    double timeout;
    if (!PyArg_ParseTuple(args, "nd", &count, &timeout)) return NULL;
    if (self->state == EP_CLOSED) return ep_closed_err();
    if (!(timeout > 0)) { PyErr_SetString(UsageError, "wait needs a positive timeout"); return NULL; }
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    self->waiters++;
    pthread_mutex_unlock(&self->lock);
    uint64_t start = now_ns(), deadline = start + (uint64_t)(timeout * 1e9);
    spin_start(&self->spin, start, self->spin_us);
    for (;;) {
        pthread_mutex_lock(&self->lock);
        ep_progress(self);
        Py_ssize_t have = (Py_ssize_t)(self->cq_tail - self->cq_head);
        int fd = self->fd;
        short events = POLLIN | (self->send_seq < self->tail ? POLLOUT : 0);
        int idle = self->head >= self->tail;
        skip_silent(self);
        /* a large payload is on its way: wait for it in one MSG_WAITALL recv rather than spinning on chunks */
        int big = self->state == EP_READY && fd >= 0 && self->recv_seq < self->send_seq &&
                  resp_payload(OP(self, self->recv_seq)) >= BLOCKING_RECV_MIN;
        pthread_mutex_unlock(&self->lock);
        if (have >= count || fd < 0 || idle) break;
        uint64_t t = now_ns();
        if (t >= deadline) break;
        if (big) {
            pthread_mutex_lock(&self->lock);
            if (self->fd >= 0 && self->state == EP_READY) {
                uint64_t slice = deadline - t < 100000000ULL ? deadline - t : 100000000ULL;
                if (slice != self->rcvtimeo_ns) {
                    struct timeval tv = {.tv_sec = (long)(slice / 1000000000ULL),
                                         .tv_usec = (long)((slice % 1000000000ULL) / 1000)};
                    if (!tv.tv_sec && !tv.tv_usec) tv.tv_usec = 1;
                    setsockopt(self->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
                    self->rcvtimeo_ns = slice;
                }
                ep_progress_recv_mode(self, 1);
            }
            pthread_mutex_unlock(&self->lock);
            continue;
        }
        if (spin_more(&self->spin, t)) { sched_yield(); continue; }
        struct pollfd p = {.fd = fd, .events = events};
        uint64_t left_ms = (deadline - t) / 1000000ULL + 1;
        poll(&p, 1, left_ms > 100 ? 100 : (int)left_ms);
    }
    pthread_mutex_lock(&self->lock);
    self->waiters--;
    pthread_mutex_unlock(&self->lock);
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    PyObject *r = drain_cq(self, count);
    pthread_mutex_unlock(&self->lock);
    return r;
}

static void ep_shutdown(EndpointObject *s) {
    ep_unregister(s); /* first: the background thread never touches it again */
    pthread_mutex_lock(&s->lock);
    if (s->state != EP_CLOSED && s->e) {
        for (uint64_t q = s->head; q < s->tail; q++) unpin_all(s->e, OP(s, q)->pins, &OP(s, q)->npins);
        s->head = s->recv_seq = s->send_seq = s->tail;
        ep_close_fd(s);
        s->state = EP_CLOSED;
    }
    pthread_mutex_unlock(&s->lock);
}

static PyObject *Endpoint_close(EndpointObject *self, PyObject *unused) {
    if (self->e && self->e->pid != getpid()) Py_RETURN_NONE; /* see Endpoint_dealloc */
    Py_BEGIN_ALLOW_THREADS
    ep_shutdown(self);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void Endpoint_dealloc(EndpointObject *self) {
    if (self->e && self->e->pid != getpid()) {
        /* inherited through fork: the parent owns the locks, pins and background thread; just drop the fd */
        if (self->fd >= 0) close(self->fd);
        self->e = NULL;
        self->fd = -1;
    }
    if (self->e) ep_shutdown(self);
    else if (self->fd >= 0) close(self->fd);
    free(self->ring);
    free(self->cq);
    pthread_mutex_destroy(&self->lock);
    Py_XDECREF(self->engine_obj);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Endpoint_state(EndpointObject *self, void *c) { return PyLong_FromLong(self->state); }
static PyObject *Endpoint_outstanding(EndpointObject *self, void *c) { return PyLong_FromLong(self->outstanding); }

static PyMethodDef Endpoint_methods[] = {
    {"post", (PyCFunction)Endpoint_post, METH_O, "post(work_requests)"},
    {"post_plan", (PyCFunction)Endpoint_post_plan, METH_VARARGS, "post a prepared plan with index pairs"},
    {"poll", (PyCFunction)Endpoint_poll, METH_VARARGS, "poll(max) -> [(wr_id, status, opcode, byte_len)]"},
    {"wait", (PyCFunction)Endpoint_wait, METH_VARARGS, "wait(count, timeout) -> completions"},
    {"close", (PyCFunction)Endpoint_close, METH_NOARGS, "close; outstanding requests are dropped"},
    {NULL}};
static PyGetSetDef Endpoint_getset[] = {
    {"state", (getter)Endpoint_state, NULL, "0 ready, 1 error, 2 closed", NULL},
    {"outstanding", (getter)Endpoint_outstanding, NULL, "signalled requests not yet returned", NULL},
    {NULL}};
static PyTypeObject EndpointType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "rdmapool._tcpengine.Endpoint",
    .tp_basicsize = sizeof(EndpointObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Endpoint_init,
    .tp_dealloc = (destructor)Endpoint_dealloc,
    .tp_methods = Endpoint_methods,
    .tp_getset = Endpoint_getset,
};

/* ------------------------------------------------------------------ raw socket baseline for the benchmark */

typedef struct { int fd; size_t block, span; uint64_t total; char *buf; } rawsend_t;

static void *raw_sender(void *arg) {
    rawsend_t *a = arg;
    uint64_t sent = 0;
    while (sent < a->total) {
        size_t n = a->block;
        if (n > a->total - sent) n = a->total - sent;
        size_t off = 0;
        char *base = a->buf + (sent / a->block * a->block) % a->span;
        while (off < n) {
            ssize_t w = send(a->fd, base + off, n - off, MSG_NOSIGNAL);
            if (w <= 0) { if (w < 0 && errno == EINTR) continue; return NULL; }
            off += w;
        }
        sent += n;
    }
    return NULL;
}

/* raw_stream(block, total, span=block) -> seconds to stream `total` bytes over loopback TCP in `block`-sized
 * send/recv calls. The sender reads and the receiver writes successive blocks of a `span`-byte buffer, so with
 * span = the transport's region size both touch as much memory as a transport benchmark does. */
static PyObject *raw_stream(PyObject *mod, PyObject *args) {
    unsigned long long block, total, span = 0;
    if (!PyArg_ParseTuple(args, "KK|K", &block, &total, &span)) return NULL;
    if (!block) { PyErr_SetString(UsageError, "block must be positive"); return NULL; }
    if (span < block) span = block;
    span -= span % block;
    double secs = -1;
    Py_BEGIN_ALLOW_THREADS
    int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &sa.sin_addr);
    socklen_t sl = sizeof sa;
    if (l >= 0 && bind(l, (struct sockaddr *)&sa, sizeof sa) == 0 && listen(l, 1) == 0 &&
        getsockname(l, (struct sockaddr *)&sa, &sl) == 0) {
        int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c >= 0 && connect(c, (struct sockaddr *)&sa, sizeof sa) == 0) {
            int s = accept(l, NULL, NULL);
            if (s >= 0) {
                tune_socket(c); tune_socket(s);
                /* the same allocation as TcpTransport.allocate: anonymous mmap, huge pages advised */
                char *sbuf = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                char *rbuf = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (sbuf == MAP_FAILED) sbuf = NULL;
                if (rbuf == MAP_FAILED) rbuf = NULL;
                if (sbuf && span >= (2u << 20)) madvise(sbuf, span, MADV_HUGEPAGE);
                if (rbuf && span >= (2u << 20)) madvise(rbuf, span, MADV_HUGEPAGE);
                if (sbuf && rbuf) {
                    memset(sbuf, 7, span);
                    memset(rbuf, 0, span);
                    rawsend_t a = {.fd = c, .block = block, .span = span, .total = total, .buf = sbuf};
                    pthread_t t;
                    uint64_t t0 = now_ns();
                    pthread_create(&t, NULL, raw_sender, &a);
                    uint64_t got = 0;
                    while (got < total) {
                        size_t want = block;
                        if (want > total - got) want = total - got;
                        ssize_t r = recv(s, rbuf + (got / block * block) % span, want, MSG_WAITALL);
                        if (r <= 0) break;
                        got += r;
                    }
                    pthread_join(t, NULL);
                    if (got == total) secs = (now_ns() - t0) / 1e9;
                }
                if (sbuf) munmap(sbuf, span);
                if (rbuf) munmap(rbuf, span);
                close(s);
            }
        }
        if (c >= 0) close(c);
    }
    if (l >= 0) close(l);
    Py_END_ALLOW_THREADS
    if (secs < 0) { PyErr_SetString(PyExc_OSError, "raw socket stream failed"); return NULL; }
    return PyFloat_FromDouble(secs);
}

/* memcpy_stream(block, total) -> seconds to memcpy `total` bytes in `block`-sized copies, walking through
 * two buffers of max(64 MiB, block) so small blocks do not stay in cache (the shm baseline). */
static PyObject *memcpy_stream(PyObject *mod, PyObject *args) {
    unsigned long long block, total;
    if (!PyArg_ParseTuple(args, "KK", &block, &total)) return NULL;
    if (!block) { PyErr_SetString(UsageError, "block must be positive"); return NULL; }
    size_t span = block > (64u << 20) ? block : (64u << 20);
    span -= span % block;
    char *src = malloc(span), *dst = malloc(span);
    if (!src || !dst) { free(src); free(dst); return PyErr_NoMemory(); }
    double secs;
    Py_BEGIN_ALLOW_THREADS
    memset(src, 1, span);
    memset(dst, 2, span);
    uint64_t t0 = now_ns(), done = 0, off = 0;
    while (done < total) {
        memcpy(dst + off, src + off, block);
        __asm__ __volatile__("" ::: "memory");
        done += block;
        off += block;
        if (off + block > span) off = 0;
    }
    secs = (now_ns() - t0) / 1e9;
    Py_END_ALLOW_THREADS
    free(src);
    free(dst);
    return PyFloat_FromDouble(secs);
}

static PyObject *set_usage_error(PyObject *mod, PyObject *cls) {
    Py_XDECREF(UsageError);
    Py_INCREF(cls);
    UsageError = cls;
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"raw_stream", raw_stream, METH_VARARGS, "raw_stream(block, total) -> seconds (loopback TCP baseline)"},
    {"memcpy_stream", memcpy_stream, METH_VARARGS, "memcpy_stream(block, total) -> seconds (memcpy baseline)"},
    {"set_usage_error", set_usage_error, METH_O, "set the exception class raised for caller mistakes"},
    {NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "rdmapool._tcpengine",
                                       "Native engine of the rdmapool tcp transport.", -1, module_methods};

PyMODINIT_FUNC PyInit__tcpengine(void) {
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&EndpointType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    UsageError = PyExc_ValueError;
    Py_INCREF(UsageError);
    Py_INCREF(&EngineType);
    PyModule_AddObject(m, "Engine", (PyObject *)&EngineType);
    Py_INCREF(&EndpointType);
    PyModule_AddObject(m, "Endpoint", (PyObject *)&EndpointType);
    PyModule_AddIntConstant(m, "REQ_HDR", REQ_HDR);
    PyModule_AddIntConstant(m, "RESP_HDR", RESP_HDR);
    PyModule_AddIntConstant(m, "MAX_SGE", MAX_SGE);
    return m;
}
