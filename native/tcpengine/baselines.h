/* Baselines for bench/transport.py: raw socket stream and memcpy (part of rdmapool._tcpengine: included by native/tcpengine.c, one translation unit) */
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
