/* tracesock._speedups: the hot path of the commonest calls, in C.
 *
 * Optional: when this module cannot be built or imported, _socket.py does the
 * same in Python (measured 2.6x plain sockets on a 64-byte send+recv
 * pingpong; this brings it to about 1.26x).
 *
 * It does exactly what the Python fast path does -- no more:
 *   1. bail out (return NOT_FAST, no syscall made) unless the call is the
 *      plain form (positional args only, the one-argument form), the socket
 *      is blocking (gettimeout() is None) and the OpenTelemetry context is
 *      empty (no span, no suppression: those take the Python path);
 *   2. call CPython's own method (_socket.socket.recv etc.) once with
 *      MSG_DONTWAIT OR-ed into flags, timing it with CLOCK_MONOTONIC (the
 *      clock of time.perf_counter_ns);
 *   3. on success, add the duration to a histogram and the bytes to a
 *      counter, per (method, family, type) -- the GIL makes these updates
 *      atomic -- and call on_slow() if the call reached the slow threshold;
 *   4. on an exception or a partial send, record nothing and leave the
 *      timings in last() for the Python slow path, which takes over.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <time.h>
#include <errno.h>
#include <sys/socket.h>
#include <signal.h>
#include <pthread.h>
#include <string.h>
#include <stdlib.h>

#define MAXBOUNDS 64
#define MAXSLOTS 256

enum { M_RECV = 0, M_RECV_INTO = 1, M_SEND = 2, M_SENDALL = 3, M_COUNT = 4 };
/* Slots of the TLS fast path (tls_fast): OpenSSL's ciphertext syscalls. */
enum { M_WIRE_READ = 4, M_WIRE_WRITE = 5 };

typedef struct {
    int method, family, type;
    long long counts[MAXBOUNDS + 1];
    long long total, min, max, nbytes, odd;
} Slot;

static Slot slots[MAXSLOTS];
static int nslots = 0;
static long long bounds[MAXBOUNDS];
static int nbounds = 0;
static long long slow_ns = LLONG_MAX;
static long dontwait = 0;

static PyObject *fns[M_COUNT];           /* _socket.socket.recv, recv_into, send, send */
static PyObject *gettimeout_fn, *family_descr, *type_descr, *context_var;
static PyObject *not_fast, *partial, *on_slow, *dontwait_obj, *zero_obj;
static int configured = 0;

/* Leave a failed or partial attempt's timings for the Python slow path, per
 * thread, with the id() of the exception it raised: an exception raised by
 * something else (a signal handler) must not be taken for the syscall's. */
static void stash(long long start, long long end, long long n) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type != NULL) PyErr_NormalizeException(&type, &value, &tb);
    PyObject *dict = PyThreadState_GetDict();
    if (dict != NULL) {
        PyObject *t = Py_BuildValue("LLLn", start, end, n, (Py_ssize_t)(value ? (Py_ssize_t)value : 0));
        if (t != NULL) {
            PyDict_SetItemString(dict, "tracesock._speedups.last", t);
            Py_DECREF(t);
        }
    }
    PyErr_Clear();
    PyErr_Restore(type, value, tb);
}

static inline long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int member_int(PyObject *descr, PyObject *sock, int *out) {
    PyObject *v = Py_TYPE(descr)->tp_descr_get(descr, sock, (PyObject *)Py_TYPE(sock));
    if (v == NULL) return -1;
    long x = PyLong_AsLong(v);
    Py_DECREF(v);
    if (x == -1 && PyErr_Occurred()) return -1;
    *out = (int)x;
    return 0;
}

static Slot *slot_for(int method, PyObject *sock) {
    int family, type;
    if (member_int(family_descr, sock, &family) < 0 || member_int(type_descr, sock, &type) < 0) {
        PyErr_Clear();
        return NULL;
    }
    for (int i = 0; i < nslots; i++) {
        Slot *s = &slots[i];
        if (s->method == method && s->family == family && s->type == type) return s;
    }
    if (nslots >= MAXSLOTS) return NULL;
    Slot *s = &slots[nslots++];
    memset(s, 0, sizeof(*s));
    s->method = method;
    s->family = family;
    s->type = type;
    s->min = LLONG_MAX;
    s->max = -1;
    return s;
}

/* The histogram bucket of a duration: bisect_left over bounds. */
static int bucket(long long d) {
    int lo = 0, hi = nbounds;
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (bounds[mid] < d) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static void record(Slot *s, long long d, long long n, int odd) {
    s->counts[bucket(d)] += 1;
    s->total += d;
    if (d < s->min) s->min = d;
    if (d > s->max) s->max = d;
    s->nbytes += n;
    if (odd) s->odd += 1;
}

/* Is the OpenTelemetry context non-empty (a span, baggage, suppression)? */
static int context_busy(void) {
    PyObject *ctx = NULL;
    if (PyContextVar_Get(context_var, NULL, &ctx) < 0) {
        PyErr_Clear();
        return 1;
    }
    if (ctx == NULL) return 0;
    int busy = !PyDict_Check(ctx) || PyDict_GET_SIZE(ctx) > 0;
    Py_DECREF(ctx);
    return busy;
}

static PyObject *
fast(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 4 || !configured) {
        PyErr_SetString(PyExc_TypeError, "fast(method, sock, args, kwargs)");
        return NULL;
    }
    int method = (int)PyLong_AsLong(argv[0]);
    PyObject *sock = argv[1], *args = argv[2], *kwargs = argv[3];
    if (method < 0 || method >= M_COUNT || !PyTuple_Check(args)) {
        PyErr_SetString(PyExc_ValueError, "bad method");
        return NULL;
    }
    if ((kwargs != Py_None && (!PyDict_Check(kwargs) || PyDict_GET_SIZE(kwargs) > 0))
        || PyTuple_GET_SIZE(args) != 1 || context_busy()) {
        return Py_NewRef(not_fast);
    }
    PyObject *timeout = PyObject_Vectorcall(gettimeout_fn, &sock, 1, NULL);
    if (timeout == NULL) {
        PyErr_Clear();
        return Py_NewRef(not_fast);
    }
    int blocking = (timeout == Py_None);
    Py_DECREF(timeout);
    if (!blocking) return Py_NewRef(not_fast);

    PyObject *arg0 = PyTuple_GET_ITEM(args, 0);
    PyObject *call_args[4];
    Py_ssize_t nargs;
    call_args[0] = sock;
    call_args[1] = arg0;
    if (method == M_RECV_INTO) {
        call_args[2] = zero_obj;
        call_args[3] = dontwait_obj;
        nargs = 4;
    } else {
        call_args[2] = dontwait_obj;
        nargs = 3;
    }
    long long start = now_ns();
    PyObject *result = PyObject_Vectorcall(fns[method], call_args, nargs, NULL);
    long long end = now_ns();
    if (result == NULL) {
        stash(start, end, -1);
        return NULL;  /* the Python side records the failure */
    }

    long long n, requested = -1;
    int odd = 0;
    if (method == M_RECV) {
        n = PyBytes_Check(result) ? PyBytes_GET_SIZE(result) : 0;
        Py_ssize_t want = PyLong_AsSsize_t(arg0);
        if (want == -1 && PyErr_Occurred()) PyErr_Clear();
        else odd = (n != want);
    } else {
        n = PyLong_AsLongLong(result);
        if (n == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            n = 0;
        }
        if (method == M_SEND || method == M_SENDALL) {
            if (PyBytes_Check(arg0)) {
                requested = PyBytes_GET_SIZE(arg0);
            } else {
                Py_buffer view;
                if (PyObject_GetBuffer(arg0, &view, PyBUF_SIMPLE) < 0) {
                    PyErr_Clear();
                    requested = n;  /* cannot happen: send() accepted it */
                } else {
                    requested = view.len;
                    PyBuffer_Release(&view);
                }
            }
            if (n < requested) {
                /* a blocking send that did not complete: Python continues it */
                stash(start, end, n);
                Py_DECREF(result);
                return Py_NewRef(partial);
            }
        }
    }
    Slot *s = slot_for(method, sock);
    if (s != NULL) record(s, end - start, n, odd);
    if (method == M_SENDALL) {
        Py_DECREF(result);
        result = Py_NewRef(Py_None);
    }
    if (end - start >= slow_ns && on_slow != NULL && on_slow != Py_None) {
        PyObject *r = PyObject_CallFunction(on_slow, "iOLLLOO", method, sock, start, end, n, result, args);
        if (r == NULL) {
            /* on_slow swallows its own errors: this is a signal handler's exception,
             * which surfaces here exactly as it would after CPython's method. */
            Py_DECREF(result);
            return NULL;
        }
        Py_DECREF(r);
    }
    return result;
}

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *bounds_seq;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOlO", &fns[M_RECV], &fns[M_RECV_INTO], &fns[M_SEND],
                          &gettimeout_fn, &family_descr, &type_descr, &context_var,
                          &not_fast, &partial, &on_slow, &bounds_seq, &dontwait, &zero_obj))
        return NULL;
    fns[M_SENDALL] = fns[M_SEND];
    PyObject *objs[] = {fns[M_RECV], fns[M_RECV_INTO], fns[M_SEND], gettimeout_fn, family_descr,
                        type_descr, context_var, not_fast, partial, on_slow, zero_obj};
    for (size_t i = 0; i < sizeof(objs) / sizeof(objs[0]); i++) Py_INCREF(objs[i]);
    if (!PyContextVar_CheckExact(context_var) || Py_TYPE(family_descr)->tp_descr_get == NULL
        || Py_TYPE(type_descr)->tp_descr_get == NULL) {
        PyErr_SetString(PyExc_TypeError, "bad context var or descriptors");
        return NULL;
    }
    PyObject *fast_seq = PySequence_Fast(bounds_seq, "bounds must be a sequence");
    if (fast_seq == NULL) return NULL;
    Py_ssize_t nb = PySequence_Fast_GET_SIZE(fast_seq);
    if (nb > MAXBOUNDS) {
        Py_DECREF(fast_seq);
        PyErr_SetString(PyExc_ValueError, "too many bounds");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nb; i++) {
        bounds[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast_seq, i));
    }
    Py_DECREF(fast_seq);
    if (PyErr_Occurred()) return NULL;
    nbounds = (int)nb;
    dontwait_obj = PyLong_FromLong(dontwait);
    configured = 1;
    Py_RETURN_NONE;
}

static PyObject *
set_slow_ns(PyObject *module, PyObject *arg)
{
    long long v = PyLong_AsLongLong(arg);
    if (v == -1 && PyErr_Occurred()) return NULL;
    slow_ns = v;
    Py_RETURN_NONE;
}

static PyObject *
last(PyObject *module, PyObject *unused)
{
    PyObject *dict = PyThreadState_GetDict();
    PyObject *t = dict ? PyDict_GetItemString(dict, "tracesock._speedups.last") : NULL;
    if (t == NULL) Py_RETURN_NONE;
    return Py_NewRef(t);
}

static PyObject *
snapshot(PyObject *module, PyObject *arg)
{
    int reset = PyObject_IsTrue(arg);
    if (reset < 0) return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (int i = 0; i < nslots; i++) {
        Slot *s = &slots[i];
        PyObject *counts = PyList_New(nbounds + 1);
        if (counts == NULL) goto error;
        for (int j = 0; j <= nbounds; j++) PyList_SET_ITEM(counts, j, PyLong_FromLongLong(s->counts[j]));
        PyObject *row = Py_BuildValue("iiiNLLLLL", s->method, s->family, s->type, counts, s->total,
                                      s->min, s->max, s->nbytes, s->odd);
        if (row == NULL || PyList_Append(out, row) < 0) {
            Py_XDECREF(row);
            goto error;
        }
        Py_DECREF(row);
        if (reset) {
            s->min = LLONG_MAX;
            s->max = -1;
        }
    }
    return out;
error:
    Py_DECREF(out);
    return NULL;
}

/* send_counted(fd, buffer, flags, acc): one *blocking* send(2) of buffer, the
 * GIL released, its outcome written into acc -- a writable buffer of 5 int64:
 * [0] += bytes sent, [1] start ns, [2] end ns, [3] result (-1 on error),
 * [4] errno -- before any Python code runs again.  A Python signal handler may
 * raise as soon as this returns (the interpreter runs it right after the
 * call); what reached the kernel is in acc all the same.  Returns the result
 * as an int; never raises for the syscall (the caller reads errno). */
static PyObject *
send_counted(PyObject *self, PyObject *args)
{
    int fd, flags;
    Py_buffer data, accbuf;
    if (!PyArg_ParseTuple(args, "iy*iw*:send_counted", &fd, &data, &flags, &accbuf))
        return NULL;
    if (accbuf.len < (Py_ssize_t)(5 * sizeof(long long))) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&accbuf);
        PyErr_SetString(PyExc_ValueError, "acc must hold 5 int64");
        return NULL;
    }
    long long *acc = (long long *)accbuf.buf;
    long long start, end;
    Py_ssize_t n;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    start = now_ns();
    n = send(fd, data.buf, (size_t)data.len, flags);
    if (n < 0)
        err = errno;
    end = now_ns();
    Py_END_ALLOW_THREADS
    if (n > 0)
        acc[0] += n;
    acc[1] = start;
    acc[2] = end;
    acc[3] = n;
    acc[4] = err;
    PyBuffer_Release(&data);
    PyBuffer_Release(&accbuf);
    return PyLong_FromSsize_t(n);
}

/* hold_signals() / release_signals(): span making in the main thread runs
 * with the asynchronous signals blocked (see _syscall.signal_mask for why).
 * The saved mask lives here, not in a Python variable, so a signal handler
 * raising between any two bytecodes can never leave the signals blocked:
 * release_signals() in a finally block always finds it.  hold_signals() runs
 * the handlers that were already due once the block is set (their exception
 * is raised from it).  Nested holds are counted. */
static sigset_t blockable, saved_mask;
static int blockable_ready = 0, hold_depth = 0;
static unsigned long main_ident = 0;

static PyObject *
signals_setup(PyObject *self, PyObject *args)
{
    PyObject *sigs;
    unsigned long ident;
    if (!PyArg_ParseTuple(args, "Ok:signals_setup", &sigs, &ident))
        return NULL;
    PyObject *it = PyObject_GetIter(sigs);
    if (it == NULL)
        return NULL;
    sigemptyset(&blockable);
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        long sig = PyLong_AsLong(item);
        Py_DECREF(item);
        if (sig == -1 && PyErr_Occurred()) {
            Py_DECREF(it);
            return NULL;
        }
        sigaddset(&blockable, (int)sig);
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    main_ident = ident;
    hold_depth = 0;
    blockable_ready = 1;
    Py_RETURN_NONE;
}

static PyObject *
hold_signals(PyObject *self, PyObject *noargs)
{
    if (!blockable_ready || PyThread_get_thread_ident() != main_ident)
        Py_RETURN_NONE;
    if (hold_depth++ == 0 && pthread_sigmask(SIG_BLOCK, &blockable, &saved_mask) != 0) {
        hold_depth = 0;
        Py_RETURN_NONE;
    }
    if (PyErr_CheckSignals() < 0)
        return NULL;  /* the block stays: release_signals() undoes it */
    Py_RETURN_NONE;
}

static PyObject *
release_signals(PyObject *self, PyObject *noargs)
{
    if (hold_depth > 0 && PyThread_get_thread_ident() == main_ident && --hold_depth == 0)
        pthread_sigmask(SIG_SETMASK, &saved_mask, NULL);
    Py_RETURN_NONE;
}


/* --- the TLS wire level of the native engine --------------------------------
 *
 * An ssl.SSLSocket's OpenSSL reads and writes the descriptor itself, inside
 * _ssl.c with the GIL released: Python never sees those syscalls.  OpenSSL
 * can tell us, though: every read and write of the socket BIO (one read(2)
 * or write(2) each, see bss_sock.c) calls the BIO's callback before and
 * after.  tls_begin(sslobj) puts our callback on the connection's socket BIO
 * (once) and starts recording for this thread; tls_end() stops and returns
 * what happened.  The callback only observes: it returns OpenSSL's own
 * result and leaves errno as it found it, so the connection behaves exactly
 * as without it.  It may run without the GIL, so it writes only to this
 * thread's own record (a pthread key, freed at thread exit), bounded: events
 * past TLS_EVENTS are counted, not kept; the totals stay exact.
 *
 * OpenSSL is reached through the _ssl module's own libssl (dlsym on its
 * handle: nothing to build against), and the SSL* through the layout that
 * _ssl.c has kept since Python 3.0 (PyObject_HEAD, the socket weakref, the
 * SSL*), checked against SSL_get_ex_data(ssl, 0), where _ssl.c stores the
 * object itself.  Anything unexpected and tls_begin() returns False: the
 * call is recorded without its wire level. */

#include <dlfcn.h>

#define TLS_EVENTS 256
#define BIO_CB_READ_ 0x02
#define BIO_CB_WRITE_ 0x03
#define BIO_CB_RETURN_ 0x80
#define BIO_TYPE_SOCKET_ (5 | 0x0400 | 0x0100)

typedef long (*bio_cb_ex)(void *b, int oper, const char *argp, size_t len, int argi, long argl,
                          int ret, size_t *processed);

static void *(*p_SSL_get_rbio)(const void *);
static void *(*p_SSL_get_wbio)(const void *);
static void *(*p_SSL_get_ex_data)(const void *, int);
static void (*p_BIO_set_callback_ex)(void *, bio_cb_ex);
static bio_cb_ex (*p_BIO_get_callback_ex)(const void *);
static int (*p_BIO_method_type)(const void *);
static int tls_ready = 0;
static pthread_key_t tls_key;

typedef struct {
    long long start, end, result, requested;
    int write, err;
} TlsEvent;

typedef struct {
    long long counts[MAXBOUNDS + 1];
    long long total, min, max, nbytes;
} Agg;

static void agg_add(Agg *a, long long d, long long n) {
    a->counts[bucket(d)] += 1;
    a->total += d;
    if (d < a->min) a->min = d;
    if (d > a->max) a->max = d;
    a->nbytes += n;
}

static void agg_reset(Agg *a) {
    memset(a, 0, sizeof(*a));
    a->min = LLONG_MAX;
    a->max = -1;
}

static long long agg_count(const Agg *a) {
    long long c = 0;
    for (int i = 0; i <= nbounds; i++) c += a->counts[i];
    return c;
}

typedef struct {
    int active, n;
    long long pending, pending_len, dropped, rx, tx, call_start, call_end;
    TlsEvent ev[TLS_EVENTS];
    /* Past TLS_EVENTS, events are aggregated instead of kept, so the metrics
     * stay exact however long the call: the syscalls by direction, the waits
     * _ssl.c made after an EAGAIN (the gap up to the next syscall), and the
     * outcomes.  last_eagain_end: end of the latest event if it failed with
     * EAGAIN (the wait after it is still going on), else 0. */
    int over_used;
    Agg over[2], over_wait;
    long long over_eagain, over_eintr, over_partial, over_failed, last_eagain_end;
} TlsRecord;

typedef struct {
    PyObject_HEAD
    PyObject *socket_weakref;
    void *ssl;
} SSLSocketHead;

static long
tls_callback(void *b, int oper, const char *argp, size_t len, int argi, long argl, int ret,
             size_t *processed)
{
    int op = oper & ~BIO_CB_RETURN_;
    if (op != BIO_CB_READ_ && op != BIO_CB_WRITE_)
        return ret;
    int saved = errno;
    TlsRecord *r = pthread_getspecific(tls_key);
    if (r == NULL || !r->active)
        return ret;
    if (!(oper & BIO_CB_RETURN_)) {
        r->pending = now_ns();
        r->pending_len = (long long)len;
        if (r->last_eagain_end && r->over_used)  /* the wait after an EAGAIN has ended */
            agg_add(&r->over_wait, r->pending - r->last_eagain_end, 0);
        r->last_eagain_end = 0;
        errno = saved;
        return ret;
    }
    long long end = now_ns();
    long long moved = (ret > 0 && processed != NULL) ? (long long)*processed : 0;
    if (op == BIO_CB_READ_) r->rx += moved; else r->tx += moved;
    if (r->n < TLS_EVENTS) {
        TlsEvent *e = &r->ev[r->n++];
        e->start = r->pending;
        e->end = end;
        e->requested = r->pending_len;
        e->write = (op == BIO_CB_WRITE_);
        e->result = ret > 0 ? moved : (ret == 0 ? 0 : -1);
        e->err = ret < 0 ? saved : 0;
    } else {
        int w = (op == BIO_CB_WRITE_);
        if (!r->over_used) {
            agg_reset(&r->over[0]);
            agg_reset(&r->over[1]);
            agg_reset(&r->over_wait);
            r->over_eagain = r->over_eintr = r->over_partial = r->over_failed = 0;
            r->over_used = 1;
            /* the wait after the last kept event, if it was an EAGAIN, is ours now */
            TlsEvent *last = &r->ev[TLS_EVENTS - 1];
            if (last->result < 0 && (last->err == EAGAIN || last->err == EWOULDBLOCK))
                agg_add(&r->over_wait, r->pending - last->end, 0);
        }
        r->dropped++;
        agg_add(&r->over[w], end - r->pending, moved);
        if (ret < 0) {
            if (saved == EAGAIN || saved == EWOULDBLOCK) r->over_eagain++;
            else if (saved == EINTR) r->over_eintr++;
            else r->over_failed++;
        } else if (w && moved < r->pending_len) {
            r->over_partial++;
        }
    }
    if (ret < 0 && (saved == EAGAIN || saved == EWOULDBLOCK))
        r->last_eagain_end = end;
    errno = saved;
    return ret;
}

static PyObject *
tls_setup(PyObject *self, PyObject *arg)
{
    const char *path = PyUnicode_AsUTF8(arg);
    if (path == NULL)
        return NULL;
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL)
        Py_RETURN_FALSE;
    p_SSL_get_rbio = dlsym(h, "SSL_get_rbio");
    p_SSL_get_wbio = dlsym(h, "SSL_get_wbio");
    p_SSL_get_ex_data = dlsym(h, "SSL_get_ex_data");
    p_BIO_set_callback_ex = dlsym(h, "BIO_set_callback_ex");
    p_BIO_get_callback_ex = dlsym(h, "BIO_get_callback_ex");
    p_BIO_method_type = dlsym(h, "BIO_method_type");
    if (!p_SSL_get_rbio || !p_SSL_get_wbio || !p_SSL_get_ex_data || !p_BIO_set_callback_ex
        || !p_BIO_get_callback_ex || !p_BIO_method_type)
        Py_RETURN_FALSE;  /* the handle stays open: _ssl is loaded for good anyway */
    if (!tls_ready && pthread_key_create(&tls_key, free) != 0)
        Py_RETURN_FALSE;
    tls_ready = 1;
    Py_RETURN_TRUE;
}

/* Our callback on this BIO (1), or not possible (0): not a socket BIO, or
 * someone else's callback there (never replaced). */
static int watch_bio(void *bio) {
    if (bio == NULL || p_BIO_method_type(bio) != BIO_TYPE_SOCKET_)
        return 0;
    bio_cb_ex cb = p_BIO_get_callback_ex(bio);
    if (cb == tls_callback)
        return 1;
    if (cb != NULL)
        return 0;
    p_BIO_set_callback_ex(bio, tls_callback);
    return 1;
}

/* Our callback on the connection's socket BIO(s): 1, or 0 when not possible. */
static int watch(PyObject *sslobj) {
    if (!tls_ready || strcmp(Py_TYPE(sslobj)->tp_name, "_ssl._SSLSocket") != 0)
        return 0;
    void *ssl = ((SSLSocketHead *)sslobj)->ssl;
    if (ssl == NULL || p_SSL_get_ex_data(ssl, 0) != (void *)sslobj)
        return 0;
    void *rbio = p_SSL_get_rbio(ssl), *wbio = p_SSL_get_wbio(ssl);
    return watch_bio(rbio) && (wbio == rbio || watch_bio(wbio));
}

static TlsRecord *thread_record(void) {
    TlsRecord *r = pthread_getspecific(tls_key);
    if (r == NULL) {
        r = malloc(sizeof(TlsRecord));
        if (r == NULL || pthread_setspecific(tls_key, r) != 0) {
            free(r);
            return NULL;
        }
        r->active = 0;
    }
    return r;
}

static void start_record(TlsRecord *r) {
    r->active = 1;
    r->n = 0;
    r->dropped = r->rx = r->tx = 0;
    r->call_start = r->call_end = 0;
    r->over_used = 0;
    r->last_eagain_end = 0;
}

static PyObject *agg_tuple(const Agg *a) {
    PyObject *counts = PyList_New(nbounds + 1);
    if (counts == NULL) return NULL;
    for (int i = 0; i <= nbounds; i++) {
        PyObject *c = PyLong_FromLongLong(a->counts[i]);
        if (c == NULL) {
            Py_DECREF(counts);
            return NULL;
        }
        PyList_SET_ITEM(counts, i, c);
    }
    return Py_BuildValue("(NLLLLL)", counts, a->total, a->min, a->max, a->nbytes, agg_count(a));
}

/* The aggregates past TLS_EVENTS, or None: (reads, writes, waits, eagain,
 * eintr, partial writes, other failures, end of a trailing EAGAIN or 0);
 * reads/writes/waits each (counts, total, min, max, bytes, count). */
static PyObject *overflow(TlsRecord *r) {
    if (!r->over_used)
        Py_RETURN_NONE;
    return Py_BuildValue("(NNNLLLLL)", agg_tuple(&r->over[0]), agg_tuple(&r->over[1]),
                         agg_tuple(&r->over_wait), r->over_eagain, r->over_eintr,
                         r->over_partial, r->over_failed, r->last_eagain_end);
}

static void slot_merge(Slot *s, const Agg *a) {
    for (int i = 0; i <= nbounds; i++) s->counts[i] += a->counts[i];
    s->total += a->total;
    if (a->min < s->min) s->min = a->min;
    if (a->max > s->max) s->max = a->max;
    s->nbytes += a->nbytes;
}

static PyObject *
tls_begin(PyObject *self, PyObject *sslobj)
{
    if (!watch(sslobj))
        Py_RETURN_FALSE;
    TlsRecord *r = thread_record();
    if (r == NULL)
        Py_RETURN_FALSE;
    start_record(r);
    Py_RETURN_TRUE;
}

/* tls_end() -> (events, dropped, wire bytes received, wire bytes sent); each
 * event (write, start_ns, end_ns, result, errno, bytes asked for), result -1
 * on failure; then the start and end of the last tls_fast call and the
 * aggregates of the events past TLS_EVENTS (see overflow()). */
static PyObject *
tls_end(PyObject *self, PyObject *noargs)
{
    TlsRecord *r = tls_ready ? pthread_getspecific(tls_key) : NULL;
    if (r == NULL)
        return Py_BuildValue("()LLLLLO", 0LL, 0LL, 0LL, 0LL, 0LL, Py_None);
    r->active = 0;
    PyObject *events = PyTuple_New(r->n);
    if (events == NULL)
        return NULL;
    for (int i = 0; i < r->n; i++) {
        TlsEvent *e = &r->ev[i];
        PyObject *t = Py_BuildValue("(iLLLiL)", e->write, e->start, e->end, e->result, e->err, e->requested);
        if (t == NULL) {
            Py_DECREF(events);
            return NULL;
        }
        PyTuple_SET_ITEM(events, i, t);
    }
    PyObject *over = overflow(r);
    if (over == NULL) {
        Py_DECREF(events);
        return NULL;
    }
    r->over_used = 0;  /* taken */
    return Py_BuildValue("NLLLLLN", events, r->dropped, r->rx, r->tx, r->call_start, r->call_end, over);
}

/* tls_fast(original, sock, args, kwargs, kind): the whole of a TLS data call
 * when nothing about it needs Python -- the common case, in C.
 *
 * Declines (NOT_FAST, nothing done) unless the OpenTelemetry context is empty
 * (as in fast()), no TLS call of this thread is being recorded, sock._sslobj
 * is _ssl's object with a watchable socket BIO, and, for a send (kind 1), the
 * data is a single positional buffer under 64 KiB (larger sends take a TCP
 * snapshot up front, in Python).  Otherwise it calls original(sock, *args,
 * **kwargs) with the wire level recorded, and then:
 *   - when every ciphertext syscall succeeded in full, no event was dropped
 *     and the call was under the slow threshold: adds each syscall to the
 *     M_WIRE_READ/M_WIRE_WRITE slots (duration, bytes) and returns the result;
 *   - when the original raised: returns NULL with its exception, the record
 *     left for tls_end() (the Python side makes the call from it);
 *   - otherwise: (UNUSUAL, result) with the record left the same way.
 * Inside a call being recorded (sendall -> send) it returns NESTED: the
 * caller runs the original as part of the outer call. */
static PyObject *unusual = NULL, *nested = NULL;
#define TLS_FAST_SEND_MAX (64 * 1024)

static PyObject *
tls_fast(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 5 || !configured || unusual == NULL) {
        PyErr_SetString(PyExc_TypeError, "tls_fast(original, sock, args, kwargs, kind)");
        return NULL;
    }
    PyObject *original = argv[0], *sock = argv[1], *args = argv[2], *kwargs = argv[3];
    long kind = PyLong_AsLong(argv[4]);
    if (kind == -1 && PyErr_Occurred())
        return NULL;
    if (!PyTuple_Check(args) || PyTuple_GET_SIZE(args) > 7 || context_busy())
        return Py_NewRef(not_fast);
    int has_kwargs = kwargs != Py_None && (!PyDict_Check(kwargs) || PyDict_GET_SIZE(kwargs) > 0);
    if (kind == 1) {
        if (has_kwargs || PyTuple_GET_SIZE(args) < 1)
            return Py_NewRef(not_fast);
        Py_buffer view;
        if (PyObject_GetBuffer(PyTuple_GET_ITEM(args, 0), &view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            return Py_NewRef(not_fast);
        }
        Py_ssize_t len = view.len;
        PyBuffer_Release(&view);
        if (len >= TLS_FAST_SEND_MAX)
            return Py_NewRef(not_fast);
    }
    TlsRecord *r = tls_ready ? thread_record() : NULL;
    if (r == NULL)
        return Py_NewRef(not_fast);
    if (r->active)  /* inside a TLS call being recorded (sendall -> send): part of it */
        return Py_NewRef(nested);
    PyObject *sslobj = PyObject_GetAttrString(sock, "_sslobj");
    if (sslobj == NULL) {
        PyErr_Clear();
        return Py_NewRef(not_fast);
    }
    int ok = watch(sslobj);
    Py_DECREF(sslobj);
    if (!ok)
        return Py_NewRef(not_fast);

    PyObject *stack[8];
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    stack[0] = sock;
    for (Py_ssize_t i = 0; i < n; i++)
        stack[i + 1] = PyTuple_GET_ITEM(args, i);
    start_record(r);
    long long start = now_ns();
    PyObject *result;
    if (has_kwargs) {
        PyObject *full = PyTuple_New(n + 1);
        if (full == NULL) {
            r->active = 0;
            PyErr_Clear();
            return Py_NewRef(not_fast);
        }
        for (Py_ssize_t i = 0; i <= n; i++)
            PyTuple_SET_ITEM(full, i, Py_NewRef(stack[i]));
        result = PyObject_Call(original, full, kwargs);
        Py_DECREF(full);
    } else {
        result = PyObject_Vectorcall(original, stack, (size_t)(n + 1), NULL);
    }
    long long end = now_ns();
    r->active = 0;
    r->call_start = start;
    r->call_end = end;
    if (result == NULL)
        return NULL;
    int usual = end - start < slow_ns
        && (!r->over_used || (r->over_eagain + r->over_eintr + r->over_partial + r->over_failed) == 0);
    for (int i = 0; usual && i < r->n; i++) {
        TlsEvent *e = &r->ev[i];
        if (e->result < 0 || (e->write && e->result < e->requested))
            usual = 0;
    }
    if (!usual)
        return Py_BuildValue("(ON)", unusual, result);
    for (int i = 0; i < r->n; i++) {
        TlsEvent *e = &r->ev[i];
        Slot *s = slot_for(e->write ? M_WIRE_WRITE : M_WIRE_READ, sock);
        if (s != NULL)
            record(s, e->end - e->start, e->result, 0);
    }
    if (r->over_used) {
        for (int w = 0; w < 2; w++) {
            Slot *s = slot_for(w ? M_WIRE_WRITE : M_WIRE_READ, sock);
            if (s != NULL)
                slot_merge(s, &r->over[w]);
        }
    }
    r->n = 0;  /* taken */
    r->over_used = 0;
    return result;
}

static PyObject *
tls_fast_setup(PyObject *self, PyObject *args)
{
    PyObject *u, *n;
    if (!PyArg_ParseTuple(args, "OO:tls_fast_setup", &u, &n))
        return NULL;
    Py_XSETREF(unusual, Py_NewRef(u));
    Py_XSETREF(nested, Py_NewRef(n));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"signals_setup", signals_setup, METH_VARARGS,
     "signals_setup(signals, main_thread_ident): what hold_signals blocks, and where"},
    {"hold_signals", hold_signals, METH_NOARGS, "block the asynchronous signals (main thread)"},
    {"release_signals", release_signals, METH_NOARGS, "undo hold_signals"},
    {"send_counted", send_counted, METH_VARARGS,
     "send_counted(fd, buffer, flags, acc) -> result; acc: [bytes total, start, end, result, errno]"},
    {"tls_setup", tls_setup, METH_O, "tls_setup(path of _ssl) -> True when OpenSSL's BIO callbacks are usable"},
    {"tls_begin", tls_begin, METH_O, "tls_begin(sslobj) -> True: this thread records the wire level of sslobj"},
    {"tls_end", tls_end, METH_NOARGS,
     "tls_end() -> (events, dropped, wire rx, wire tx, start_ns, end_ns, overflow)"},
    {"tls_fast", (PyCFunction)(void (*)(void))tls_fast, METH_FASTCALL,
     "tls_fast(original, sock, args, kwargs, kind) -> result, NOT_FAST or (UNUSUAL, result)"},
    {"tls_fast_setup", tls_fast_setup, METH_VARARGS, "tls_fast_setup(UNUSUAL, NESTED): tls_fast's marks"},
    {"fast", (PyCFunction)(void (*)(void))fast, METH_FASTCALL,
     "fast(method, sock, args, kwargs) -> result, NOT_FAST or PARTIAL"},
    {"configure", configure, METH_VARARGS, "configure(...): set the objects the fast path uses"},
    {"set_slow_ns", set_slow_ns, METH_O, "set_slow_ns(ns): calls at least this long call on_slow"},
    {"last", last, METH_NOARGS, "last() -> (start_ns, end_ns, bytes) of the last fast attempt"},
    {"snapshot", snapshot, METH_O,
     "snapshot(reset_min_max) -> [(method, family, type, counts, total, min, max, bytes, odd)]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "tracesock._speedups",
    "C hot path for tracesock's commonest socket calls (optional).", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module_def);
}
