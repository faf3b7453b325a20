/* The Python Endpoint type: connect, post, post_plan, poll, wait, close (part of rdmapool._tcpengine: included by native/tcpengine.c, one translation unit) */
static int Endpoint_init(EndpointObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"engine", "host", "port", "timeout", "spin_us", "sender", "digester", NULL};
    PyObject *eng;
    const char *host;
    int port, spin_us = 50, sender = 0, digester = 0;
    double timeout = 5.0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!si|dipp", kwlist, &EngineType, &eng, &host, &port, &timeout, &spin_us,
                                     &sender, &digester))
        return -1;
    if (!((EngineObject *)eng)->e || ((EngineObject *)eng)->e->closed) { engine_closed(); return -1; }
    self->fd = -1;
    pthread_mutex_init(&self->lock, NULL);
    pthread_cond_init(&self->tx_cond, NULL);
    pthread_mutex_init(&self->dx_lock, NULL);
    pthread_cond_init(&self->dx_work, NULL);
    pthread_cond_init(&self->dx_done, NULL);
    __atomic_store_n(&self->tx_mode, sender, __ATOMIC_RELEASE);
    __atomic_store_n(&self->dx_mode, digester && have_digest, __ATOMIC_RELEASE);
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
    __atomic_store_n(&self->state, EP_READY, __ATOMIC_RELEASE);
    ep_register(self);
    return 0;
}

typedef struct {
    uint64_t wr_id, remote, cmp, swp;
    uint32_t rkey;
    int opcode, signaled, nsge, dsge; /* dsge: SGE to digest (READ), -1 none */
    uint64_t sge[MAX_SGE][2];
    uint32_t lkey[MAX_SGE];
} pending_t;

/* The field names parse_wr reads, interned once (PyObject_GetAttrString decoded and hashed each name on every
 * request: ~18 times for a three-SGE WRITE). */
enum { F_WR_ID, F_OPCODE, F_REMOTE_ADDR, F_RKEY, F_COMPARE, F_SWAP, F_SIGNALED, F_SGL, F_DIGEST, F_ADDR, F_LENGTH,
       F_LKEY, F_COUNT };
static PyObject *fields[F_COUNT];

static int intern_fields(void) {
    static const char *const names[F_COUNT] = {"wr_id", "opcode", "remote_addr", "rkey", "compare", "swap",
                                               "signaled", "sgl", "digest", "addr", "length", "lkey"};
    for (int i = 0; i < F_COUNT; i++)
        if (!fields[i] && !(fields[i] = PyUnicode_InternFromString(names[i]))) return -1;
    return 0;
}

static int get_u64(PyObject *o, int field, uint64_t *out) {
    PyObject *v = PyObject_GetAttr(o, fields[field]);
    if (!v) return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(UsageError, "work request field %U must be a non-negative integer below 2**64", fields[field]);
        return -1;
    }
    *out = x;
    return 0;
}

static int parse_wr(PyObject *wr, pending_t *p) {
    uint64_t v;
    if (get_u64(wr, F_WR_ID, &p->wr_id) < 0 || get_u64(wr, F_OPCODE, &v) < 0) return -1;
    p->opcode = (int)v;
    if (get_u64(wr, F_REMOTE_ADDR, &p->remote) < 0 || get_u64(wr, F_RKEY, &v) < 0) return -1;
    if (v >= (1ULL << 32)) { PyErr_Format(UsageError, "wr %llu: rkey does not fit in 32 bits", (unsigned long long)p->wr_id); return -1; }
    p->rkey = (uint32_t)v;
    if (get_u64(wr, F_COMPARE, &p->cmp) < 0 || get_u64(wr, F_SWAP, &p->swp) < 0) return -1;
    PyObject *sig = PyObject_GetAttr(wr, fields[F_SIGNALED]);
    if (!sig) return -1;
    p->signaled = PyObject_IsTrue(sig);
    Py_DECREF(sig);
    PyObject *sgl = PyObject_GetAttr(wr, fields[F_SGL]);
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
        if (get_u64(g, F_ADDR, &p->sge[i][0]) < 0 || get_u64(g, F_LENGTH, &p->sge[i][1]) < 0 ||
            get_u64(g, F_LKEY, &lk) < 0) { Py_DECREF(seq); return -1; }
        p->lkey[i] = (uint32_t)lk;
    }
    Py_DECREF(seq);
    p->dsge = -1;
    PyObject *dg = PyObject_GetAttr(wr, fields[F_DIGEST]);
    if (!dg) PyErr_Clear(); /* a request type without digests */
    else {
        if (dg != Py_None && p->opcode == OP_READ && have_digest) {
            long i = PyLong_AsLong(dg);
            if (i == -1 && PyErr_Occurred()) { Py_DECREF(dg); return -1; }
            if (i < 0 || i >= p->nsge) {
                Py_DECREF(dg);
                PyErr_Format(UsageError, "wr %llu: digest must index an SGE", (unsigned long long)p->wr_id);
                return -1;
            }
            p->dsge = (int)i;
        }
        Py_DECREF(dg);
    }
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
    o->digest = NULL;
    o->dsge = p->dsge;
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
    if (o->dsge >= 0 && p->signaled) {
        o->digest = aligned_alloc(64, (sizeof(dstate) + 63) / 64 * 64);
        if (o->digest) {
            XXH3_128bits_reset(&o->digest->st);
            o->digest->queued = o->digest->hashed = 0;
            o->dstart = 0;
            for (int i = 0; i < o->dsge; i++) o->dstart += o->sge[i].len;
            o->dend = o->dstart + o->sge[o->dsge].len;
        } /* out of memory: no digest, the caller hashes (Completion.digest is None) */
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

/* The closed check of the Python-facing calls, made without the endpoint lock (state changes under it). */
static int ep_closed(EndpointObject *s) { return __atomic_load_n(&s->state, __ATOMIC_ACQUIRE) == EP_CLOSED; }

static PyObject *ep_closed_err(void) {
    PyErr_SetString(UsageError, "endpoint is closed");
    return NULL;
}

static void ep_post_pending(EndpointObject *s, pending_t *ps, Py_ssize_t n) {
    pthread_mutex_lock(&s->lock);
    if (ep_grow(s, (uint64_t)n) == 0) {
        int was_idle = s->send_seq >= s->tail;
        uint64_t bytes = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (ps[i].signaled) s->outstanding++;
            ep_enqueue(s, &ps[i]);
            bytes += REQ_HDR;
            if (ps[i].opcode == OP_WRITE)
                for (int k = 0; k < ps[i].nsge; k++) bytes += ps[i].sge[k][1];
        }
        if (s->tx_mode) tx_kick(s, was_idle, bytes);
        ep_progress(s);
    } else {
        for (Py_ssize_t i = 0; i < n; i++) cq_push(s, ps[i].wr_id, ST_GENERAL, ps[i].opcode, 0, ps[i].signaled);
    }
    pthread_mutex_unlock(&s->lock);
}

static PyObject *Endpoint_post(EndpointObject *self, PyObject *arg) {
    if (ep_closed(self)) return ep_closed_err();
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
    if (ep_closed(self)) { ep_closed_err(); goto out; }
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
        p->dsge = -1;
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
        PyObject *t = c->has_digest
            ? Py_BuildValue("KiiKy#", (unsigned long long)c->wr_id, c->status, c->opcode,
                            (unsigned long long)c->byte_len, (const char *)c->digest, (Py_ssize_t)16)
            : Py_BuildValue("KiiK", (unsigned long long)c->wr_id, c->status, c->opcode,
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
    if (ep_closed(self)) return ep_closed_err();
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
    if (ep_closed(self)) return ep_closed_err();
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
        short events = POLLIN | (!self->tx_mode && self->send_seq < self->tail ? POLLOUT : 0);
        int idle = self->head >= self->tail;
        skip_silent(self);
        /* a large payload is on its way: wait for it in one MSG_WAITALL recv rather than spinning on chunks */
        int big = self->state == EP_READY && fd >= 0 && self->recv_seq < self->send_seq &&
                  resp_payload(OP(self, self->recv_seq)) >= BLOCKING_RECV_MIN;
        /* everything owed landed and only digests are due: wait for the digest thread, not for the socket */
        int digests_due = self->head < self->landed && self->recv_seq >= self->tail;
        pthread_mutex_unlock(&self->lock);
        if (have >= count || fd < 0 || idle) break;
        uint64_t t = now_ns();
        if (t >= deadline) break;
        if (digests_due) {
            pthread_mutex_lock(&self->dx_lock);
            if (self->dx_sleeping && self->dx_head != self->dx_tail) pthread_cond_signal(&self->dx_work);
            if (self->dx_head != self->dx_tail || self->dx_busy) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 1000000; /* 1 ms at most: the deadline is checked in the loop */
                if (ts.tv_nsec >= 1000000000) { ts.tv_sec++; ts.tv_nsec -= 1000000000; }
                pthread_cond_timedwait(&self->dx_done, &self->dx_lock, &ts);
            }
            pthread_mutex_unlock(&self->dx_lock);
            continue;
        }
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
    tx_stop_thread(s);
    pthread_mutex_lock(&s->lock);
    dx_drain(s); /* the digest thread reads the ops' memory until then */
    pthread_mutex_unlock(&s->lock);
    dx_stop_thread(s);
    pthread_mutex_lock(&s->lock);
    if (s->state != EP_CLOSED && s->e) {
        for (uint64_t q = s->head; q < s->tail; q++) op_release(s, OP(s, q));
        s->head = s->recv_seq = s->send_seq = s->landed = s->tail;
        ep_close_fd(s);
        __atomic_store_n(&s->state, EP_CLOSED, __ATOMIC_RELEASE);
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
    pthread_cond_destroy(&self->tx_cond);
    pthread_mutex_destroy(&self->dx_lock);
    pthread_cond_destroy(&self->dx_work);
    pthread_cond_destroy(&self->dx_done);
    free(self->dx_q);
    Py_XDECREF(self->engine_obj);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Endpoint_state(EndpointObject *self, void *c) {
    return PyLong_FromLong(__atomic_load_n(&self->state, __ATOMIC_ACQUIRE));
}
static PyObject *Endpoint_outstanding(EndpointObject *self, void *c) { return PyLong_FromLong(self->outstanding); }
static PyObject *Endpoint_sender(EndpointObject *self, void *c) {
    return PyBool_FromLong(__atomic_load_n(&self->tx_mode, __ATOMIC_ACQUIRE));
}
static PyObject *Endpoint_digester(EndpointObject *self, void *c) {
    return PyBool_FromLong(__atomic_load_n(&self->dx_mode, __ATOMIC_ACQUIRE));
}

static PyMethodDef Endpoint_methods[] = {
    {"post", (PyCFunction)Endpoint_post, METH_O, "post(work_requests)"},
    {"post_plan", (PyCFunction)Endpoint_post_plan, METH_VARARGS, "post a prepared plan with index pairs"},
    {"poll", (PyCFunction)Endpoint_poll, METH_VARARGS, "poll(max) -> [(wr_id, status, opcode, byte_len[, digest])]"},
    {"wait", (PyCFunction)Endpoint_wait, METH_VARARGS, "wait(count, timeout) -> completions"},
    {"close", (PyCFunction)Endpoint_close, METH_NOARGS, "close; outstanding requests are dropped"},
    {NULL}};
static PyGetSetDef Endpoint_getset[] = {
    {"state", (getter)Endpoint_state, NULL, "0 ready, 1 error, 2 closed", NULL},
    {"outstanding", (getter)Endpoint_outstanding, NULL, "signalled requests not yet returned", NULL},
    {"sender", (getter)Endpoint_sender, NULL, "whether backlogs go out on a sender thread (off if it could not start)",
     NULL},
    {"digester", (getter)Endpoint_digester, NULL,
     "whether READ digests are hashed on a digest thread (off if it could not start, or without digests)", NULL},
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
