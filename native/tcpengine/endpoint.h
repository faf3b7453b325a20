/* The initiator: request ring, progress, background progress (part of rdmapool._tcpengine: included by native/tcpengine.c, one translation unit) */
/* ------------------------------------------------------------------ client endpoint */

typedef struct {
    uint64_t addr, len;
} sge_t;

/* A READ digest: the streaming xxh3-128 state and how many of its bytes were queued and hashed. Inline hashing
 * moves both counters together; with a digest thread (dx_mode) the receiver queues chunks (`queued`, under the
 * endpoint lock) and the thread hashes them in order (`hashed`, atomic). The op completes once they are equal. */
typedef struct {
    XXH3_state_t st; /* first: it wants 64-byte alignment (the struct is aligned_alloc'ed) */
    uint64_t queued, hashed;
} dstate;

/* One chunk for the digest thread: `n` bytes at `p` that just landed, for digest `d`. */
typedef struct {
    dstate *d;
    const void *p;
    uint64_t n;
} dx_job;

typedef struct cop {
    uint64_t seq, wr_id, len;
    uint8_t opcode, signaled, expect;
    int nsge;
    sge_t sge[MAX_SGE];
    region *pins[MAX_SGE];
    int npins;
    dstate *digest;           /* READ with a digest: streaming xxh3-128 of SGE `dsge` as its bytes land */
    uint64_t dstart, dend;    /* that SGE's byte range within the payload */
    int dsge;
    uint8_t req[REQ_HDR];
    uint8_t resp[RESP_HDR];
} cop;

typedef struct {
    uint64_t wr_id, byte_len;
    int status, opcode, counted, has_digest;
    uint8_t digest[16];
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
    uint64_t landed;                         /* ops before it received whole: head <= landed <= recv_seq + 1 */
    uint64_t recv_off, send_off;
    cqe_t *cq;
    uint64_t cq_cap, cq_head, cq_tail;
    long outstanding;
    uint64_t rcvtimeo_ns;
    spinner spin;
    uint64_t last_progress_ns; /* when anyone last drove this endpoint (under lock) */
    int waiters;               /* callers inside wait(): the background thread keeps off */
    int registered;            /* in engine->eps */
    /* sender thread (tx_mode, see tx_main): the bytes of a backlog go out on a thread of their own */
    int tx_mode, tx_started, tx_stop;
    int tx_busy;               /* the sender is inside sendmsg with iovecs into the ring and the fd, lock released */
    int tx_hold;               /* threads waiting for tx_busy to drop: the sender starts no new send meanwhile */
    pthread_t tx_thread;
    pthread_cond_t tx_cond;    /* broadcast on new work, on stop and when tx_busy drops */
    /* digest thread (dx_mode, see dx_main): READ digests hashed a chunk behind the receive, on a thread of their own */
    int dx_mode, dx_started, dx_stop;
    int dx_busy;               /* the thread is hashing a job it took (dx_lock released) */
    int dx_sleeping;           /* the thread waits on dx_work: a new job signals it */
    pthread_t dx_thread;
    pthread_mutex_t dx_lock;   /* the job queue and the flags above; never held while taking `lock` */
    pthread_cond_t dx_work;    /* new job, or stop */
    pthread_cond_t dx_done;    /* a job finished (broadcast) */
    dx_job *dx_q;
    uint64_t dx_cap, dx_head, dx_tail; /* dx_cap: a power of two, or 0 */
} EndpointObject;

static inline cop *OP(EndpointObject *s, uint64_t seq) { return &s->ring[seq & (s->cap - 1)]; }

static int cq_push_digest(EndpointObject *s, uint64_t wr_id, int status, int opcode, uint64_t byte_len, int counted,
                          const uint8_t *digest) {
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
    c->has_digest = digest != NULL;
    if (digest) memcpy(c->digest, digest, 16);
    return 0;
}

static int cq_push(EndpointObject *s, uint64_t wr_id, int status, int opcode, uint64_t byte_len, int counted) {
    return cq_push_digest(s, wr_id, status, opcode, byte_len, counted, NULL);
}

/* An op leaves the queue: its local regions are unpinned and its digest state freed. */
static void op_release(EndpointObject *s, cop *o) {
    unpin_all(s->e, o->pins, &o->npins);
    free(o->digest);
    o->digest = NULL;
}

/* Digest thread (dx_mode). The receiving thread hashing each chunk right after recv() placed it reads it from its
 * own cache, but hashing is then serialised with receiving: the socket waits meanwhile (and on loopback the peer's
 * send path takes over the receive processing). With cores to spare, a thread of the endpoint's own hashes each
 * chunk while the receiver is already back in recv() for the next one; the chunk is still in the receiving core's
 * cache. Jobs are hashed in order (one thread), so each digest's streaming state sees its bytes in order. On where
 * it is on: rdmapool/transport/tcp.py. The thread never takes the endpoint lock: whoever releases ops first waits
 * until the queue is empty and the thread idle (dx_drain), and the completion of a landed op waits for its
 * digest (complete_ready). It sleeps when the queue is empty and is woken once two chunks wait or a digest's last
 * chunk landed: on the H200 host's split, a wake-up per chunk or a 200 us spin before sleeping was no faster and
 * cost the client up to twice the CPU (docs/decisions.md). */
#define DX_WAKE_DEPTH 2 /* a sleeping digest thread is woken once this many chunks wait, or at a digest's last chunk */

static void *dx_main(void *arg) {
    EndpointObject *s = arg;
    pthread_mutex_lock(&s->dx_lock);
    while (!__atomic_load_n(&s->dx_stop, __ATOMIC_RELAXED)) {
        if (s->dx_head == s->dx_tail) {
            s->dx_sleeping = 1;
            pthread_cond_wait(&s->dx_work, &s->dx_lock);
            s->dx_sleeping = 0;
            continue;
        }
        dx_job j = s->dx_q[s->dx_head++ & (s->dx_cap - 1)];
        s->dx_busy = 1;
        pthread_mutex_unlock(&s->dx_lock);
        XXH.update(&j.d->st, j.p, j.n);
        pthread_mutex_lock(&s->dx_lock);
        s->dx_busy = 0;
        __atomic_store_n(&j.d->hashed, j.d->hashed + j.n, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&s->dx_done);
    }
    pthread_mutex_unlock(&s->dx_lock);
    return NULL;
}

/* Under s->lock: queue a chunk for the digest thread (started on first use). 0 if queued; -1: hash it here. */
static int dx_push(EndpointObject *s, dstate *d, const void *p, uint64_t n, int last) {
    if (!s->dx_started) {
        if (s->dx_stop || pthread_create(&s->dx_thread, NULL, dx_main, s) != 0) {
            __atomic_store_n(&s->dx_mode, 0, __ATOMIC_RELEASE); /* no thread: this endpoint hashes inline */
            return -1;
        }
        s->dx_started = 1;
        pthread_setname_np(s->dx_thread, "rdmapool-dx");
    }
    pthread_mutex_lock(&s->dx_lock);
    if (s->dx_tail - s->dx_head == s->dx_cap) {
        uint64_t ncap = s->dx_cap ? s->dx_cap * 2 : 64;
        dx_job *q = malloc(ncap * sizeof *q);
        if (!q) { pthread_mutex_unlock(&s->dx_lock); return -1; }
        for (uint64_t i = s->dx_head; i < s->dx_tail; i++) q[i & (ncap - 1)] = s->dx_q[i & (s->dx_cap - 1)];
        free(s->dx_q);
        s->dx_q = q;
        s->dx_cap = ncap;
    }
    s->dx_q[s->dx_tail++ & (s->dx_cap - 1)] = (dx_job){d, p, n};
    d->queued += n;
    int wake = s->dx_sleeping && (last || s->dx_tail - s->dx_head >= DX_WAKE_DEPTH);
    pthread_mutex_unlock(&s->dx_lock);
    if (wake) pthread_cond_signal(&s->dx_work);
    return 0;
}

/* Under s->lock: wait until every queued chunk is hashed and the thread is idle (before ops are released). */
static void dx_drain(EndpointObject *s) {
    if (!s->dx_started) return;
    pthread_mutex_lock(&s->dx_lock);
    if (s->dx_sleeping && s->dx_head != s->dx_tail) pthread_cond_signal(&s->dx_work); /* jobs it was not woken for */
    while (s->dx_head != s->dx_tail || s->dx_busy) pthread_cond_wait(&s->dx_done, &s->dx_lock);
    pthread_mutex_unlock(&s->dx_lock);
}

/* Stop the digest thread (lock not held; nothing queued: callers drained first). */
static void dx_stop_thread(EndpointObject *s) {
    pthread_mutex_lock(&s->lock);
    int started = s->dx_started;
    s->dx_started = 0;
    __atomic_store_n(&s->dx_stop, 1, __ATOMIC_RELAXED); /* dx_push reads it under `lock`, the thread atomically */
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_lock(&s->dx_lock); /* the thread checks it under dx_lock before it sleeps: no lost wake-up */
    pthread_cond_broadcast(&s->dx_work);
    pthread_mutex_unlock(&s->dx_lock);
    if (started) pthread_join(s->dx_thread, NULL);
}

/* Bytes [off, off+n) of op o's payload just landed: the part inside the digest SGE goes into the hash while it is
 * still in cache (hashing after the whole payload landed reads it back from L3/DRAM at a third of the speed):
 * here, or on the digest thread. */
static void op_digest_landed(EndpointObject *s, cop *o, uint64_t off, uint64_t n) {
    uint64_t lo = off > o->dstart ? off : o->dstart, hi = off + n < o->dend ? off + n : o->dend;
    if (lo >= hi) return;
    const void *p = (const void *)(uintptr_t)(o->sge[o->dsge].addr + (lo - o->dstart));
    if (__atomic_load_n(&s->dx_mode, __ATOMIC_RELAXED) && dx_push(s, o->digest, p, hi - lo, hi == o->dend) == 0) return;
    dx_drain(s); /* earlier chunks of this digest may still be queued: keep the order */
    XXH.update(&o->digest->st, p, hi - lo);
    o->digest->queued += hi - lo;
    __atomic_store_n(&o->digest->hashed, __atomic_load_n(&o->digest->hashed, __ATOMIC_RELAXED) + (hi - lo),
                     __ATOMIC_RELEASE);
}

/* Under s->lock: wait until the sender thread is outside sendmsg (its iovecs point into the ring and it uses the
 * fd), before the ring moves, ops are released or the fd closes. It starts no new send while anyone waits here. */
static void tx_quiesce(EndpointObject *s) {
    if (!s->tx_busy) return;
    s->tx_hold++;
    while (s->tx_busy) pthread_cond_wait(&s->tx_cond, &s->lock);
    if (!--s->tx_hold) pthread_cond_broadcast(&s->tx_cond); /* the sender resumes once this caller unlocks */
}

static void ep_close_fd(EndpointObject *s) {
    if (s->fd >= 0) { shutdown(s->fd, SHUT_RDWR); close(s->fd); s->fd = -1; }
}

/* Move to ERROR: `bad` (if in [head, tail)) completes with `status`, ops before it succeeded silently
 * (they are unsignalled WRITEs executed before it), everything after it flushes. */
static void complete_ready(EndpointObject *s);
static void ep_fail_ex(EndpointObject *s, uint64_t bad, int status, int flush_before) {
    tx_quiesce(s);
    dx_drain(s);       /* ops that landed whole before the failure complete first, with their digests */
    complete_ready(s);
    if (bad < s->head) bad = s->head;
    for (uint64_t q = s->head; q < s->tail; q++) {
        cop *o = OP(s, q);
        if (q == bad) cq_push(s, o->wr_id, status, o->opcode, 0, o->signaled);
        else if (q > bad || flush_before) cq_push(s, o->wr_id, ST_FLUSH, o->opcode, 0, o->signaled);
        op_release(s, o);
    }
    s->head = s->recv_seq = s->send_seq = s->landed = s->tail;
    s->recv_off = s->send_off = 0;
    __atomic_store_n(&s->state, EP_ERROR, __ATOMIC_RELEASE); /* read unlocked by the Python-facing checks */
    ep_close_fd(s);
}

static void ep_fail(EndpointObject *s, uint64_t bad, int status) { ep_fail_ex(s, bad, status, 0); }

/* Complete, in order, the ops that landed whole, up to the first whose digest the digest thread still owes. */
static void complete_ready(EndpointObject *s) {
    while (s->head < s->landed) {
        cop *o = OP(s, s->head);
        if (o->digest && __atomic_load_n(&o->digest->hashed, __ATOMIC_ACQUIRE) != o->digest->queued) break;
        if (o->signaled && o->digest) {
            unsigned char d[16];
            xxh3_canonical(XXH.digest(&o->digest->st), d);
            cq_push_digest(s, o->wr_id, ST_SUCCESS, o->opcode, o->len, 1, d);
        } else if (o->signaled) cq_push(s, o->wr_id, ST_SUCCESS, o->opcode, o->len, 1);
        op_release(s, o);
        s->head++;
    }
}

/* Ops up to `seq` landed whole (the unsignalled WRITEs among them executed). */
static void complete_upto(EndpointObject *s, uint64_t seq) {
    if (seq + 1 > s->landed) s->landed = seq + 1;
    complete_ready(s);
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

/* The unsent bytes of the queue (from send_seq/send_off) as iovecs: frame headers and WRITE payload SGEs. */
static int send_iov(EndpointObject *s, struct iovec *iov) {
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
    return n;
}

/* `left` bytes of the queue went out: advance send_seq/send_off past them. */
static void sent_bytes(EndpointObject *s, uint64_t left) {
    while (left && s->send_seq < s->tail) {
        cop *o = OP(s, s->send_seq);
        uint64_t total = REQ_HDR + (o->opcode == OP_WRITE ? o->len : 0);
        uint64_t rem = total - s->send_off;
        if (left >= rem) { left -= rem; s->send_seq++; s->send_off = 0; }
        else { s->send_off += left; left = 0; }
    }
}

static ssize_t send_chunk(int fd, struct iovec *iov, int n) {
    struct msghdr m = {0};
    size_t saved = 0;
    int last = -1;
    m.msg_iov = iov;
    m.msg_iovlen = iov_cap(iov, n, io_chunk_cli_send, &saved, &last);
    ssize_t w = sendmsg(fd, &m, MSG_DONTWAIT | MSG_NOSIGNAL);
    iov_restore(iov, saved, last);
    return w;
}

/* Send without blocking, in this thread. Returns -1 if the endpoint failed. */
static int ep_progress_send(EndpointObject *s) {
    while (s->send_seq < s->tail) {
        struct iovec iov[SEND_IOV];
        int n = send_iov(s, iov);
        ssize_t w = send_chunk(s->fd, iov, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            ep_fail(s, s->head, ST_RETRY_EXC);
            return -1;
        }
        sent_bytes(s, (uint64_t)w);
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
    size_t saved = 0;
    int last = -1;
    m.msg_iovlen = iov_cap(iov, n, io_chunk_cli_recv, &saved, &last); /* also non-blocking: digests hash what landed in cache */
    ssize_t r = recvmsg(s->fd, &m, block_one ? MSG_WAITALL : MSG_DONTWAIT);
    iov_restore(iov, saved, last);
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
        if (o->digest && take) op_digest_landed(s, o, s->recv_off - RESP_HDR, take);
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
    complete_ready(s); /* digests the digest thread finished since */
    if (s->state != EP_READY || s->fd < 0) return 0;
    if (!s->tx_mode && ep_progress_send(s) < 0) return -1;
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
    if (!s->tx_mode && s->send_seq < s->tail && s->state == EP_READY) ep_progress_send(s);
    return 0;
}

/* The oldest op whose ring slot is still in use. Usually `head`; but a response can complete an op before the
 * sender thread, back from the sendmsg that carried it, has counted it as sent (send_seq < head): until it has,
 * its iovecs may point at that op's header in the ring and its count reads the op's length there, so the slot
 * must not be reused (reusing it sent garbled headers: a failed or misdirected WRITE). */
static uint64_t ring_oldest(const EndpointObject *s) { return s->send_seq < s->head ? s->send_seq : s->head; }

static int ep_grow(EndpointObject *s, uint64_t need) {
    if (s->tail - ring_oldest(s) + need <= s->cap) return 0;
    tx_quiesce(s); /* the sender's iovecs point into the ring */
    uint64_t from = ring_oldest(s), used = s->tail - from;
    uint64_t ncap = s->cap ? s->cap : 256;
    while (ncap < used + need) ncap *= 2;
    cop *n = malloc(ncap * sizeof *n);
    if (!n) return -1;
    for (uint64_t q = from; q < s->tail; q++) n[q & (ncap - 1)] = *OP(s, q);
    free(s->ring);
    s->ring = n;
    s->cap = ncap;
    return 0;
}

/* Sender thread (tx_mode). On the tcp transport the bytes of a request move inside the caller's calls, so a caller
 * that works between posts (building and checksumming the next blocks) adds that work to the transfer time, while
 * a NIC sends on its own. With tx_mode, a backlog of bytes goes out on this thread: post() hands it over and
 * returns, and the caller's poll()/wait() only receive. post() still sends small requests itself when nothing is
 * queued (the latency path keeps no thread hop). The sender calls sendmsg with the lock released (tx_busy set):
 * whoever would move the ring, release ops or close the fd waits for it first (tx_quiesce). On where it is on: one
 * more busy thread, so only where the process has cores to spare (rdmapool/transport/tcp.py). */
#define TX_INLINE_MAX (64 * 1024) /* post() sends a request itself up to this many bytes when nothing is queued */

static void *tx_main(void *arg) {
    EndpointObject *s = arg;
    pthread_mutex_lock(&s->lock);
    while (!s->tx_stop) {
        if (s->tx_hold || s->state != EP_READY || s->fd < 0 || s->send_seq >= s->tail) {
            pthread_cond_wait(&s->tx_cond, &s->lock);
            continue;
        }
        struct iovec iov[SEND_IOV];
        int n = send_iov(s, iov), fd = s->fd;
        s->tx_busy = 1;
        pthread_mutex_unlock(&s->lock);
        ssize_t w = send_chunk(fd, iov, n);
        int err = errno;
        pthread_mutex_lock(&s->lock);
        if (w > 0) sent_bytes(s, (uint64_t)w);
        s->tx_busy = 0;
        pthread_cond_broadcast(&s->tx_cond);
        if (w < 0 && err != EINTR && err != EAGAIN && err != EWOULDBLOCK) {
            if (s->state == EP_READY) ep_fail(s, s->head, ST_RETRY_EXC);
        } else if (w < 0 && err != EINTR) {
            pthread_mutex_unlock(&s->lock);
            struct pollfd p = {.fd = fd, .events = POLLOUT};
            poll(&p, 1, 10); /* the fd may be closed meanwhile: the state is checked again under the lock */
            pthread_mutex_lock(&s->lock);
        }
    }
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

/* After a post (lock held): send it here when it is small and nothing else is queued, else wake the sender. */
static void tx_kick(EndpointObject *s, int was_idle, uint64_t new_bytes) {
    if (s->state != EP_READY || s->send_seq >= s->tail) return;
    if (was_idle && !s->tx_busy && new_bytes <= TX_INLINE_MAX) {
        if (ep_progress_send(s) < 0 || s->send_seq >= s->tail) return;
    }
    if (!s->tx_started && !s->tx_stop) {
        if (pthread_create(&s->tx_thread, NULL, tx_main, s) != 0) { /* no thread: this caller keeps sending */
            __atomic_store_n(&s->tx_mode, 0, __ATOMIC_RELEASE);
            ep_progress_send(s);
            return;
        }
        s->tx_started = 1;
        pthread_setname_np(s->tx_thread, "rdmapool-tx"); /* as `top -H` and tests see it */
    }
    pthread_cond_broadcast(&s->tx_cond);
}

/* Stop the sender thread (lock not held). */
static void tx_stop_thread(EndpointObject *s) {
    pthread_mutex_lock(&s->lock);
    s->tx_stop = 1;
    pthread_cond_broadcast(&s->tx_cond);
    int started = s->tx_started;
    s->tx_started = 0;
    pthread_mutex_unlock(&s->lock);
    if (started) pthread_join(s->tx_thread, NULL);
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
