/* The Python Engine type: registration, deregistration, close (part of rdmapool._tcpengine: included by native/tcpengine.c, one translation unit) */
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
    if (!e || __atomic_load_n(&e->closing, __ATOMIC_ACQUIRE)) return engine_closed();
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
    __atomic_store_n(&e->closing, 1, __ATOMIC_RELEASE); /* read unlocked by accept_main and register */
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
