/* rdmapool._blockformat: the block header and trailer (rdmapool/block.py) encoded and checked in C.
 *
 * Why: a batch writes and validates one header and one trailer per block; in Python each costs a few struct
 * packs, two small xxh3-64 calls and a dozen comparisons (~5 us a block, as much as moving a 16 KiB payload).
 * These functions do the same work in well under a microsecond. The format is defined in block.py, whose
 * pure-Python code stays the reference (tests compare the two byte for byte) and the fallback.
 *
 * encode(head, tail, key, generation, length, checksum) writes the 64 header and 32 trailer bytes into two
 *   writable buffers (either may be None: a two-part write sends the trailer before the checksum is known);
 *   checksum is 16 bytes, or None for a block written without one (flagged in both).
 * check(head, tail, key, generation, length) -> checksum bytes, None (written without one), or an int error
 *   code (>0) naming the first mismatch; Python turns a code into CorruptBlock with the reference message.
 *   The fields are copied out of the buffers first: a READ may still be landing in them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#define XXH_INLINE_ALL
#include "xxhash/xxhash.h" /* native/xxhash/xxhash.h */

#define HEADER_SIZE 64
#define HEADER_BODY 56
#define TRAILER_SIZE 32
#define TRAILER_BODY 24
#define KEY_SIZE 16
#define FORMAT_VERSION 1
#define FLAG_NO_CHECKSUM 0x01
#define KNOWN_FLAGS FLAG_NO_CHECKSUM

/* error codes, in the order block.validate checks (the Python side maps them to messages) */
enum { E_SHORT = 1, E_MAGIC, E_VERSION, E_SELFCHECK, E_FLAGS, E_KEY, E_GENERATION, E_LENGTH, E_TRAILER_MAGIC,
       E_TRAILER_SELFCHECK, E_TORN };

static void put64le(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* the 24 bytes header and trailer begin with: magic, version, flags, reserved, generation, length (the rest
 * of the n-byte buffer zeroed) */
static void put_prefix(unsigned char *p, size_t n, const char magic[4], unsigned char flags, uint64_t gen,
                       uint64_t length) {
    memset(p, 0, n);
    memcpy(p, magic, 4);
    p[4] = FORMAT_VERSION;
    p[5] = flags;
    put64le(p + 8, gen);
    put64le(p + 16, length);
}

static uint64_t get64le(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* a u64 argument, range-checked (the "K" format would wrap negative numbers silently) */
static int get_u64(PyObject *o, uint64_t *out) {
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "generation and length must fit in 64 unsigned bits");
        return -1;
    }
    *out = v;
    return 0;
}

static int get_key(PyObject *key, const char **out) {
    if (!PyBytes_Check(key) || PyBytes_GET_SIZE(key) != KEY_SIZE) {
        PyErr_Format(PyExc_ValueError, "a key is exactly %d bytes", KEY_SIZE);
        return -1;
    }
    *out = PyBytes_AS_STRING(key);
    return 0;
}

static int writable(PyObject *obj, Py_buffer *view, Py_ssize_t need, const char *what) {
    if (obj == Py_None) return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) return -1;
    if (view->len < need) {
        PyErr_Format(PyExc_ValueError, "the %s needs %zd writable bytes, got %zd", what, need, view->len);
        return -1;
    }
    return 0;
}

/* encode(head, tail, key, generation, length, checksum): head or tail may be None (written later, or already) */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    Py_buffer head = {0}, tail = {0};
    PyObject *head_obj, *tail_obj, *key, *gen_obj, *length_obj, *checksum;
    uint64_t gen, length;
    if (!PyArg_ParseTuple(args, "OOOOOO", &head_obj, &tail_obj, &key, &gen_obj, &length_obj, &checksum)) return NULL;
    PyObject *result = NULL;
    const char *k;
    if (get_key(key, &k) < 0 || get_u64(gen_obj, &gen) < 0 || get_u64(length_obj, &length) < 0) goto out;
    if (writable(head_obj, &head, HEADER_SIZE, "header") < 0 || writable(tail_obj, &tail, TRAILER_SIZE, "trailer") < 0)
        goto out;
    const char *sum = NULL;
    if (checksum != Py_None) {
        if (!PyBytes_Check(checksum) || PyBytes_GET_SIZE(checksum) != 16) {
            PyErr_SetString(PyExc_ValueError, "checksum must be 16 bytes or None");
            goto out;
        }
        sum = PyBytes_AS_STRING(checksum);
    }
    unsigned char flags = sum ? 0 : FLAG_NO_CHECKSUM;
    if (head.buf) {
        unsigned char h[HEADER_SIZE];
        put_prefix(h, sizeof h, "RPLB", flags, gen, length);
        memcpy(h + 24, k, KEY_SIZE);
        if (sum) memcpy(h + 40, sum, 16);
        put64le(h + HEADER_BODY, XXH3_64bits(h, HEADER_BODY));
        memcpy(head.buf, h, HEADER_SIZE);
    }
    if (tail.buf) {
        unsigned char t[TRAILER_BODY + KEY_SIZE];
        put_prefix(t, sizeof t, "RPLT", flags, gen, length);
        memcpy(t + TRAILER_BODY, k, KEY_SIZE); /* the self-check covers body + key */
        uint64_t tcheck = XXH3_64bits(t, sizeof t);
        put64le(t + TRAILER_BODY, tcheck);
        memcpy(tail.buf, t, TRAILER_SIZE);
    }
    result = Py_None;
    Py_INCREF(result);
out:
    if (head.obj) PyBuffer_Release(&head);
    if (tail.obj) PyBuffer_Release(&tail);
    return result;
}

static int check_fields(const unsigned char *h, const unsigned char *tr, const char *key, uint64_t gen,
                        uint64_t length) {
    if (memcmp(h, "RPLB", 4)) return E_MAGIC;
    if (h[4] != FORMAT_VERSION) return E_VERSION;
    if (get64le(h + HEADER_BODY) != XXH3_64bits(h, HEADER_BODY)) return E_SELFCHECK;
    if (h[5] & ~KNOWN_FLAGS) return E_FLAGS;
    if (memcmp(h + 24, key, KEY_SIZE)) return E_KEY;
    uint64_t hgen = get64le(h + 8), hlen = get64le(h + 16);
    if (hgen != gen) return E_GENERATION;
    if (hlen != length) return E_LENGTH;
    if (memcmp(tr, "RPLT", 4) || tr[4] != FORMAT_VERSION) return E_TRAILER_MAGIC;
    unsigned char t[TRAILER_BODY + KEY_SIZE];
    memcpy(t, tr, TRAILER_BODY);
    memcpy(t + TRAILER_BODY, key, KEY_SIZE);
    if (get64le(tr + TRAILER_BODY) != XXH3_64bits(t, sizeof t)) return E_TRAILER_SELFCHECK;
    if (get64le(tr + 8) != hgen || get64le(tr + 16) != hlen || tr[5] != h[5]) return E_TORN;
    return 0;
}

static PyObject *py_check(PyObject *self, PyObject *args) {
    Py_buffer head = {0}, tail = {0};
    PyObject *key, *gen_obj, *length_obj;
    uint64_t gen, length;
    if (!PyArg_ParseTuple(args, "y*y*OOO", &head, &tail, &key, &gen_obj, &length_obj)) return NULL;
    PyObject *result = NULL;
    const char *k;
    if (get_key(key, &k) < 0 || get_u64(gen_obj, &gen) < 0 || get_u64(length_obj, &length) < 0) goto out;
    if (head.len < HEADER_SIZE || tail.len < TRAILER_SIZE) {
        result = PyLong_FromLong(E_SHORT);
        goto out;
    }
    unsigned char h[HEADER_SIZE], t[TRAILER_SIZE]; /* copies: the buffers may still be changing */
    memcpy(h, head.buf, HEADER_SIZE);
    memcpy(t, tail.buf, TRAILER_SIZE);
    int code = check_fields(h, t, k, gen, length);
    if (code) result = PyLong_FromLong(code);
    else if (h[5] & FLAG_NO_CHECKSUM) { result = Py_None; Py_INCREF(result); }
    else result = PyBytes_FromStringAndSize((const char *)h + 40, 16);
out:
    PyBuffer_Release(&head);
    PyBuffer_Release(&tail);
    return result;
}

static PyMethodDef methods[] = {
    {"encode", py_encode, METH_VARARGS, "encode(head, tail, key, generation, length, checksum|None)"},
    {"check", py_check, METH_VARARGS, "check(head, tail, key, generation, length) -> checksum | None | int code"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "rdmapool._blockformat", "block header and trailer, encoded and checked in C", -1,
    methods,
};

PyMODINIT_FUNC PyInit__blockformat(void) { return PyModule_Create(&module); }
