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
 * caller's thread with the GIL released (with a sender thread, tx_mode in endpoint.h, the rest is sent there): responses are received with recvmsg() whose iovecs chain
 * [header, payload SGEs, next header, ...] so READ payloads land straight in the local buffers. wait()
 * busy-polls for spin_us before blocking in poll(2). A READ that names a digest SGE keeps a streaming xxh3-128
 * state; each recvmsg() (at most 256 KiB) feeds it the bytes that just landed in that SGE, while they are in
 * cache (by the receiving thread, or with dx_mode by the endpoint's digest thread while the receiver goes on), and
 * the completion carries the 16 canonical bytes (native/xxhash/digest.h; AVX2 CPUs only). Responses come back in request order (one connection,
 * executed in order), so completions are delivered in posting order.
 *
 * Wire format (little-endian, see docs/transport.md): hello "RDMPTCP1" both ways; request = 48-byte header
 * {u8 op, u8 flags(bit0 signaled), u16 0, u32 rkey, u64 tag, u64 addr, u64 len, u64 compare, u64 swap}
 * + len payload bytes for WRITE; response = 24-byte header {u8 status, u8 op, u16 0, u32 0, u64 tag, u64 len}
 * + len payload bytes (READ data or the 8-byte old value of an atomic). Unsignalled WRITEs get no response
 * unless they fail. After an error response the server executes nothing more on that connection (it drains
 * and discards input until the peer closes), as a responder QP in error does.
 *
 * Layout: one translation unit; the parts live in native/tcpengine/ and are included below in dependency order:
 * common.h (constants, helpers, spinning), regions.h (region table, pins, socket set-up), server.h (connection
 * threads), engine_type.h (Python Engine), endpoint.h (request ring, progress, background progress),
 * endpoint_type.h (Python Endpoint), baselines.h (raw socket and memcpy baselines for the benchmark).
 */

#include "tcpengine/common.h"
#include "tcpengine/regions.h"
#include "tcpengine/server.h"
#include "tcpengine/engine_type.h"
#include "xxhash/digest.h" /* READ digests: hashed per received chunk, in cache */
static int have_digest;           /* the CPU runs digest.h's AVX2 kernel: set at import, DIGEST in Python */
#include "tcpengine/endpoint.h"
#include "tcpengine/endpoint_type.h"
#include "tcpengine/baselines.h"

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
    if (PyType_Ready(&EngineType) < 0 || PyType_Ready(&EndpointType) < 0 || intern_fields() < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    UsageError = PyExc_ValueError;
    const char *chunk = getenv("RDMAPOOL_TCP_IO_CHUNK"); /* bytes per send/recv call, 0 = no limit (tuning) */
    if (chunk && *chunk) io_chunk = io_chunk_srv_recv = io_chunk_cli_recv = io_chunk_cli_send = (size_t)strtoull(chunk, NULL, 10);
    if (xxh3_pick() < 0) return NULL;
    have_digest = digest_available() != 0;
    PyModule_AddIntConstant(m, "DIGEST", have_digest);
    PyModule_AddStringConstant(m, "KERNEL", XXH.isa); /* the xxh3 kernel picked (native/xxhash/kernels.h) */
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
