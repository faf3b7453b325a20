/* rdmapool._shmatomics: CPU atomics and the batch mover of the shm transport.
 *
 * Theory of operation
 * -------------------
 * The shm transport maps a serving process's POSIX shared-memory regions into the client. One-sided
 * operations then become plain CPU work on that mapping: READ/WRITE are memcpy, CAS/FAA are 8-byte
 * atomic instructions (lock cmpxchg / lock xadd on x86), which are coherent across every process that
 * maps the same pages.
 *
 * `run(ops, nops, state_ptr, state_expect, pidfd)` executes a packed batch of records (struct op below)
 * in order. Before each record it checks the region's valid word (`*valid_ptr == valid_expect`, an
 * acquire load): a region deregistered by its owner fails from that record on. After the whole batch it
 * checks that the owner is alive: the header state word still says OPEN and the owner's pidfd is not
 * readable (a pidfd becomes readable when the process exits). Checking *after* the batch means a batch
 * reported successful ran entirely while the owner was alive; before the batch only the state word is read
 * (a dead owner's batch is caught by the check after it). The GIL is released when the batch moves
 * enough bytes for that to pay off, so other Python threads run during large copies.
 *
 * Everything here trusts the addresses it is given: the Python layer checks keys and bounds first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <poll.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

enum { OP_READ = 1, OP_WRITE = 2, OP_CAS = 3, OP_FAA = 4 };
/* A record the caller must execute itself (a copy to or from GPU memory): run() stops before it. */
enum { OP_HANDOFF = 0x100 };
/* A READ/WRITE record whose local bytes are hashed as they move: the digest lands in compare/swap (digest.h). */
enum { OP_DIGEST = 0x200 };
/* Fault in the page tables of [remote, remote + len) of a mapping this process reaches for the first time
 * (madvise advice in `compare`: MADV_POPULATE_WRITE or _READ), before the copy that follows: one call costs
 * ~0.1 ms per MiB, where the copy's own page faults cost ~0.45 ms per MiB (this VM). Errors (a kernel before
 * 5.14) are ignored: the copy then faults as before. */
enum { OP_POPULATE = 5 };
enum { ST_OK = 0, ST_HANDOFF = 1, ST_REM_ACCESS = 10, ST_RETRY_EXC = 12 };

/* One record; a READ/WRITE with several local SGEs becomes several records. 64 bytes, little-endian. */
struct op {
    uint32_t opcode;
    uint32_t pad;
    uint64_t local;
    uint64_t remote;
    uint64_t len;
    uint64_t compare;
    uint64_t swap;
    uint64_t valid_ptr;
    uint64_t valid_expect;
};

#define GIL_RELEASE_BYTES (256u * 1024u)

#include "xxhash/digest.h"
static int have_digest;

static int get_u64(PyObject *o, uint64_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    *out = (uint64_t)v;
    return 0;
}

static PyObject *py_load64(PyObject *self, PyObject *arg) {
    uint64_t addr;
    if (get_u64(arg, &addr) < 0) return NULL;
    return PyLong_FromUnsignedLongLong(__atomic_load_n((uint64_t *)(uintptr_t)addr, __ATOMIC_ACQUIRE));
}

static PyObject *py_store64(PyObject *self, PyObject *args) {
    unsigned long long addr, value;
    if (!PyArg_ParseTuple(args, "KK", &addr, &value)) return NULL;
    __atomic_store_n((uint64_t *)(uintptr_t)addr, (uint64_t)value, __ATOMIC_RELEASE);
    Py_RETURN_NONE;
}

static PyObject *py_cas64(PyObject *self, PyObject *args) {
    unsigned long long addr, expected, desired;
    if (!PyArg_ParseTuple(args, "KKK", &addr, &expected, &desired)) return NULL;
    if (addr % 8) { PyErr_SetString(PyExc_ValueError, "cas64: address not 8-byte aligned"); return NULL; }
    uint64_t old = (uint64_t)expected;
    __atomic_compare_exchange_n((uint64_t *)(uintptr_t)addr, &old, (uint64_t)desired, 0, __ATOMIC_SEQ_CST,
                                __ATOMIC_SEQ_CST);
    return PyLong_FromUnsignedLongLong(old);
}

static PyObject *py_faa64(PyObject *self, PyObject *args) {
    unsigned long long addr, add;
    if (!PyArg_ParseTuple(args, "KK", &addr, &add)) return NULL;
    if (addr % 8) { PyErr_SetString(PyExc_ValueError, "faa64: address not 8-byte aligned"); return NULL; }
    return PyLong_FromUnsignedLongLong(__atomic_fetch_add((uint64_t *)(uintptr_t)addr, (uint64_t)add,
                                                          __ATOMIC_SEQ_CST));
}

static void do_copy(void *dst, const void *src, size_t n) { memcpy(dst, src, n); }

/* copy(dst, src, n): memcpy between raw addresses, GIL released for large copies. */
static PyObject *py_copy(PyObject *self, PyObject *args) {
    unsigned long long dst, src, n;
    if (!PyArg_ParseTuple(args, "KKK", &dst, &src, &n)) return NULL;
    if (n >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        do_copy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, (size_t)n);
        Py_END_ALLOW_THREADS
    } else {
        do_copy((void *)(uintptr_t)dst, (const void *)(uintptr_t)src, (size_t)n);
    }
    Py_RETURN_NONE;
}

/* copy_blocks(dst, src, size, count): `count` memcpy calls of `size` bytes over consecutive blocks, GIL
 * released: the plain-memcpy limit the benchmarks compare the transport against. */
static PyObject *py_copy_blocks(PyObject *self, PyObject *args) {
    unsigned long long dst, src, size, count;
    if (!PyArg_ParseTuple(args, "KKKK", &dst, &src, &size, &count)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    for (uint64_t i = 0; i < count; i++)
        do_copy((void *)(uintptr_t)(dst + i * size), (const void *)(uintptr_t)(src + i * size), (size_t)size);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* address(buffer, writable) -> (addr, nbytes) of a C-contiguous buffer. The caller keeps the buffer
 * alive (and unresizable) by holding a memoryview of it. */
static PyObject *py_address(PyObject *self, PyObject *args) {
    PyObject *obj;
    int writable = 1;
    if (!PyArg_ParseTuple(args, "O|p", &obj, &writable)) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, (writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    PyObject *res = Py_BuildValue("(Kn)", (unsigned long long)(uintptr_t)view.buf, view.len);
    PyBuffer_Release(&view);
    return res;
}

static int peer_gone(const uint64_t *state_ptr, uint64_t state_expect, int pidfd) {
    if (state_ptr && __atomic_load_n(state_ptr, __ATOMIC_ACQUIRE) != state_expect) return 1;
    if (pidfd >= 0) {
        struct pollfd p = {.fd = pidfd, .events = POLLIN};
        int r = poll(&p, 1, 0);
        if (r != 0) return 1; /* exited (readable) or the pidfd is unusable: do not trust the memory */
    }
    return 0;
}

/* Returns (done, status): records [0, done) completed; status is ST_OK, or the reason record `done` failed
 * (ST_REM_ACCESS), or ST_HANDOFF when record `done` is one the caller executes, or ST_RETRY_EXC when the owner
 * is gone (then nothing of this batch may be trusted). */
/* A Mover passes itself: its digest records may be hashed by a waiting thread (mover_digest) instead of fused. */
struct Mover_s;
static int mover_digest(struct Mover_s *m, void *dst, const void *src, size_t n, int hash_dst, unsigned char *out);

static void run_ops(struct op *ops, Py_ssize_t n, const uint64_t *state_ptr, uint64_t state_expect,
                    int pidfd, Py_ssize_t *done, int *status, struct Mover_s *mover) {
    *done = 0;
    *status = ST_OK;
    /* Before: only the cheap state word (a clean close). The pidfd poll is a syscall (~1 us here), so it runs
     * once, after the batch, which is the check that matters. */
    if (peer_gone(state_ptr, state_expect, -1)) { *status = ST_RETRY_EXC; return; }
    for (Py_ssize_t i = 0; i < n; i++) {
        struct op *o = &ops[i];
        if (o->opcode & OP_HANDOFF) {
            *done = i;
            *status = ST_HANDOFF;
            break;
        }
        if (__atomic_load_n((const uint64_t *)(uintptr_t)o->valid_ptr, __ATOMIC_ACQUIRE) != o->valid_expect) {
            *done = i;
            *status = ST_REM_ACCESS;
            break;
        }
        void *local = (void *)(uintptr_t)o->local;
        uint64_t *remote = (uint64_t *)(uintptr_t)o->remote;
        uint64_t old;
        if ((o->opcode & OP_DIGEST) && have_digest) {
            /* compare/swap receive the digest: 16 bytes, canonical order */
            unsigned char *out = (unsigned char *)o + offsetof(struct op, compare);
            if ((o->opcode & ~OP_DIGEST) == OP_READ) {
                if (!mover || !mover_digest(mover, local, remote, o->len, 1, out)) copy_digest(local, remote, o->len, 1, out);
            } else if ((o->opcode & ~OP_DIGEST) == OP_WRITE) {
                if (!mover || !mover_digest(mover, remote, local, o->len, 0, out)) copy_digest(remote, local, o->len, 0, out);
            } else { *done = i; *status = ST_REM_ACCESS; return; }
            *done = i + 1;
            continue;
        }
        switch (o->opcode & ~OP_DIGEST) {
        case OP_READ: memcpy(local, remote, o->len); break;
        case OP_WRITE: memcpy(remote, local, o->len); break;
        case OP_CAS:
            old = o->compare;
            __atomic_compare_exchange_n(remote, &old, o->swap, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
            memcpy(local, &old, 8);
            break;
        case OP_FAA:
            old = __atomic_fetch_add(remote, o->compare, __ATOMIC_SEQ_CST);
            memcpy(local, &old, 8);
            break;
        case OP_POPULATE: (void)madvise((void *)remote, o->len, (int)o->compare); break;
        default: *done = i; *status = ST_REM_ACCESS; return;
        }
        *done = i + 1;
    }
    /* Our stores are visible to every process before the completion says so (a no-op ordering on x86 TSO,
     * a real barrier on weakly ordered CPUs), and ordered before the liveness re-check. */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (peer_gone(state_ptr, state_expect, pidfd)) *status = ST_RETRY_EXC;
}

static PyObject *py_run(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t nops;
    unsigned long long state_addr, state_expect;
    int pidfd;
    /* writable: digest records get their result written back (compare/swap) */
    if (!PyArg_ParseTuple(args, "w*nKKi", &buf, &nops, &state_addr, &state_expect, &pidfd)) return NULL;
    if (nops < 0 || (size_t)buf.len < (size_t)nops * sizeof(struct op)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "run: op buffer shorter than nops records");
        return NULL;
    }
    struct op *ops = (struct op *)buf.buf;
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < nops; i++) total += ops[i].len;
    Py_ssize_t done;
    int status;
    const uint64_t *state_ptr = (const uint64_t *)(uintptr_t)state_addr;
    if (total >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        run_ops(ops, nops, state_ptr, state_expect, pidfd, &done, &status, NULL);
        Py_END_ALLOW_THREADS
    } else {
        run_ops(ops, nops, state_ptr, state_expect, pidfd, &done, &status, NULL);
    }
    PyBuffer_Release(&buf);
    return Py_BuildValue("(ni)", done, status);
}

/* A TransferPlan resolved once by the endpoint: each local entry is (addr, len, writable, err) and each
 * remote entry (ptr in our mapping, bytes available from ptr, valid_ptr, rkey, access bits, err); err is a
 * WcStatus to report for any operation that uses the entry (0 when usable). */
struct plan_local { uint64_t addr, len, writable, err; };
struct plan_remote { uint64_t ptr, avail, valid_ptr, rkey, access, err; };

enum { ST_LOC_PROT = 4, ACC_REMOTE_WRITE = 2, ACC_REMOTE_READ = 4 };

/* run_plan(locals, remotes, pairs, opcode, state_addr, state_expect, pidfd) -> (done, status)
 * One READ or WRITE per (local index, remote index) pair, in order, with the same checks and liveness rule
 * as run(). Index errors are the caller's mistake and raise before anything runs. */
static PyObject *py_run_plan(PyObject *self, PyObject *args) {
    Py_buffer lb, rb;
    PyObject *pairs_obj;
    int opcode, pidfd;
    unsigned long long state_addr, state_expect;
    if (!PyArg_ParseTuple(args, "y*y*OiKKi", &lb, &rb, &pairs_obj, &opcode, &state_addr, &state_expect, &pidfd))
        return NULL;
    PyObject *result = NULL;
    uint32_t *idx = NULL;
    PyObject *seq = PySequence_Fast(pairs_obj, "run_plan: pairs must be a sequence of (local, remote) pairs");
    if (!seq) goto out;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    Py_ssize_t nl = lb.len / (Py_ssize_t)sizeof(struct plan_local), nr = rb.len / (Py_ssize_t)sizeof(struct plan_remote);
    if (opcode != OP_READ && opcode != OP_WRITE) { PyErr_SetString(PyExc_ValueError, "run_plan: READ or WRITE"); goto out; }
    idx = PyMem_Malloc(sizeof(uint32_t) * 2 * (size_t)(n ? n : 1));
    if (!idx) { PyErr_NoMemory(); goto out; }
    uint64_t total = 0;
    const struct plan_local *L = lb.buf;
    const struct plan_remote *R = rb.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_Format(PyExc_IndexError, "pair %zd is not a (local, remote) tuple", i);
            goto out;
        }
        Py_ssize_t li = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 0));
        Py_ssize_t ri = PyLong_AsSsize_t(PyTuple_GET_ITEM(pair, 1));
        if ((li == -1 || ri == -1) && PyErr_Occurred()) goto out;
        if (li < 0 || li >= nl || ri < 0 || ri >= nr) {
            PyErr_Format(PyExc_IndexError, "pair %zd (%zd, %zd) outside the plan (%zd local, %zd remote)", i, li, ri, nl, nr);
            goto out;
        }
        idx[2 * i] = (uint32_t)li;
        idx[2 * i + 1] = (uint32_t)ri;
        total += L[li].len;
    }
    Py_ssize_t done = 0;
    int status = ST_OK;
    const uint64_t *state_ptr = (const uint64_t *)(uintptr_t)state_addr;
    uint64_t need = opcode == OP_READ ? ACC_REMOTE_READ : ACC_REMOTE_WRITE;
    PyThreadState *ts = total >= GIL_RELEASE_BYTES ? PyEval_SaveThread() : NULL;
    if (peer_gone(state_ptr, state_expect, -1)) {
        status = ST_RETRY_EXC;
    } else {
        for (Py_ssize_t i = 0; i < n; i++) {
            const struct plan_local *l = &L[idx[2 * i]];
            const struct plan_remote *r = &R[idx[2 * i + 1]];
            if (l->err || (opcode == OP_READ && !l->writable)) { status = l->err ? (int)l->err : ST_LOC_PROT; break; }
            if (r->err) { status = (int)r->err; break; }
            if (__atomic_load_n((const uint64_t *)(uintptr_t)r->valid_ptr, __ATOMIC_ACQUIRE) != r->rkey ||
                !(r->access & need) || l->len > r->avail) {
                status = ST_REM_ACCESS;
                break;
            }
            if (opcode == OP_READ) memcpy((void *)(uintptr_t)l->addr, (const void *)(uintptr_t)r->ptr, l->len);
            else memcpy((void *)(uintptr_t)r->ptr, (const void *)(uintptr_t)l->addr, l->len);
            done = i + 1;
        }
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (peer_gone(state_ptr, state_expect, pidfd)) status = ST_RETRY_EXC;
    }
    if (ts) PyEval_RestoreThread(ts);
    result = Py_BuildValue("(ni)", done, status);
out:
    PyMem_Free(idx);
    Py_XDECREF(seq);
    PyBuffer_Release(&lb);
    PyBuffer_Release(&rb);
    return result;
}


/* ---- Mover: an asynchronous executor of record batches, one per endpoint (like a NIC's send queue) ----
 *
 * submit(records, nops) queues a batch; a thread of the Mover (started on first use) runs the queued batches
 * in submission order with run_ops, without the GIL, so the posting Python thread builds the next requests
 * while the bytes move. reap() returns (done, status) of the batches finished since the last reap, in order.
 * The first batch that does not finish with ST_OK puts the Mover in error: every later batch is not run and
 * finishes with ST_FLUSH (RC: after the first error, everything flushes). Batches with hand-off records
 * (GPU copies) must not be submitted: the caller runs those inline once the Mover is idle. Each batch holds
 * a writable buffer export of its records (digests are written back) until it is reaped. */
enum { ST_FLUSH = 5 };

struct job {
    struct job *next;
    Py_buffer buf;
    Py_ssize_t nops, done;
    int status, finished;
};

/* A digest record the Mover copies while a waiting thread hashes it (see mover_digest). */
enum { T_FREE = 0, T_READY, T_CLAIMED, T_DONE };
#define NTASKS 256
#define TASK_STRIDE (64u * 1024u)
struct htask {
    const unsigned char *p; /* the local bytes to hash */
    size_t len;
    unsigned char *out;     /* 16 digest bytes (the record's compare/swap words) */
    size_t progress;        /* bytes of p already in place (the Mover copies in strides): atomic */
    int state;              /* T_*: atomic */
};

typedef struct Mover_s {
    PyObject_HEAD
    pthread_mutex_t mu;
    pthread_cond_t work, fin;
    struct job *head, *tail, *next_run; /* head..tail: unreaped; next_run: first not yet started */
    int running, stop, error, started;
    /* counters read without the lock by spinning waiters (atomic), written under it */
    uint64_t submitted, taken, finished, reaped;
    long spin_ns; /* how long the thread and waiters busy-poll before they block */
    int helpers;  /* threads inside wait(), which hash digest records while they wait: atomic */
    int ntasks;   /* tasks of the running batch (reset per batch): atomic */
    struct htask tasks[NTASKS];
    pid_t owner; /* the process that started the thread: a forked child never joins or signals it */
    pthread_t thread;
    const uint64_t *state_ptr;
    uint64_t state_expect;
    int pidfd;
} Mover;

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)t.tv_sec * 1000000000L + t.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Busy-poll until cond() holds or spin_ns pass: waking a blocked thread costs tens of microseconds (far more
 * on a virtual CPU that went idle), as much as a 256 KiB copy, so short gaps between batches are spun over. */
#define SPIN_UNTIL(m, cond)                                                        \
    do {                                                                           \
        long _end = now_ns() + (m)->spin_ns;                                       \
        for (int _i = 0; !(cond); _i++) {                                          \
            cpu_relax();                                                           \
            if ((_i & 63) == 63 && now_ns() > _end) break;                         \
        }                                                                          \
    } while (0)

/* Hash a task trailing the Mover's copy: only bytes it published as in place (READ: landed) are read. */
static void hash_task(struct htask *t) {
    digest_trailing(t->p, t->len, &t->progress, t->out);
    __atomic_store_n(&t->state, T_DONE, __ATOMIC_RELEASE);
}

/* A waiting thread: claim and hash one ready task of the running batch; 1 if it did. */
static int help_one(Mover *m) {
    int n = __atomic_load_n(&m->ntasks, __ATOMIC_ACQUIRE);
    for (int i = 0; i < n; i++) {
        int want = T_READY;
        if (__atomic_load_n(&m->tasks[i].state, __ATOMIC_ACQUIRE) == T_READY &&
            __atomic_compare_exchange_n(&m->tasks[i].state, &want, T_CLAIMED, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE)) {
            hash_task(&m->tasks[i]);
            return 1;
        }
    }
    return 0;
}

/* Called by run_ops on the Mover thread for a digest record: when a thread is waiting (and so free to hash),
 * copy in strides, publishing progress, and leave the hash to it as a task; 0 means "not taken: fuse". The
 * batch completes only after every task is done (mover_batch_end). */
static int mover_digest(Mover *m, void *dst, const void *src, size_t n, int hash_dst, unsigned char *out) {
    int i = m->ntasks;
    if (i >= NTASKS || !__atomic_load_n(&m->helpers, __ATOMIC_ACQUIRE)) return 0;
    struct htask *t = &m->tasks[i];
    t->p = hash_dst ? dst : src;
    t->len = n;
    t->out = out;
    __atomic_store_n(&t->progress, 0, __ATOMIC_RELAXED);
    __atomic_store_n(&t->state, T_READY, __ATOMIC_RELEASE);
    __atomic_store_n(&m->ntasks, i + 1, __ATOMIC_RELEASE);
    for (size_t off = 0; off < n; off += TASK_STRIDE) {
        size_t k = n - off < TASK_STRIDE ? n - off : TASK_STRIDE;
        memcpy((char *)dst + off, (const char *)src + off, k);
        __atomic_store_n(&t->progress, off + k, __ATOMIC_RELEASE);
    }
    return 1;
}

/* The batch's digests: hash the tasks nobody claimed here, wait for the claimed ones; then reset. */
static void mover_batch_end(Mover *m) {
    int n = m->ntasks;
    for (int i = 0; i < n; i++) {
        int want = T_READY;
        if (__atomic_compare_exchange_n(&m->tasks[i].state, &want, T_CLAIMED, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            hash_task(&m->tasks[i]);
        while (__atomic_load_n(&m->tasks[i].state, __ATOMIC_ACQUIRE) != T_DONE) cpu_relax();
    }
    for (int i = 0; i < n; i++) __atomic_store_n(&m->tasks[i].state, T_FREE, __ATOMIC_RELAXED);
    __atomic_store_n(&m->ntasks, 0, __ATOMIC_RELEASE);
}

/* Run the next queued batch on this thread (the mutex held on entry and on return, released while it runs).
 * One batch runs at a time (`running`), whichever thread runs it, so batches still run in submission order.
 * The Mover thread hands digest records to waiting threads (mover_digest); a waiter running a batch itself
 * fuses hash and copy. */
static void run_next_locked(Mover *m, int on_mover) {
    struct job *j = m->next_run;
    m->next_run = j->next;
    __atomic_store_n(&m->taken, m->taken + 1, __ATOMIC_RELEASE);
    if (m->error || m->stop) {
        j->done = 0;
        j->status = ST_FLUSH;
    } else {
        m->running = 1;
        pthread_mutex_unlock(&m->mu);
        run_ops((struct op *)j->buf.buf, j->nops, m->state_ptr, m->state_expect, m->pidfd, &j->done, &j->status,
                on_mover ? m : NULL);
        if (on_mover) mover_batch_end(m);
        pthread_mutex_lock(&m->mu);
        m->running = 0;
        if (j->status != ST_OK) m->error = 1;
    }
    j->finished = 1;
    __atomic_store_n(&m->finished, m->finished + 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&m->fin);
    pthread_cond_signal(&m->work); /* the Mover thread may be waiting for `running` to clear */
}

static void *mover_main(void *arg) {
    Mover *m = arg;
    pthread_mutex_lock(&m->mu);
    for (;;) {
        if ((!m->next_run || m->running) && !m->stop && m->spin_ns > 0) {
            pthread_mutex_unlock(&m->mu);
            SPIN_UNTIL(m, __atomic_load_n(&m->submitted, __ATOMIC_ACQUIRE) != __atomic_load_n(&m->taken, __ATOMIC_ACQUIRE) ||
                              __atomic_load_n(&m->stop, __ATOMIC_ACQUIRE));
            pthread_mutex_lock(&m->mu);
        }
        while ((!m->next_run || m->running) && !m->stop) pthread_cond_wait(&m->work, &m->mu);
        if (m->running) { /* stopping while a waiter runs a batch: let it finish */
            pthread_cond_wait(&m->work, &m->mu);
            continue;
        }
        if (!m->next_run) break; /* stop, nothing left */
        run_next_locked(m, 1);
    }
    pthread_mutex_unlock(&m->mu);
    return NULL;
}

/* A waiting thread: when the next batch has not started and nobody runs one (the Mover thread is descheduled,
 * say, because another process holds the other CPU), run it here instead of waiting for a context switch. */
static int try_run(Mover *m) {
    if (__atomic_load_n(&m->submitted, __ATOMIC_ACQUIRE) == __atomic_load_n(&m->taken, __ATOMIC_ACQUIRE)) return 0;
    int did = 0;
    pthread_mutex_lock(&m->mu);
    if (m->next_run && !m->running && !m->stop) {
        run_next_locked(m, 0);
        did = 1;
    }
    pthread_mutex_unlock(&m->mu);
    return did;
}

static int deadline_after(double timeout, struct timespec *ts) {
    clock_gettime(CLOCK_REALTIME, ts);
    if (timeout < 0) timeout = 0;
    if (timeout > 1e6) timeout = 1e6;
    time_t sec = (time_t)timeout;
    long ns = (long)((timeout - (double)sec) * 1e9);
    ts->tv_sec += sec;
    ts->tv_nsec += ns;
    if (ts->tv_nsec >= 1000000000L) { ts->tv_sec++; ts->tv_nsec -= 1000000000L; }
    return 0;
}

static void mover_stop(Mover *m) {
    if (!m->started) return;
    if (m->owner != getpid()) { m->started = 0; return; } /* a fork's copy: the thread is not ours */
    pthread_mutex_lock(&m->mu);
    __atomic_store_n(&m->stop, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&m->work);
    pthread_mutex_unlock(&m->mu);
    Py_BEGIN_ALLOW_THREADS
    pthread_join(m->thread, NULL);
    Py_END_ALLOW_THREADS
    m->started = 0;
}

static PyObject *Mover_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    unsigned long long state_addr, state_expect;
    int pidfd;
    long spin_us = 0;
    if (!PyArg_ParseTuple(args, "KKi|l", &state_addr, &state_expect, &pidfd, &spin_us)) return NULL;
    if (spin_us < 0 || spin_us > 1000000) {
        PyErr_SetString(PyExc_ValueError, "Mover: spin_us must be between 0 and 1000000");
        return NULL;
    }
    Mover *m = (Mover *)type->tp_alloc(type, 0);
    if (!m) return NULL;
    pthread_mutex_init(&m->mu, NULL);
    pthread_cond_init(&m->work, NULL);
    pthread_cond_init(&m->fin, NULL);
    m->state_ptr = (const uint64_t *)(uintptr_t)state_addr;
    m->state_expect = state_expect;
    m->pidfd = pidfd;
    m->spin_ns = spin_us * 1000L;
    return (PyObject *)m;
}

static void Mover_dealloc(Mover *m) {
    mover_stop(m);
    struct job *j = m->head;
    while (j) {
        struct job *n = j->next;
        PyBuffer_Release(&j->buf);
        PyMem_RawFree(j);
        j = n;
    }
    pthread_mutex_destroy(&m->mu);
    pthread_cond_destroy(&m->work);
    pthread_cond_destroy(&m->fin);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static PyObject *Mover_submit(Mover *m, PyObject *args) {
    PyObject *obj;
    Py_ssize_t nops;
    if (!PyArg_ParseTuple(args, "On", &obj, &nops)) return NULL;
    if (m->stop) { PyErr_SetString(PyExc_RuntimeError, "submit on a closed Mover"); return NULL; }
    if (m->started && m->owner != getpid()) {
        PyErr_SetString(PyExc_RuntimeError, "submit on a Mover inherited through fork");
        return NULL;
    }
    struct job *j = PyMem_RawCalloc(1, sizeof(*j));
    if (!j) return PyErr_NoMemory();
    if (PyObject_GetBuffer(obj, &j->buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) { PyMem_RawFree(j); return NULL; }
    if (nops < 0 || (size_t)j->buf.len < (size_t)nops * sizeof(struct op)) {
        PyBuffer_Release(&j->buf);
        PyMem_RawFree(j);
        PyErr_SetString(PyExc_ValueError, "submit: record buffer shorter than nops records");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nops; i++) {
        if (((struct op *)j->buf.buf)[i].opcode & OP_HANDOFF) {
            PyBuffer_Release(&j->buf);
            PyMem_RawFree(j);
            PyErr_SetString(PyExc_ValueError, "submit: hand-off records run inline, not on the Mover");
            return NULL;
        }
    }
    j->nops = nops;
    if (!m->started) {
        if (pthread_create(&m->thread, NULL, mover_main, m) != 0) {
            PyBuffer_Release(&j->buf);
            PyMem_RawFree(j);
            PyErr_SetString(PyExc_OSError, "cannot start the mover thread");
            return NULL;
        }
        m->started = 1;
        m->owner = getpid();
    }
    pthread_mutex_lock(&m->mu);
    if (m->tail) m->tail->next = j; else m->head = j;
    m->tail = j;
    if (!m->next_run) m->next_run = j;
    __atomic_store_n(&m->submitted, m->submitted + 1, __ATOMIC_RELEASE);
    pthread_cond_signal(&m->work);
    pthread_mutex_unlock(&m->mu);
    Py_RETURN_NONE;
}

/* reap() -> [(done, status), ...] of the batches finished since the last reap, in submission order. */
static PyObject *Mover_reap(Mover *m, PyObject *unused) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (;;) {
        pthread_mutex_lock(&m->mu);
        struct job *j = m->head;
        if (j && j->finished) {
            m->head = j->next;
            if (!m->head) m->tail = NULL;
        } else {
            j = NULL;
        }
        if (j) __atomic_store_n(&m->reaped, m->reaped + 1, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&m->mu);
        if (!j) break;
        PyObject *t = Py_BuildValue("(ni)", j->done, j->status);
        PyBuffer_Release(&j->buf);
        PyMem_RawFree(j);
        if (!t || PyList_Append(out, t) < 0) { Py_XDECREF(t); Py_DECREF(out); return NULL; }
        Py_DECREF(t);
    }
    return out;
}

/* wait(timeout, idle=False) -> bool: block (GIL released) until a batch is ready to reap or none is left to
 * reap (idle: until no batch is queued or running), or `timeout` seconds pass (False). While it waits, the
 * calling thread hashes the running batch's digest records (help_one). */
static PyObject *Mover_wait(Mover *m, PyObject *args) {
    double timeout;
    int idle = 0;
    if (!PyArg_ParseTuple(args, "d|p", &timeout, &idle)) return NULL;
    struct timespec ts;
    deadline_after(timeout, &ts);
    int ok;
    Py_BEGIN_ALLOW_THREADS
    __atomic_add_fetch(&m->helpers, 1, __ATOMIC_ACQ_REL);
#define WAIT_DONE() (idle ? __atomic_load_n(&m->finished, __ATOMIC_ACQUIRE) == __atomic_load_n(&m->submitted, __ATOMIC_ACQUIRE) \
                          : __atomic_load_n(&m->finished, __ATOMIC_ACQUIRE) != __atomic_load_n(&m->reaped, __ATOMIC_ACQUIRE) || \
                            __atomic_load_n(&m->submitted, __ATOMIC_ACQUIRE) == __atomic_load_n(&m->reaped, __ATOMIC_ACQUIRE))
    /* while waiting, hash the running batch's digest records (the Mover copies, this thread hashes), or run
     * the next batch here if nobody runs one */
    for (;;) {
        if (WAIT_DONE() || !(help_one(m) || try_run(m))) break;
    }
    if (m->spin_ns > 0) {
        long end = now_ns() + m->spin_ns;
        for (int i = 0; !WAIT_DONE(); i++) {
            if (help_one(m) || try_run(m)) { end = now_ns() + m->spin_ns; continue; }
            cpu_relax();
            if ((i & 63) == 63 && now_ns() > end) break;
        }
    }
    __atomic_sub_fetch(&m->helpers, 1, __ATOMIC_ACQ_REL);
#undef WAIT_DONE
    pthread_mutex_lock(&m->mu);
    for (;;) {
        /* not idle: a batch to reap, or none left at all (another thread reaped them meanwhile) */
        ok = idle ? (!m->next_run && !m->running) : (!m->head || m->head->finished);
        if (ok) break;
        if (pthread_cond_timedwait(&m->fin, &m->mu, &ts) != 0) {
            ok = idle ? (!m->next_run && !m->running) : (!m->head || m->head->finished);
            break;
        }
    }
    pthread_mutex_unlock(&m->mu);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(ok);
}

/* pending() -> number of batches submitted and not yet reaped. */
static PyObject *Mover_pending(Mover *m, PyObject *unused) {
    Py_ssize_t n = 0;
    pthread_mutex_lock(&m->mu);
    for (struct job *j = m->head; j; j = j->next) n++;
    pthread_mutex_unlock(&m->mu);
    return PyLong_FromSsize_t(n);
}

/* close(): batches not yet started finish with ST_FLUSH; returns once the thread has exited. */
static PyObject *Mover_close(Mover *m, PyObject *unused) {
    mover_stop(m);
    m->stop = 1;
    Py_RETURN_NONE;
}

static PyMethodDef mover_methods[] = {
    {"submit", (PyCFunction)Mover_submit, METH_VARARGS, "submit(records, nops): queue a batch"},
    {"reap", (PyCFunction)Mover_reap, METH_NOARGS, "reap() -> [(done, status)] of finished batches, in order"},
    {"wait", (PyCFunction)Mover_wait, METH_VARARGS, "wait(timeout, idle=False) -> bool"},
    {"pending", (PyCFunction)Mover_pending, METH_NOARGS, "pending() -> batches not yet reaped"},
    {"close", (PyCFunction)Mover_close, METH_NOARGS, "close(): flush what has not started, join the thread"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MoverType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "rdmapool._shmatomics.Mover",
    .tp_basicsize = sizeof(Mover),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Mover(state_addr, state_expect, pidfd, spin_us=0): runs record batches in order on its own thread",
    .tp_new = Mover_new,
    .tp_dealloc = (destructor)Mover_dealloc,
    .tp_methods = mover_methods,
};

/* peer_alive(state_addr, state_expect, pidfd) -> bool: the same check `run` makes around a batch. */
static PyObject *py_peer_alive(PyObject *self, PyObject *args) {
    unsigned long long state_addr, state_expect;
    int pidfd;
    if (!PyArg_ParseTuple(args, "KKi", &state_addr, &state_expect, &pidfd)) return NULL;
    return PyBool_FromLong(!peer_gone((const uint64_t *)(uintptr_t)state_addr, state_expect, pidfd));
}

/* digest(buffer) -> 16 bytes: the vendored xxh3-128 (canonical), to check it agrees with the xxhash package. */
static PyObject *py_digest(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    if (!have_digest) { PyBuffer_Release(&view); PyErr_SetString(PyExc_RuntimeError, "no AVX2: digest unavailable"); return NULL; }
    unsigned char out[16];
    Py_BEGIN_ALLOW_THREADS
    digest_only(view.buf, (size_t)view.len, out);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, 16);
}

static PyMethodDef methods[] = {
    {"digest", py_digest, METH_O, "digest(buffer) -> xxh3-128 canonical bytes (the mover's hash)"},
    {"load64", py_load64, METH_O, "load64(addr) -> int: acquire load of 8 bytes"},
    {"store64", py_store64, METH_VARARGS, "store64(addr, value): release store of 8 bytes"},
    {"cas64", py_cas64, METH_VARARGS, "cas64(addr, expected, desired) -> old value"},
    {"faa64", py_faa64, METH_VARARGS, "faa64(addr, add) -> old value (mod 2**64)"},
    {"copy", py_copy, METH_VARARGS, "copy(dst, src, n): memcpy, GIL released for large n"},
    {"copy_blocks", py_copy_blocks, METH_VARARGS, "copy_blocks(dst, src, size, count): memcpy limit loop"},
    {"address", py_address, METH_VARARGS, "address(buffer, writable=True) -> (addr, nbytes)"},
    {"run", py_run, METH_VARARGS, "run(ops, nops, state_addr, state_expect, pidfd) -> (done, status)"},
    {"run_plan", py_run_plan, METH_VARARGS,
     "run_plan(locals, remotes, pairs, opcode, state_addr, state_expect, pidfd) -> (done, status)"},
    {"peer_alive", py_peer_alive, METH_VARARGS, "peer_alive(state_addr, state_expect, pidfd) -> bool"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "rdmapool._shmatomics", "CPU atomics and batch mover of the shm transport", -1,
    methods,
};

PyMODINIT_FUNC PyInit__shmatomics(void) {
    if (PyType_Ready(&MoverType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Mover", (PyObject *)&MoverType) < 0) return NULL;
    PyModule_AddIntConstant(m, "ST_FLUSH", ST_FLUSH);
    PyModule_AddIntConstant(m, "OP_SIZE", (long)sizeof(struct op));
    PyModule_AddIntConstant(m, "OP_HANDOFF", OP_HANDOFF);
    if (xxh3_pick() < 0) return NULL;
    have_digest = digest_available();
    PyModule_AddIntConstant(m, "OP_DIGEST", OP_DIGEST);
    PyModule_AddIntConstant(m, "OP_POPULATE", OP_POPULATE);
    /* whether OP_DIGEST records are hashed (else they are plain copies and the caller hashes) */
    PyModule_AddObjectRef(m, "DIGEST", have_digest ? Py_True : Py_False);
    PyModule_AddStringConstant(m, "KERNEL", XXH.isa); /* the xxh3 kernel picked (native/xxhash/kernels.h) */
    PyModule_AddIntConstant(m, "ST_HANDOFF", ST_HANDOFF);
    PyModule_AddIntConstant(m, "GIL_RELEASE_BYTES", (long)GIL_RELEASE_BYTES);
    return m;
}
