/* rdmapool._hashpool: payload checksums (xxh3-128) of a batch of blocks on native threads.
 *
 * Why: Python worker threads (concurrent.futures) hashed large payloads with the GIL released, but each hash
 * still took the GIL to start, to set its future's result and to wake the waiter, and the caller's thread, which
 * drives the transport, queued behind them for it on every system call it made. These threads never touch the
 * interpreter: a batch's buffers are pinned (Py_buffer) when it is made, workers claim blocks in order with one
 * atomic add and publish each digest with one atomic store, and the caller polls `done(i)` for free or waits in
 * `wait(i, timeout)` with the GIL released (hashing the block itself when no worker has claimed it yet, and,
 * while a worker hashes it, the batch's blocks nobody has claimed: see help_until_done).
 *
 * start(threads) sizes the process's pool (again after a fork: threads do not survive one);
 * Batch(buffers) queues every buffer's hash; done(i) -> bool; wait(i, timeout) -> 16 canonical bytes (as
 * xxhash.xxh3_128_digest returns), or TimeoutError. A Batch dropped early cancels what no worker started and
 * waits for what they did before it lets go of the buffers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "xxhash/kernels.h" /* native/xxhash/kernels.h: the best xxh3 kernel this CPU runs */

enum { S_PENDING = 0, S_CLAIMED, S_DONE };
#define MAX_THREADS 64

struct batch {
    Py_ssize_t n;
    const unsigned char **ptr;
    size_t *len;
    unsigned char (*digest)[16];
    int *state;       /* S_*: atomic */
    Py_ssize_t next;  /* next index a worker claims: atomic */
    int active;       /* workers hashing one of its blocks (under the pool lock) */
    int queued;       /* still in the pool's queue (under the pool lock) */
    struct batch *qnext;
};

static struct {
    pthread_mutex_t mu;
    pthread_cond_t work;   /* a batch was queued */
    pthread_cond_t landed; /* a digest was published (waiters sleep here after spinning) */
    struct batch *head, *tail;
    int threads;
    pid_t pid;
} P = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, 0, 0};

static void hash_one(struct batch *b, Py_ssize_t i) {
    xxh3_canonical(XXH.oneshot(b->ptr[i], b->len[i]), b->digest[i]);
    __atomic_store_n(&b->state[i], S_DONE, __ATOMIC_RELEASE);
}

static int claim(struct batch *b, Py_ssize_t i) {
    int want = S_PENDING;
    return __atomic_compare_exchange_n(&b->state[i], &want, S_CLAIMED, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}

static void dequeue_locked(struct batch *b) {
    struct batch **pp = &P.head, *prev = NULL;
    while (*pp && *pp != b) { prev = *pp; pp = &(*pp)->qnext; }
    if (!*pp) return;
    *pp = b->qnext;
    if (P.tail == b) P.tail = prev;
    b->queued = 0;
}

static void *worker(void *arg) {
    (void)arg;
    pthread_mutex_lock(&P.mu);
    for (;;) {
        while (!P.head) pthread_cond_wait(&P.work, &P.mu);
        struct batch *b = P.head;
        Py_ssize_t i = __atomic_fetch_add(&b->next, 1, __ATOMIC_ACQ_REL);
        if (i >= b->n) {
            dequeue_locked(b);
            continue;
        }
        b->active++;
        pthread_mutex_unlock(&P.mu);
        if (claim(b, i)) hash_one(b, i);
        pthread_mutex_lock(&P.mu);
        b->active--;
        pthread_cond_broadcast(&P.landed);
    }
    return NULL;
}

/* The pool for this process: threads started on first use and again in a forked child. */
static int ensure_pool(int want) {
    pid_t me = getpid();
    if (P.pid != me) {
        pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
        pthread_cond_t c1 = PTHREAD_COND_INITIALIZER, c2 = PTHREAD_COND_INITIALIZER;
        P.mu = fresh;
        P.work = c1;
        P.landed = c2;
        P.head = P.tail = NULL;
        P.threads = 0;
        P.pid = me;
    }
    if (want > MAX_THREADS) want = MAX_THREADS;
    pthread_mutex_lock(&P.mu);
    int err = 0;
    while (P.threads < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        err = pthread_create(&t, &attr, worker, NULL);
        pthread_attr_destroy(&attr);
        if (err) break;
        P.threads++;
    }
    pthread_mutex_unlock(&P.mu);
    return err;
}

static PyObject *py_start(PyObject *self, PyObject *arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "hash pool needs at least one thread");
        return NULL;
    }
    if (ensure_pool((int)n)) {
        PyErr_SetString(PyExc_OSError, "hash pool: could not start a thread");
        return NULL;
    }
    return PyLong_FromLong(P.threads);
}

typedef struct {
    PyObject_HEAD
    struct batch b;
    Py_buffer *views;
    Py_ssize_t nviews;
    pid_t pid;
} BatchObject;

/* Cancel what no worker claimed and wait for the blocks they hash (they read the buffers); no GIL needed. */
static void batch_cancel(struct batch *b) {
    pthread_mutex_lock(&P.mu);
    if (b->queued) dequeue_locked(b);
    __atomic_store_n(&b->next, b->n, __ATOMIC_RELEASE);
    while (b->active) {
        pthread_mutex_unlock(&P.mu);
        sched_yield();
        pthread_mutex_lock(&P.mu);
    }
    pthread_mutex_unlock(&P.mu);
}

static void Batch_dealloc(BatchObject *self) {
    struct batch *b = &self->b;
    if (b->n && self->pid == getpid()) {
        Py_BEGIN_ALLOW_THREADS
        batch_cancel(b);
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t i = 0; i < self->nviews; i++) PyBuffer_Release(&self->views[i]);
    PyMem_Free(self->views);
    PyMem_Free((void *)b->ptr);
    PyMem_Free(b->len);
    PyMem_Free(b->digest);
    PyMem_Free(b->state);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Batch_init(BatchObject *self, PyObject *args, PyObject *kw) {
    PyObject *seq;
    static char *names[] = {"buffers", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O", names, &seq)) return -1;
    if (self->nviews) {
        PyErr_SetString(PyExc_RuntimeError, "a Batch is made once");
        return -1;
    }
    if (!P.threads || P.pid != getpid()) {
        PyErr_SetString(PyExc_RuntimeError, "hash pool not started in this process (call start first)");
        return -1;
    }
    PyObject *fast = PySequence_Fast(seq, "Batch takes a sequence of buffers");
    if (!fast) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    struct batch *b = &self->b;
    self->views = PyMem_Calloc(n ? n : 1, sizeof *self->views);
    b->ptr = PyMem_Calloc(n ? n : 1, sizeof *b->ptr);
    b->len = PyMem_Calloc(n ? n : 1, sizeof *b->len);
    b->digest = PyMem_Calloc(n ? n : 1, sizeof *b->digest);
    b->state = PyMem_Calloc(n ? n : 1, sizeof *b->state);
    if (!self->views || !b->ptr || !b->len || !b->digest || !b->state) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &self->views[i], PyBUF_SIMPLE) < 0) {
            Py_DECREF(fast);
            return -1;
        }
        self->nviews = i + 1;
        b->ptr[i] = self->views[i].buf;
        b->len[i] = (size_t)self->views[i].len;
    }
    Py_DECREF(fast);
    self->pid = getpid();
    b->n = n;
    if (n) {
        pthread_mutex_lock(&P.mu);
        b->queued = 1;
        b->qnext = NULL;
        if (P.tail) P.tail->qnext = b; else P.head = b;
        P.tail = b;
        pthread_cond_broadcast(&P.work);
        pthread_mutex_unlock(&P.mu);
    }
    return 0;
}

static int index_ok(BatchObject *self, Py_ssize_t i) {
    if (i < 0 || i >= self->b.n) {
        PyErr_Format(PyExc_IndexError, "block %zd of a batch of %zd", i, self->b.n);
        return 0;
    }
    return 1;
}

static PyObject *Batch_done(BatchObject *self, PyObject *args) {
    Py_ssize_t i = 0;
    if (!PyArg_ParseTuple(args, "|n", &i)) return NULL;
    if (!index_ok(self, i)) return NULL;
    return PyBool_FromLong(__atomic_load_n(&self->b.state[i], __ATOMIC_ACQUIRE) == S_DONE);
}

static double mono_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e9 + (double)t.tv_nsec;
}

/* Block i is being hashed by a worker. Rather than sleep until it lands (and need waking: on a VM a sleeping
 * thread's wake-up can take far longer than a small block's hash), the waiter works as one more worker on
 * the blocks of this batch nobody claimed yet, then spins up to HELP_SPIN_NS. Returns whether block i landed;
 * if not, the caller sleeps on `landed` as before. Blocks hashed here are announced on `landed` like a
 * worker's, for any other thread waiting on them. */
#define HELP_SPIN_NS 100000.0
static int help_until_done(struct batch *b, Py_ssize_t i) {
    int helped = 0;
    while (__atomic_load_n(&b->state[i], __ATOMIC_ACQUIRE) != S_DONE) {
        Py_ssize_t j = __atomic_fetch_add(&b->next, 1, __ATOMIC_ACQ_REL);
        if (j >= b->n) break;
        if (claim(b, j)) {
            hash_one(b, j);
            helped = 1;
        }
    }
    if (helped) {
        pthread_mutex_lock(&P.mu);
        pthread_cond_broadcast(&P.landed);
        pthread_mutex_unlock(&P.mu);
    }
    double until = mono_ns() + HELP_SPIN_NS;
    while (__atomic_load_n(&b->state[i], __ATOMIC_ACQUIRE) != S_DONE) {
        for (int spin = 0; spin < 64; spin++) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
        if (mono_ns() >= until) return 0;
    }
    return 1;
}

static PyObject *Batch_wait(BatchObject *self, PyObject *args) {
    Py_ssize_t i;
    double timeout;
    if (!PyArg_ParseTuple(args, "nd", &i, &timeout)) return NULL;
    if (!index_ok(self, i)) return NULL;
    struct batch *b = &self->b;
    int ok = 1;
    if (__atomic_load_n(&b->state[i], __ATOMIC_ACQUIRE) != S_DONE) {
        Py_BEGIN_ALLOW_THREADS
        if (claim(b, i)) {
            hash_one(b, i); /* nobody had started it: hashing it here beats waiting behind the queue */
        } else if (!help_until_done(b, i)) {
            struct timespec now, end;
            clock_gettime(CLOCK_REALTIME, &now);
            double t = timeout > 0 ? timeout : 0;
            if (t > 1e6) t = 1e6;
            end.tv_sec = now.tv_sec + (time_t)t;
            end.tv_nsec = now.tv_nsec + (long)((t - (double)(time_t)t) * 1e9);
            if (end.tv_nsec >= 1000000000L) { end.tv_sec++; end.tv_nsec -= 1000000000L; }
            pthread_mutex_lock(&P.mu);
            while (__atomic_load_n(&b->state[i], __ATOMIC_ACQUIRE) != S_DONE) {
                if (pthread_cond_timedwait(&P.landed, &P.mu, &end) != 0 &&
                    __atomic_load_n(&b->state[i], __ATOMIC_ACQUIRE) != S_DONE) {
                    ok = 0;
                    break;
                }
            }
            pthread_mutex_unlock(&P.mu);
        }
        Py_END_ALLOW_THREADS
    }
    if (!ok) {
        PyErr_SetString(PyExc_TimeoutError, "payload checksum did not finish in time");
        return NULL;
    }
    return PyBytes_FromStringAndSize((const char *)b->digest[i], 16);
}

static Py_ssize_t Batch_len(BatchObject *self) { return self->b.n; }

static PyMethodDef Batch_methods[] = {
    {"done", (PyCFunction)Batch_done, METH_VARARGS, "done(i=0): whether block i's digest is ready (never blocks)."},
    {"wait", (PyCFunction)Batch_wait, METH_VARARGS,
     "wait(i, timeout) -> block i's 16-byte digest; TimeoutError when it is not ready in time."},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Batch_as_sequence = {.sq_length = (lenfunc)Batch_len};

static PyTypeObject BatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "rdmapool._hashpool.Batch",
    .tp_basicsize = sizeof(BatchObject),
    .tp_dealloc = (destructor)Batch_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "xxh3-128 digests of a list of buffers, computed on the pool's native threads.",
    .tp_methods = Batch_methods,
    .tp_as_sequence = &Batch_as_sequence,
    .tp_init = (initproc)Batch_init,
    .tp_new = PyType_GenericNew,
};

static PyMethodDef module_methods[] = {
    {"start", py_start, METH_O, "start(threads) -> the pool's thread count (grown to at least `threads`)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "rdmapool._hashpool",
                                    "Payload checksums of a batch on native threads.", -1, module_methods};

PyMODINIT_FUNC PyInit__hashpool(void) {
    if (PyType_Ready(&BatchType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (xxh3_pick() < 0 || PyModule_AddStringConstant(m, "KERNEL", XXH.isa) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&BatchType);
    if (PyModule_AddObject(m, "Batch", (PyObject *)&BatchType) < 0) {
        Py_DECREF(&BatchType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
