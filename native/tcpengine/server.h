/* The serving side: one thread per accepted connection (part of rdmapool._tcpengine: included by native/tcpengine.c, one translation unit) */
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
            if (__atomic_load_n(&e->closing, __ATOMIC_ACQUIRE)) return NULL;
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
