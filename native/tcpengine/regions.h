/* The region table, pins, and socket helpers (part of rdmapool._tcpengine: included by native/tcpengine.c, one translation unit) */
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
    static int cached = -2; /* read and set from several threads: each computes the same value */
    int v = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (v == -2) {
        const char *env = getenv("RDMAPOOL_TCP_SOCKBUF");
        v = env ? atoi(env) : -1;
        if (env && v < 0) v = 0;
        __atomic_store_n(&cached, v, __ATOMIC_RELAXED);
    }
    return v;
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

/* Bytes one send or receive system call moves at most (0: no limit); see IO_CHUNK in common.h. */
static size_t io_chunk = IO_CHUNK;      /* engine: READ responses sent */
static size_t io_chunk_srv_recv = IO_CHUNK_ENGINE_RECV;
static size_t io_chunk_cli_recv = IO_CHUNK_INITIATOR_RECV;
static size_t io_chunk_cli_send = IO_CHUNK_INITIATOR_SEND;

/* Cut iov[0..n) so that it covers at most `max` bytes: returns the entries used; *saved keeps the length
 * of the last one, to be restored with iov_restore. */
static int iov_cap(struct iovec *iov, int n, size_t max, size_t *saved, int *last) {
    *last = -1;
    if (!max) return n;
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        if (total + iov[i].iov_len >= max) {
            *saved = iov[i].iov_len;
            *last = i;
            iov[i].iov_len = max - total;
            return i + 1;
        }
        total += iov[i].iov_len;
    }
    return n;
}

static void iov_restore(struct iovec *iov, size_t saved, int last) {
    if (last >= 0) iov[last].iov_len = saved;
}

static int send_all_iov(int fd, struct iovec *iov, int n) {
    while (n > 0) {
        struct msghdr m = {0};
        size_t saved = 0;
        int last;
        m.msg_iov = iov;
        m.msg_iovlen = iov_cap(iov, n > 1024 ? 1024 : n, io_chunk, &saved, &last);
        ssize_t w = sendmsg(fd, &m, MSG_NOSIGNAL);
        iov_restore(iov, saved, last);
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
        ssize_t r = recv(fd, p, io_chunk_srv_recv && len > io_chunk_srv_recv ? io_chunk_srv_recv : len, MSG_WAITALL);
        if (r == 0) return -1;
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += r; len -= r;
    }
    return 0;
}
