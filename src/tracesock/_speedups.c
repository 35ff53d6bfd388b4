/* tracesock._speedups: the hot path of the commonest calls, in C.
 *
 * Optional: when this module cannot be built or imported, sockets/methods.py
 * does the same in Python (about 11x plain sockets' instructions on a
 * 64-byte send+recv pingpong; this brings it below plain's: see the cost
 * section of docs/architecture.md).
 *
 * It does exactly what the Python fast path does -- no more:
 *   1. bail out (return NOT_FAST, no syscall made) unless the call is the
 *      plain form (positional args only, the one-argument form), the socket
 *      is blocking (gettimeout() is None) and the OpenTelemetry context does
 *      not suppress instrumentation (the telemetry pipeline's own I/O);
 *   2. make one syscall with MSG_DONTWAIT -- recv(n) and send(bytes) here,
 *      as socketmodule.c makes it (native_call), anything else through
 *      CPython's own method -- timing it with CLOCK_MONOTONIC (the clock of
 *      time.perf_counter_ns);
 *   3. on success, add the duration to a histogram and the bytes to a
 *      counter, per (method, family, type) -- the GIL makes these updates
 *      atomic -- and call on_slow() if the call reached the slow threshold
 *      or ran in a non-empty context (a recording span there gets a span);
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
#include <stddef.h>
#include <frameobject.h>  /* PyFrame_GetBack (3.10) */

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

/* The OpenTelemetry context as fast_call sees it: CTX_EMPTY; CTX_HELD, it
 * holds something (a span, baggage) and does not suppress instrumentation:
 * the call is made here all the same and on_slow is told, which makes the
 * span if a recording one is current (what the Python path would do after
 * the same syscall, minus its frames); CTX_DECLINE, suppressed (the
 * telemetry pipeline's own I/O: not traced, not counted) or unreadable. */
enum { CTX_EMPTY = 0, CTX_HELD = 1, CTX_DECLINE = 2 };
static PyObject *suppress_key = NULL;  /* opentelemetry.context's suppression key */
static int spans_in_context = 0;       /* set_slow_ns(..., in_context): spans are made at all */

static int context_state(void) {
    PyObject *ctx = NULL;
    if (PyContextVar_Get(context_var, NULL, &ctx) < 0) {
        PyErr_Clear();
        return CTX_DECLINE;
    }
    if (ctx == NULL) return CTX_EMPTY;
    int state = CTX_DECLINE;
    if (PyDict_Check(ctx) && PyDict_GET_SIZE(ctx) == 0) {
        state = CTX_EMPTY;
    } else if (PyDict_Check(ctx) && suppress_key != NULL) {
        PyObject *v = PyDict_GetItemWithError(ctx, suppress_key);  /* borrowed */
        int truth = v == NULL ? (PyErr_Occurred() ? -1 : 0) : PyObject_IsTrue(v);
        if (truth < 0) PyErr_Clear();
        else state = truth ? CTX_DECLINE : CTX_HELD;
    }
    Py_DECREF(ctx);
    return state;
}

/* Is the OpenTelemetry context non-empty (a span, baggage, suppression)? */
static int context_busy(void) {
    return context_state() != CTX_EMPTY;
}

/* The socket object's own fields, read directly when their layout is the
 * one socketmodule.h has declared since 3.5 (PySocketSockObject: fd, family,
 * type, proto, error handler, timeout in ns, negative when blocking).
 * configure() checks it against a probe socket of known family, type and
 * timeout; when anything differs, the descriptors and gettimeout() are used. */
typedef struct {
    PyObject_HEAD
    int sock_fd;
    int sock_family;
    int sock_type;
    int sock_proto;
    PyObject *(*errorhandler)(void);
    long long sock_timeout;
} SockHead;

static PyTypeObject *sock_type = NULL;
static int layout_ok = 0;

/* 1: blocking (gettimeout() is None), 0: not, -1: cannot tell (not a socket). */
static int sock_blocking(PyObject *sock) {
    if (layout_ok) {
        if (!PyObject_TypeCheck(sock, sock_type)) return -1;
        return ((SockHead *)sock)->sock_timeout < 0;
    }
    PyObject *timeout = PyObject_Vectorcall(gettimeout_fn, &sock, 1, NULL);
    if (timeout == NULL) {
        PyErr_Clear();
        return -1;
    }
    int blocking = (timeout == Py_None);
    Py_DECREF(timeout);
    return blocking;
}

/* The last slot found per method: a program mostly uses one kind of socket. */
static Slot *last_slot[M_COUNT + 2];

static Slot *slot_of(int method, PyObject *sock) {
    if (layout_ok && PyObject_TypeCheck(sock, sock_type)) {
        Slot *s = last_slot[method];
        SockHead *h = (SockHead *)sock;
        if (s != NULL && s->family == h->sock_family && s->type == h->sock_type) return s;
    }
    Slot *s = slot_for(method, sock);
    if (s != NULL) last_slot[method] = s;
    return s;
}

/* Profile mode (telemetry.profile.Profile.fast, in C): every call of the C
 * path is added to the profile entry of its Python stack.  The key is the
 * Profile's own -- (method, id(code), f_lasti, ... innermost first, then
 * (0, TRUNCATED) past max_depth) -- looked up in this thread's entries dict;
 * when there is none yet, or the stack holds an asyncio callback (which the
 * Python side splices a task into), it declines and Python records the call. */
static PyObject *prof_local = NULL, *prof_names[M_COUNT], *entries_name = NULL;
static int prof_depth = 0;
static void *prof_hrun = NULL;

static int list_add(PyObject *list, Py_ssize_t i, long long v) {
    PyObject *old = PyList_GET_ITEM(list, i);
    long long x = PyLong_AsLongLong(old);
    if (x == -1 && PyErr_Occurred()) return -1;
    PyObject *nw = PyLong_FromLongLong(x + v);
    if (nw == NULL) return -1;
    PyList_SET_ITEM(list, i, nw);
    Py_DECREF(old);
    return 0;
}

static int frame_lasti(PyFrameObject *f) {
#if PY_VERSION_HEX >= 0x030B0000
    return PyFrame_GetLasti(f);
#else
    PyObject *v = PyObject_GetAttrString((PyObject *)f, "f_lasti");
    if (v == NULL) return -2;
    long x = PyLong_AsLong(v);
    Py_DECREF(v);
    return (int)x;
#endif
}

/* 1: recorded; 0: declined (the Python side records it), no exception set. */
static int profile_record(int method, long long d, long long n) {
    PyFrameObject *f = PyEval_GetFrame();
    if (f == NULL || prof_depth <= 0 || prof_depth > 256) return 0;
    PyObject *items[2 * 256 + 3];
    int k = 0, ok = 1;
    items[k++] = Py_NewRef(prof_names[method]);
    PyFrameObject *g = (PyFrameObject *)Py_NewRef(f);
    for (int i = 0; i < prof_depth && g != NULL && ok; i++) {
        PyCodeObject *code = PyFrame_GetCode(g);
        int lasti = frame_lasti(g);
        if ((void *)code == prof_hrun || lasti == -2) ok = 0;
        items[k++] = PyLong_FromVoidPtr(code);
        items[k++] = PyLong_FromLong(lasti);
        Py_DECREF(code);
        PyFrameObject *back = PyFrame_GetBack(g);
        Py_DECREF(g);
        g = back;
    }
    if (g != NULL) {  /* deeper than max_depth */
        items[k++] = PyLong_FromLong(0);
        items[k++] = PyLong_FromLong(0);  /* TRUNCATED */
        Py_DECREF(g);
    }
    PyObject *key = PyTuple_New(k);
    for (int i = 0; i < k; i++) {
        if (items[i] == NULL) ok = 0;
        if (key != NULL) PyTuple_SET_ITEM(key, i, items[i]);
        else Py_XDECREF(items[i]);
    }
    if (key == NULL || !ok) {
        Py_XDECREF(key);
        PyErr_Clear();
        return 0;
    }
    PyObject *entries = PyObject_GetAttr(prof_local, entries_name);
    PyObject *e = (entries != NULL && PyDict_CheckExact(entries)) ? PyDict_GetItemWithError(entries, key) : NULL;
    Py_DECREF(key);
    int done = 0;
    if (e != NULL && PyList_CheckExact(e) && PyList_GET_SIZE(e) >= 12) {
        /* _FAST_CALLS, _FAST_NS, then sent (4) or received (5) */
        done = list_add(e, 10, 1) == 0 && list_add(e, 11, d) == 0 && list_add(e, method >= M_SEND ? 4 : 5, n) == 0;
    }
    Py_XDECREF(entries);
    PyErr_Clear();
    return done;
}

static PyObject *
set_profile(PyObject *module, PyObject *args)
{
    PyObject *local, *names;
    int depth;
    PyObject *hrun;
    if (!PyArg_ParseTuple(args, "OOiO:set_profile", &local, &names, &depth, &hrun))
        return NULL;
    if (local == Py_None) {
        Py_CLEAR(prof_local);
        Py_RETURN_NONE;
    }
    if (!PyTuple_Check(names) || PyTuple_GET_SIZE(names) != M_COUNT) {
        PyErr_SetString(PyExc_TypeError, "set_profile: names must be a tuple of the C methods");
        return NULL;
    }
    if (entries_name == NULL && (entries_name = PyUnicode_InternFromString("entries")) == NULL)
        return NULL;
    for (int i = 0; i < M_COUNT; i++) Py_XSETREF(prof_names[i], Py_NewRef(PyTuple_GET_ITEM(names, i)));
    prof_depth = depth;
    prof_hrun = hrun == Py_None ? NULL : (void *)hrun;
    Py_XSETREF(prof_local, Py_NewRef(local));
    Py_RETURN_NONE;
}

/* recv(n) and send(bytes) -- the commonest forms -- made here as CPython's
 * sock_recv and sock_send make them on a blocking socket (socketmodule.c:
 * the same syscall on the same fd with the GIL released around it, EINTR
 * retried once the handlers ran without raising, OSError from errno as
 * set_error makes it, the buffer allocated at n and shrunk to what arrived),
 * without going through the method's argument parsing (a tuple, a format
 * string).  The GIL is released even though a MSG_DONTWAIT call cannot
 * block: keeping it would be cheaper, but it changes when other threads run
 * (a thread waiting for the GIL would wait for the switch interval, 5 ms,
 * where untraced it runs at once) -- tests/test_traps.py's signal storm sees
 * it.  Anything else (recv of 0 or of a non-int, a buffer other than bytes)
 * returns 0 and goes to CPython's method; 1: done, *out the result or NULL
 * with the exception set. */
/* One recv(2) or send(2) with MSG_DONTWAIT as sock_call_ex makes it: the GIL
 * released around it, EINTR retried once the handlers ran without raising.
 * -2: a handler raised (its exception is set); -1: failed, errno says why. */
static ssize_t dontwait_io(int writing, int fd, char *p, size_t len) {
    for (;;) {
        ssize_t r;
        Py_BEGIN_ALLOW_THREADS
        r = writing ? send(fd, p, len, (int)dontwait) : recv(fd, p, len, (int)dontwait);
        Py_END_ALLOW_THREADS
        if (r >= 0 || errno != EINTR) return r;
        if (PyErr_CheckSignals() < 0) return -2;
    }
}

static int native_call(int method, PyObject *sock, PyObject *arg0, PyObject **out) {
    if (!layout_ok || method == M_RECV_INTO) return 0;  /* sock_blocking checked the type */
    int fd = ((SockHead *)sock)->sock_fd;
    ssize_t r;
    if (method == M_RECV) {
        if (!PyLong_CheckExact(arg0)) return 0;
        Py_ssize_t want = PyLong_AsSsize_t(arg0);
        if (want <= 0) {  /* 0, negative, or too large: CPython's own answer */
            PyErr_Clear();
            return 0;
        }
        PyObject *buf = PyBytes_FromStringAndSize(NULL, want);
        if (buf == NULL) {
            *out = NULL;
            return 1;
        }
        r = dontwait_io(0, fd, PyBytes_AS_STRING(buf), (size_t)want);
        if (r < 0) {
            int saved = errno;
            Py_DECREF(buf);
            errno = saved;
            *out = r == -2 ? NULL : PyErr_SetFromErrno(PyExc_OSError);
            return 1;
        }
        if (r != want) _PyBytes_Resize(&buf, (Py_ssize_t)r);  /* NULL and MemoryError on failure */
        *out = buf;
        return 1;
    }
    if (!PyBytes_CheckExact(arg0)) return 0;
    r = dontwait_io(1, fd, PyBytes_AS_STRING(arg0), (size_t)PyBytes_GET_SIZE(arg0));
    *out = r == -2 ? NULL : r < 0 ? PyErr_SetFromErrno(PyExc_OSError) : PyLong_FromSsize_t((Py_ssize_t)r);
    return 1;
}

/* The C hot path of one call sock.<method>(arg0): the result, NOT_FAST
 * (nothing done), PARTIAL (continue in Python) or NULL with the exception.
 * args: the call's positional arguments for on_slow, or NULL to make them. */
static PyObject *
fast_call(int method, PyObject *sock, PyObject *arg0, PyObject *args)
{
    int ctx_state = context_state();
    if (ctx_state == CTX_DECLINE) return Py_NewRef(not_fast);
    if (sock_blocking(sock) != 1) return Py_NewRef(not_fast);

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
    PyObject *result;
    if (!native_call(method, sock, arg0, &result))
        result = PyObject_Vectorcall(fns[method], call_args, nargs, NULL);
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
    Slot *s = slot_of(method, sock);
    if (s != NULL) record(s, end - start, n, odd);
    if (method == M_SENDALL) {
        Py_DECREF(result);
        result = Py_NewRef(Py_None);
    }
    int profiled = 1;
    if (prof_local != NULL) profiled = profile_record(method, end - start, n);
    if ((end - start >= slow_ns || !profiled || (ctx_state == CTX_HELD && spans_in_context))
        && on_slow != NULL && on_slow != Py_None) {
        PyObject *made = NULL;
        if (args == NULL) {
            args = made = PyTuple_Pack(1, arg0);
            if (made == NULL) {
                PyErr_Clear();
                return result;  /* no span for this one; the metrics have it */
            }
        }
        PyObject *r = PyObject_CallFunction(on_slow, "iOLLLOOO", method, sock, start, end, n, result, args,
                                            profiled ? Py_True : Py_False);
        Py_XDECREF(made);
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
        || PyTuple_GET_SIZE(args) != 1) {
        return Py_NewRef(not_fast);
    }
    return fast_call(method, sock, PyTuple_GET_ITEM(args, 0), args);
}

/* --- the patched methods themselves: a method type of our own -------------
 *
 * socket.socket.recv & co. while instrumented.  A Method behaves as the
 * Python function it stands for (its `fallback`, dressed the same way: doc,
 * name, qualified name, module, __wrapped__ live in its __dict__): bound to
 * an instance it gives a bound method (types.MethodType, __func__ the
 * Method), looked up on the class it gives itself, it pickles by reference
 * (its __qualname__ in its __module__).  Called as sock.recv(64) -- one
 * positional argument, nothing else -- it runs fast_call() with no Python
 * frame and no argument packing (vectorcall, and Py_TPFLAGS_METHOD_DESCRIPTOR
 * so the interpreter does not even make the bound method); everything else,
 * and whatever fast_call() declines, is the fallback's, called with the very
 * same arguments.  An exception of the fast path goes to raised(sock, m,
 * args, kwargs, exc), a call to continue (PARTIAL) to cont(sock, m, args,
 * kwargs), as the Python wrapper did. */
typedef struct {
    PyObject_HEAD
    int index;
    PyObject *fallback, *m, *raised, *cont, *dict, *weakrefs;
    vectorcallfunc vectorcall;
} Method;

static int handlers_before_continuing(void);

static PyObject *
method_continue(Method *self, PyObject *sock, PyObject *arg0, PyObject *r)
{
    /* r: NULL (the fast path raised) or PARTIAL */
    PyObject *args = PyTuple_Pack(1, arg0);
    PyObject *kwargs = args ? PyDict_New() : NULL;
    if (kwargs == NULL) {
        Py_XDECREF(args);
        Py_XDECREF(r);
        return NULL;
    }
    if (r == NULL) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL) PyException_SetTraceback(value, tb);
        Py_XDECREF(type);
        Py_XDECREF(tb);
        PyObject *stack[] = {sock, self->m, args, kwargs, value};
        r = PyObject_Vectorcall(self->raised, stack, 5, NULL);
        Py_XDECREF(value);
    }
    if (r == partial && handlers_before_continuing() < 0) {
        Py_DECREF(r);  /* a handler raised: as it would at the continuation's first bytecode */
        r = NULL;
    } else if (r == partial) {
        Py_DECREF(r);
        PyObject *stack[] = {sock, self->m, args, kwargs};
        r = PyObject_Vectorcall(self->cont, stack, 4, NULL);
    }
    Py_DECREF(args);
    Py_DECREF(kwargs);
    return r;
}

static PyObject *
method_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Method *self = (Method *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0))
        return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    PyObject *r = fast_call(self->index, args[0], args[1], NULL);
    if (r == not_fast) {
        Py_DECREF(r);
        return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    }
    if (r == NULL || r == partial) return method_continue(self, args[0], args[1], r);
    return r;
}

static PyObject *
method_get(PyObject *self, PyObject *obj, PyObject *type)
{
    if (obj == NULL || obj == Py_None) return Py_NewRef(self);
    return PyMethod_New(self, obj);
}

static PyObject *
method_reduce(PyObject *self, PyObject *unused)
{
    /* by reference, as a function: pickle finds __qualname__ in __module__ */
    return PyObject_GetAttrString(self, "__qualname__");
}

static PyObject *
method_repr(PyObject *self)
{
    PyObject *q = PyObject_GetAttrString(self, "__qualname__");
    if (q == NULL) {
        PyErr_Clear();
        return PyUnicode_FromFormat("<function at %p>", self);
    }
    PyObject *r = PyUnicode_FromFormat("<function %U at %p>", q, self);
    Py_DECREF(q);
    return r;
}

static int
method_traverse(Method *self, visitproc visit, void *arg)
{
    Py_VISIT(self->fallback);
    Py_VISIT(self->m);
    Py_VISIT(self->raised);
    Py_VISIT(self->cont);
    Py_VISIT(self->dict);
    return 0;
}

static int
method_clear(Method *self)
{
    Py_CLEAR(self->fallback);
    Py_CLEAR(self->m);
    Py_CLEAR(self->raised);
    Py_CLEAR(self->cont);
    Py_CLEAR(self->dict);
    return 0;
}

static void
method_dealloc(Method *self)
{
    PyObject_GC_UnTrack(self);
    if (self->weakrefs != NULL) PyObject_ClearWeakRefs((PyObject *)self);
    method_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef method_methods[] = {
    {"__reduce__", method_reduce, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef method_getset[] = {
    {"__dict__", PyObject_GenericGetDict, PyObject_GenericSetDict, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "tracesock._speedups.Method",
    .tp_basicsize = sizeof(Method),
    .tp_dealloc = (destructor)method_dealloc,
    .tp_vectorcall_offset = offsetof(Method, vectorcall),
    .tp_repr = method_repr,
    .tp_call = PyVectorcall_Call,
    .tp_getattro = PyObject_GenericGetAttr,
    .tp_setattro = PyObject_GenericSetAttr,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL
                | Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = NULL,
    .tp_traverse = (traverseproc)method_traverse,
    .tp_clear = (inquiry)method_clear,
    .tp_methods = method_methods,
    .tp_getset = method_getset,
    .tp_descr_get = method_get,
    .tp_dictoffset = offsetof(Method, dict),
    .tp_weaklistoffset = offsetof(Method, weakrefs),  /* as functions: weakref.ref(socket.socket.recv) */
};

static PyObject *
new_method(int index, PyObject *fallback, PyObject *m, PyObject *raised, PyObject *cont,
           vectorcallfunc vectorcall)
{
    Method *self = PyObject_GC_New(Method, &MethodType);
    if (self == NULL) return NULL;
    self->index = index;
    self->fallback = Py_NewRef(fallback);
    self->m = Py_NewRef(m);
    self->raised = Py_NewRef(raised);
    self->cont = Py_NewRef(cont);
    self->dict = NULL;
    self->weakrefs = NULL;
    self->vectorcall = vectorcall;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* method(index, fallback, m, raised, cont) -> the Method of C path `index`. */
static PyObject *
make_method(PyObject *module, PyObject *args)
{
    int index;
    PyObject *fallback, *m, *raised, *cont;
    if (!PyArg_ParseTuple(args, "iOOOO:method", &index, &fallback, &m, &raised, &cont))
        return NULL;
    if (!configured || index < 0 || index >= M_COUNT) {
        PyErr_SetString(PyExc_ValueError, "method(): not configured, or a bad index");
        return NULL;
    }
    return new_method(index, fallback, m, raised, cont, method_vectorcall);
}

/* Is the probe socket's layout the one SockHead declares?  probe: a socket
 * with family AF_UNIX, type SOCK_STREAM and a timeout of 1.5 s. */
static void check_layout(PyObject *probe) {
    layout_ok = 0;
    if (probe == NULL || probe == Py_None || !PyObject_TypeCheck(probe, sock_type)) return;
    SockHead *h = (SockHead *)probe;
    int family, type;
    if (member_int(family_descr, probe, &family) < 0 || member_int(type_descr, probe, &type) < 0) {
        PyErr_Clear();
        return;
    }
    layout_ok = h->sock_family == family && h->sock_type == type && family == AF_UNIX
        && type == SOCK_STREAM && h->sock_timeout == 1500000000LL;
}

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *bounds_seq;
    PyObject *probe = NULL;
    PyObject *suppress = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOOOOOOlO|OO", &fns[M_RECV], &fns[M_RECV_INTO], &fns[M_SEND],
                          &gettimeout_fn, &family_descr, &type_descr, &context_var,
                          &not_fast, &partial, &on_slow, &bounds_seq, &dontwait, &zero_obj, &probe,
                          &suppress))
        return NULL;
    Py_XSETREF(suppress_key, suppress != NULL && suppress != Py_None ? Py_NewRef(suppress) : NULL);
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
    if (sock_type == NULL) {
        PyObject *t = PyObject_GetAttrString(family_descr, "__objclass__");
        if (t != NULL && PyType_Check(t)) sock_type = (PyTypeObject *)t;  /* kept */
        else Py_XDECREF(t);
        PyErr_Clear();
    }
    check_layout(probe);
    memset(last_slot, 0, sizeof(last_slot));
    configured = 1;
    Py_RETURN_NONE;
}

static PyObject *
set_slow_ns(PyObject *module, PyObject *args)
{
    long long v;
    int in_context = 0;
    if (!PyArg_ParseTuple(args, "L|p:set_slow_ns", &v, &in_context)) return NULL;
    slow_ns = v;
    spans_in_context = in_context;
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

/* Exact time in Python signal handlers.  A handler runs in the main thread
 * whenever the interpreter next checks for signals -- after a syscall the
 * signal interrupted, at the next bytecode -- where its time is mixed into
 * whatever runs around it.  Right after a blocking syscall of the slow path
 * returns (send_counted, poll_wait), the handlers of the signals that arrived
 * meanwhile are run here instead, by the interpreter's own PyErr_CheckSignals
 * (the same handlers, in the same order, raising the same exception, only a
 * few instructions earlier than the interpreter would), and the time that
 * took is added to sigacc[0] (an int64 buffer) before anything else can run.
 * When no signal came, that is one check of a flag between two clock reads
 * (the tens of nanoseconds counted then are the whole error).  Only in the
 * main thread: handlers run nowhere else. */
static unsigned long main_ident = 0;
static long long pending_sig_ns = 0;  /* see handlers_before_continuing */

/* A handler that runs elsewhere during the call -- a signal that arrived
 * while the slow path ran Python code, at the next bytecode -- is timed by a
 * profile function (PyEval_SetProfile, this thread only) that watches for the
 * code objects of the installed Python handlers.  It is switched on only once
 * a handler ran during the call (in a timed check), and only when no profile
 * function is set already (it never replaces the program's); the call's end
 * switches it off (signal_timing_stop).  sig_acc is the running call's sigacc. */
static PyObject *getsignal_fn = NULL, *signal_numbers = NULL;
static PyCodeObject *handler_codes[64];
static int nhandler_codes = 0, hook_on = 0, in_check = 0;
static PyFrameObject *hook_frame = NULL;   /* the outermost handler frame being timed */
static long long hook_start = 0, *hook_acc = NULL;
static PyObject *hook_acc_owner = NULL;  /* keeps hook_acc's buffer alive */
static unsigned long hook_thread = 0;  /* the thread whose profile function it is */

static int
hook(PyObject *obj, PyFrameObject *frame, int what, PyObject *arg)
{
    if (in_check || hook_acc == NULL) return 0;
    if (what == PyTrace_CALL && hook_frame == NULL) {
        PyCodeObject *code = PyFrame_GetCode(frame);
        for (int i = 0; i < nhandler_codes; i++) {
            if (handler_codes[i] == code) {
                hook_frame = frame;
                hook_start = now_ns();
                break;
            }
        }
        Py_DECREF(code);
    } else if (what == PyTrace_RETURN && frame == hook_frame) {
        hook_acc[0] += now_ns() - hook_start;
        hook_frame = NULL;
    }
    return 0;
}

/* The code objects of the Python handlers installed now (functions and bound
 * methods; others -- default_int_handler, a partial, a callable object -- are
 * timed only where the timed checks run them); 0 when there are none. */
static int collect_handler_codes(void) {
    nhandler_codes = 0;
    if (getsignal_fn == NULL || signal_numbers == NULL) return 0;
    Py_ssize_t n = PyList_GET_SIZE(signal_numbers);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = PyObject_CallOneArg(getsignal_fn, PyList_GET_ITEM(signal_numbers, i));
        if (h == NULL) {
            PyErr_Clear();
            return 0;
        }
        if (!PyCallable_Check(h)) {  /* SIG_DFL, SIG_IGN, None */
            Py_DECREF(h);
            continue;
        }
        PyObject *fn = PyMethod_Check(h) ? PyMethod_GET_FUNCTION(h) : h;
        PyObject *code = PyFunction_Check(fn) ? PyFunction_GET_CODE(fn) : NULL;
        Py_DECREF(h);  /* the handler stays referenced by the signal module */
        if (code != NULL && nhandler_codes < 64) handler_codes[nhandler_codes++] = (PyCodeObject *)code;
    }
    return nhandler_codes > 0;
}

static void hook_start_for(Py_buffer *sigacc) {
    if (hook_on || getsignal_fn == NULL) return;
    PyObject *current = PySys_GetObject("getprofile");  /* borrowed; a function */
    PyObject *prof = current ? PyObject_CallNoArgs(current) : NULL;
    if (prof == NULL) {
        PyErr_Clear();
        return;
    }
    int free_ = (prof == Py_None);
    Py_DECREF(prof);
    if (!free_ || !collect_handler_codes()) return;
    hook_acc_owner = Py_XNewRef(sigacc->obj);
    if (hook_acc_owner == NULL) return;
    hook_acc = (long long *)sigacc->buf;
    hook_frame = NULL;
    PyEval_SetProfile(hook, NULL);
    hook_on = 1;
    hook_thread = PyThread_get_thread_ident();
}

static PyObject *
signal_timing_stop(PyObject *self, PyObject *noargs)
{
    if (main_ident != 0 && PyThread_get_thread_ident() == main_ident) pending_sig_ns = 0;
    if (hook_on && PyThread_get_thread_ident() == hook_thread) {
        if (hook_frame != NULL && hook_acc != NULL)  /* a handler raising out of the call */
            hook_acc[0] += now_ns() - hook_start;
        /* Ours is still the profile function unless the program (a handler) set one
         * since: sys.getprofile() is None for ours (no object); never clear theirs. */
        PyObject *current = PySys_GetObject("getprofile");
        PyObject *prof = current ? PyObject_CallNoArgs(current) : NULL;
        if (prof == Py_None) PyEval_SetProfile(NULL, NULL);
        Py_XDECREF(prof);
        PyErr_Clear();
        hook_on = 0;
        hook_frame = NULL;
        hook_acc = NULL;
        Py_CLEAR(hook_acc_owner);
    }
    Py_RETURN_NONE;
}

static PyObject *
signal_timing_setup(PyObject *self, PyObject *args)
{
    PyObject *fn, *nums;
    if (!PyArg_ParseTuple(args, "OO!:signal_timing_setup", &fn, &PyList_Type, &nums))
        return NULL;
    Py_XSETREF(getsignal_fn, Py_NewRef(fn));
    Py_XSETREF(signal_numbers, Py_NewRef(nums));
    Py_RETURN_NONE;
}

/* PyErr_CheckSignals between two clock reads, *ns the time it took; the
 * handler hook does not count what runs in it (in_check). */
static int timed_check(long long *ns) {
    in_check = 1;
    long long t0 = now_ns();
    int r = PyErr_CheckSignals();
    *ns = now_ns() - t0;
    in_check = 0;
    return r;
}

static int timed_signals(Py_buffer *sigacc) {
    if (sigacc == NULL || sigacc->buf == NULL) return PyErr_CheckSignals();
    if (main_ident != 0 && PyThread_get_thread_ident() != main_ident) return 0;
    long long d;
    int r = timed_check(&d);
    ((long long *)sigacc->buf)[0] += d;
    if (d >= 1000 && r == 0) hook_start_for(sigacc);  /* a handler ran: time the others too */
    return r;
}

/* A partial send of the C path continues in Python (method_continue): the
 * handlers of the signals that came during that first syscall -- a long one:
 * a non-blocking send can copy for milliseconds while a reader drains -- are
 * run and timed here, just before the continuation's first bytecode would
 * run them, untimed.  Their time waits in pending_sig_ns for the
 * continuation's sigacc (run_signals adds it when it makes one);
 * signal_timing_stop drops what no continuation took. */
static int handlers_before_continuing(void) {
    if (main_ident == 0 || PyThread_get_thread_ident() != main_ident) return 0;
    return timed_check(&pending_sig_ns);
}

static int sigacc_ok(Py_buffer *b);

/* run_signals(sigacc): the handlers due now, timed into sigacc (see above),
 * after the time of those run before the continuation (pending_sig_ns). */
static PyObject *
run_signals(PyObject *self, PyObject *arg)
{
    Py_buffer sigacc;
    if (PyObject_GetBuffer(arg, &sigacc, PyBUF_WRITABLE) < 0) return NULL;
    if (!sigacc_ok(&sigacc)) {
        PyBuffer_Release(&sigacc);
        return NULL;
    }
    if (sigacc.buf != NULL && pending_sig_ns && main_ident != 0 && PyThread_get_thread_ident() == main_ident) {
        ((long long *)sigacc.buf)[0] += pending_sig_ns;
        if (pending_sig_ns >= 1000) hook_start_for(&sigacc);  /* one ran: time the others too */
        pending_sig_ns = 0;
    }
    int r = timed_signals(&sigacc);
    PyBuffer_Release(&sigacc);
    if (r < 0) return NULL;
    Py_RETURN_NONE;
}

static int sigacc_ok(Py_buffer *b) {
    if (b->buf != NULL && b->len < (Py_ssize_t)sizeof(long long)) {
        PyErr_SetString(PyExc_ValueError, "sigacc must hold an int64");
        return 0;
    }
    return 1;
}

/* send_counted(fd, buffer, flags, acc[, sigacc]): one *blocking* send(2) of
 * buffer, the GIL released, its outcome written into acc -- a writable buffer
 * of 5 int64: [0] += bytes sent, [1] start ns, [2] end ns, [3] result (-1 on
 * error), [4] errno -- before any Python code runs again.  A Python signal
 * handler may raise as soon as this returns (the interpreter runs it right
 * after the call); what reached the kernel is in acc all the same.  With
 * sigacc, the handlers due run here, timed (see timed_signals), and their
 * exception is raised from here.  Returns the result as an int; never raises
 * for the syscall (the caller reads errno). */
static PyObject *
send_counted(PyObject *self, PyObject *args)
{
    int fd, flags;
    Py_buffer data, accbuf, sigacc = {0};
    if (!PyArg_ParseTuple(args, "iy*iw*|w*:send_counted", &fd, &data, &flags, &accbuf, &sigacc))
        return NULL;
    if (accbuf.len < (Py_ssize_t)(5 * sizeof(long long)) || !sigacc_ok(&sigacc)) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&accbuf);
        if (sigacc.buf != NULL) PyBuffer_Release(&sigacc);
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "acc must hold 5 int64");
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
    int raised = 0;
    if (sigacc.buf != NULL) {
        raised = timed_signals(&sigacc) < 0;
        PyBuffer_Release(&sigacc);
    }
    if (raised) return NULL;
    return PyLong_FromSsize_t(n);
}

#include <poll.h>

/* poll_wait(fd, events, timeout_ms, sigacc) -> (result, errno, start_ns,
 * end_ns): one poll(2) of fd, the GIL released, then the signal handlers due,
 * timed into sigacc (see timed_signals); their exception is raised from here. */
static PyObject *
poll_wait(PyObject *self, PyObject *args)
{
    int fd, events, ms;
    Py_buffer sigacc = {0};
    if (!PyArg_ParseTuple(args, "iiiw*:poll_wait", &fd, &events, &ms, &sigacc))
        return NULL;
    if (!sigacc_ok(&sigacc)) {
        PyBuffer_Release(&sigacc);
        return NULL;
    }
    struct pollfd pfd = {fd, (short)events, 0};
    long long start, end;
    int n, err = 0;
    Py_BEGIN_ALLOW_THREADS
    start = now_ns();
    n = poll(&pfd, 1, ms);
    if (n < 0)
        err = errno;
    end = now_ns();
    Py_END_ALLOW_THREADS
    int raised = timed_signals(&sigacc) < 0;
    PyBuffer_Release(&sigacc);
    if (raised) return NULL;
    return Py_BuildValue("iiLL", n, err, start, end);
}

/* hold_signals() / release_signals(): span making in the main thread runs
 * with the asynchronous signals blocked (see _syscall.signal_mask for why).
 * The saved mask lives here, not in a Python variable, so a signal handler
 * raising between any two bytecodes can never leave the signals blocked:
 * release_signals() in a finally block always finds it.  Each takes one
 * argument and ignores it: core.signals' mask token, so that they can stand
 * for its block_signals(mask)/restore_signals(mask).  hold_signals() runs
 * the handlers that were already due once the block is set (their exception
 * is raised from it).  Nested holds are counted. */
static sigset_t blockable, saved_mask;
static int blockable_ready = 0, hold_depth = 0;

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
hold_signals(PyObject *self, PyObject *token)
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
release_signals(PyObject *self, PyObject *token)
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
static PyTypeObject *sslsocket_type = NULL;  /* _ssl._SSLSocket, once seen */

static int watch(PyObject *sslobj) {
    if (!tls_ready)
        return 0;
    if (Py_TYPE(sslobj) != sslsocket_type) {
        if (sslsocket_type != NULL || strcmp(Py_TYPE(sslobj)->tp_name, "_ssl._SSLSocket") != 0)
            return 0;
        sslsocket_type = (PyTypeObject *)Py_NewRef(Py_TYPE(sslobj));  /* kept: a static or heap type of _ssl */
    }
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

/* The call of tls_fast and of a TLS Method: sock's args (n of them, at most
 * 7) and kwargs (NULL or a dict). */
static PyObject *
tls_fast_call(PyObject *original, PyObject *sock, PyObject *const *args, Py_ssize_t n,
              PyObject *kwargs, long kind)
{
    if (!configured || unusual == NULL || n > 7 || context_busy())
        return Py_NewRef(not_fast);
    int has_kwargs = kwargs != NULL && PyDict_GET_SIZE(kwargs) > 0;
    if (kind == 1) {
        if (has_kwargs || n < 1)
            return Py_NewRef(not_fast);
        Py_buffer view;
        if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) {
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
    static PyObject *sslobj_name = NULL;  /* interned once: no new string per call */
    if (sslobj_name == NULL && (sslobj_name = PyUnicode_InternFromString("_sslobj")) == NULL) {
        PyErr_Clear();
        return Py_NewRef(not_fast);
    }
    PyObject *sslobj = PyObject_GetAttr(sock, sslobj_name);
    if (sslobj == NULL) {
        PyErr_Clear();
        return Py_NewRef(not_fast);
    }
    int ok = watch(sslobj);
    Py_DECREF(sslobj);
    if (!ok)
        return Py_NewRef(not_fast);

    PyObject *stack[8];
    stack[0] = sock;
    for (Py_ssize_t i = 0; i < n; i++)
        stack[i + 1] = args[i];
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
    /* profiling: the Python side adds every TLS call to the profile */
    int usual = prof_local == NULL && end - start < slow_ns
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
        Slot *s = slot_of(e->write ? M_WIRE_WRITE : M_WIRE_READ, sock);
        if (s != NULL)
            record(s, e->end - e->start, e->result, 0);
    }
    if (r->over_used) {
        for (int w = 0; w < 2; w++) {
            Slot *s = slot_of(w ? M_WIRE_WRITE : M_WIRE_READ, sock);
            if (s != NULL)
                slot_merge(s, &r->over[w]);
        }
    }
    r->n = 0;  /* taken */
    r->over_used = 0;
    return result;
}

static PyObject *
tls_fast(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    if (argc != 5 || !PyTuple_Check(argv[2])) {
        PyErr_SetString(PyExc_TypeError, "tls_fast(original, sock, args, kwargs, kind)");
        return NULL;
    }
    long kind = PyLong_AsLong(argv[4]);
    if (kind == -1 && PyErr_Occurred())
        return NULL;
    PyObject *kwargs = argv[3];
    if (kwargs != Py_None && !PyDict_Check(kwargs))
        return Py_NewRef(not_fast);
    return tls_fast_call(argv[0], argv[1], ((PyTupleObject *)argv[2])->ob_item, PyTuple_GET_SIZE(argv[2]),
                         kwargs == Py_None ? NULL : kwargs, kind);
}

/* A TLS data method as a Method (the same type, its own vectorcall):
 * sock.recv(n), sock.sendall(data) & co. with positional arguments go to
 * tls_fast_call() with no Python frame and no argument packing; what it
 * declines, and every other form, is the fallback's (the Python recording
 * method, without a second fast attempt).  Fields: index the kind (0 recv,
 * 1 send), m the original method, raised after(sock, args, result, exc),
 * which records a call the C path made but Python must look at (it raised,
 * or came back UNUSUAL), as the Python wrapper did. */
static PyObject *
tls_after(Method *self, PyObject *const *args, Py_ssize_t nargs, PyObject *result)
{
    /* result NULL: the call raised (the exception is set).  Returns result,
     * or NULL with the call's exception -- or with one after() raised
     * (KeyboardInterrupt from a handler), the call's as its context. */
    PyObject *exc_type = NULL, *exc = NULL, *exc_tb = NULL;
    if (result == NULL) {
        PyErr_Fetch(&exc_type, &exc, &exc_tb);
        PyErr_NormalizeException(&exc_type, &exc, &exc_tb);
        if (exc_tb != NULL) PyException_SetTraceback(exc, exc_tb);
    }
    PyObject *rest = PyTuple_New(nargs - 1);
    PyObject *r = NULL;
    if (rest != NULL) {
        for (Py_ssize_t i = 1; i < nargs; i++)
            PyTuple_SET_ITEM(rest, i - 1, Py_NewRef(args[i]));
        PyObject *stack[] = {args[0], rest, result ? result : Py_None, exc ? exc : Py_None};
        r = PyObject_Vectorcall(self->raised, stack, 4, NULL);
        Py_DECREF(rest);
    }
    if (r == NULL) {  /* after() raised: that propagates, as from the Python wrapper */
        if (exc != NULL) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (tb != NULL) PyException_SetTraceback(value, tb);
            PyException_SetContext(value, exc);  /* steals exc */
            PyErr_Restore(type, value, tb);
            Py_XDECREF(exc_type);
            Py_XDECREF(exc_tb);
        }
        Py_XDECREF(result);
        return NULL;
    }
    Py_DECREF(r);
    if (exc != NULL) {  /* re-raised as it was, as a bare raise does */
        PyErr_Restore(exc_type, exc, exc_tb);
        return NULL;
    }
    return result;
}

static PyObject *
tls_method_vectorcall(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Method *self = (Method *)op;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) || sock_type == NULL
            || !PyObject_TypeCheck(args[0], sock_type))
        return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    PyObject *r = tls_fast_call(self->m, args[0], args + 1, nargs - 1, NULL, self->index);
    if (r == not_fast) {
        Py_DECREF(r);
        return PyObject_Vectorcall(self->fallback, args, nargsf, kwnames);
    }
    if (r == nested) {  /* part of the call being recorded (sendall -> send) */
        Py_DECREF(r);
        return PyObject_Vectorcall(self->m, args, nargsf, kwnames);
    }
    if (r == NULL)
        return tls_after(self, args, nargs, NULL);
    if (PyTuple_CheckExact(r) && PyTuple_GET_SIZE(r) == 2 && PyTuple_GET_ITEM(r, 0) == unusual) {
        PyObject *result = Py_NewRef(PyTuple_GET_ITEM(r, 1));
        Py_DECREF(r);
        return tls_after(self, args, nargs, result);
    }
    return r;
}

/* tls_method(kind, fallback, original, after) -> the Method of a TLS data call. */
static PyObject *
make_tls_method(PyObject *module, PyObject *args)
{
    int kind;
    PyObject *fallback, *original, *after;
    if (!PyArg_ParseTuple(args, "iOOO:tls_method", &kind, &fallback, &original, &after))
        return NULL;
    return new_method(kind, fallback, original, after, Py_None, tls_method_vectorcall);
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

/* --- finished spans inside a trace ------------------------------------------
 *
 * direct_span(maker, name, parent, attributes, start, end, status) -> the new
 * SpanContext: what telemetry.recorder's _DirectSpans.span does in Python,
 * for the spans of every call and syscall inside a sampled trace.  maker is
 * (ReadableSpan, fields, SpanContext, new_span_id, on_end): a SpanContext
 * tuple (parent's trace id, a new span id, not remote, parent's flags and
 * state, valid) and a ReadableSpan made as object.__new__ + its __dict__
 * filled from fields and the span's own values, handed to on_end.  Used only
 * after recorder.py's probe shows that it makes exactly what the SDK's
 * constructors make. */
static PyObject *max_trace_id = NULL, *max_span_id = NULL, *zero = NULL;
static PyObject *k_name, *k_context, *k_parent, *k_attributes, *k_start, *k_end, *k_status;

static int direct_ready(void) {
    if (k_status != NULL) return 0;
    max_trace_id = PyLong_FromString("ffffffffffffffffffffffffffffffff", NULL, 16);
    max_span_id = PyLong_FromUnsignedLongLong(0xffffffffffffffffULL);
    zero = PyLong_FromLong(0);
    k_name = PyUnicode_InternFromString("_name");
    k_context = PyUnicode_InternFromString("_context");
    k_parent = PyUnicode_InternFromString("_parent");
    k_attributes = PyUnicode_InternFromString("_attributes");
    k_start = PyUnicode_InternFromString("_start_time");
    k_end = PyUnicode_InternFromString("_end_time");
    PyObject *status = PyUnicode_InternFromString("_status");
    if (!max_trace_id || !max_span_id || !zero || !k_name || !k_context || !k_parent || !k_attributes
            || !k_start || !k_end || !status) {
        Py_XDECREF(status);
        return -1;
    }
    k_status = status;
    return 0;
}

/* 0 < id <= max, or -1 with an exception */
static int id_valid(PyObject *id, PyObject *max) {
    int pos = PyObject_RichCompareBool(id, zero, Py_GT);
    if (pos <= 0) return pos;
    return PyObject_RichCompareBool(id, max, Py_LE);
}

static PyObject *
direct_span(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7 || !PyTuple_CheckExact(args[0]) || PyTuple_GET_SIZE(args[0]) != 5
            || !PyTuple_Check(args[2]) || PyTuple_GET_SIZE(args[2]) != 6) {
        PyErr_SetString(PyExc_TypeError, "direct_span(maker, name, parent, attributes, start, end, status)");
        return NULL;
    }
    if (direct_ready() < 0) return NULL;
    PyObject *maker = args[0], *parent = args[2];
    PyObject *span_cls = PyTuple_GET_ITEM(maker, 0), *fields = PyTuple_GET_ITEM(maker, 1);
    PyObject *sc_cls = PyTuple_GET_ITEM(maker, 2), *new_id = PyTuple_GET_ITEM(maker, 3);
    PyObject *on_end = PyTuple_GET_ITEM(maker, 4);
    if (!PyType_Check(span_cls) || !PyType_Check(sc_cls) || !PyDict_Check(fields)) {
        PyErr_SetString(PyExc_TypeError, "direct_span: a bad maker");
        return NULL;
    }
    PyObject *trace_id = PyTuple_GET_ITEM(parent, 0);
    PyObject *span_id = PyObject_CallNoArgs(new_id);
    if (span_id == NULL) return NULL;
    int valid = id_valid(trace_id, max_trace_id);
    if (valid > 0) valid = id_valid(span_id, max_span_id);
    if (valid < 0) {
        Py_DECREF(span_id);
        return NULL;
    }
    PyObject *items = PyTuple_Pack(6, trace_id, span_id, Py_False, PyTuple_GET_ITEM(parent, 3),
                                   PyTuple_GET_ITEM(parent, 4), valid ? Py_True : Py_False);
    Py_DECREF(span_id);
    if (items == NULL) return NULL;
    PyObject *targs = PyTuple_Pack(1, items);
    Py_DECREF(items);
    if (targs == NULL) return NULL;
    PyObject *sc = PyTuple_Type.tp_new((PyTypeObject *)sc_cls, targs, NULL);  /* tuple.__new__(SpanContext, items) */
    Py_DECREF(targs);
    if (sc == NULL) return NULL;
    PyObject *empty = PyTuple_New(0);
    PyObject *span = empty ? PyBaseObject_Type.tp_new((PyTypeObject *)span_cls, empty, NULL) : NULL;
    Py_XDECREF(empty);
    if (span == NULL) {
        Py_DECREF(sc);
        return NULL;
    }
    PyObject *d = PyObject_GenericGetDict(span, NULL);
    int bad = d == NULL || PyDict_Update(d, fields) < 0
        || PyDict_SetItem(d, k_name, args[1]) < 0 || PyDict_SetItem(d, k_context, sc) < 0
        || PyDict_SetItem(d, k_parent, parent) < 0 || PyDict_SetItem(d, k_attributes, args[3]) < 0
        || PyDict_SetItem(d, k_start, args[4]) < 0 || PyDict_SetItem(d, k_end, args[5]) < 0
        || PyDict_SetItem(d, k_status, args[6]) < 0;
    Py_XDECREF(d);
    PyObject *r = bad ? NULL : PyObject_CallOneArg(on_end, span);
    Py_DECREF(span);
    if (r == NULL) {
        Py_DECREF(sc);
        return NULL;
    }
    Py_DECREF(r);
    return sc;
}

static PyObject *
layout_ok_fn(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(layout_ok);
}

static PyMethodDef methods[] = {
    {"direct_span", (PyCFunction)(void (*)(void))direct_span, METH_FASTCALL,
     "direct_span(maker, name, parent, attributes, start, end, status) -> the new span's SpanContext"},
    {"signals_setup", signals_setup, METH_VARARGS,
     "signals_setup(signals, main_thread_ident): what hold_signals blocks, and where"},
    {"hold_signals", hold_signals, METH_O, "hold_signals(token): block the asynchronous signals (main thread)"},
    {"release_signals", release_signals, METH_O, "release_signals(token): undo hold_signals"},
    {"send_counted", send_counted, METH_VARARGS,
     "send_counted(fd, buffer, flags, acc[, sigacc]) -> result; acc: [bytes total, start, end, result, errno]"},
    {"signal_timing_setup", signal_timing_setup, METH_VARARGS,
     "signal_timing_setup(signal.getsignal, [signal numbers]): what the handler hook looks at"},
    {"run_signals", run_signals, METH_O, "run_signals(sigacc): the handlers due now, timed into sigacc"},
    {"signal_timing_stop", signal_timing_stop, METH_NOARGS, "the call is over: stop timing handlers"},
    {"poll_wait", poll_wait, METH_VARARGS,
     "poll_wait(fd, events, timeout_ms, sigacc) -> (result, errno, start_ns, end_ns)"},
    {"tls_setup", tls_setup, METH_O, "tls_setup(path of _ssl) -> True when OpenSSL's BIO callbacks are usable"},
    {"tls_begin", tls_begin, METH_O, "tls_begin(sslobj) -> True: this thread records the wire level of sslobj"},
    {"tls_end", tls_end, METH_NOARGS,
     "tls_end() -> (events, dropped, wire rx, wire tx, start_ns, end_ns, overflow)"},
    {"tls_fast", (PyCFunction)(void (*)(void))tls_fast, METH_FASTCALL,
     "tls_fast(original, sock, args, kwargs, kind) -> result, NOT_FAST or (UNUSUAL, result)"},
    {"tls_method", make_tls_method, METH_VARARGS,
     "tls_method(kind, fallback, original, after) -> the patched TLS data method"},
    {"tls_fast_setup", tls_fast_setup, METH_VARARGS, "tls_fast_setup(UNUSUAL, NESTED): tls_fast's marks"},
    {"fast", (PyCFunction)(void (*)(void))fast, METH_FASTCALL,
     "fast(method, sock, args, kwargs) -> result, NOT_FAST or PARTIAL"},
    {"method", make_method, METH_VARARGS,
     "method(index, fallback, m, raised, cont) -> the patched method of C path index"},
    {"layout_ok", (PyCFunction)(void (*)(void))layout_ok_fn, METH_NOARGS,
     "layout_ok() -> True when socket fields are read directly"},
    {"configure", configure, METH_VARARGS, "configure(...): set the objects the fast path uses"},
    {"set_profile", set_profile, METH_VARARGS,
     "set_profile(Profile._local or None, method names, max_depth, asyncio callback code or None)"},
    {"set_slow_ns", set_slow_ns, METH_VARARGS,
     "set_slow_ns(ns[, in_context]): calls at least this long call on_slow, and with in_context "
     "every call made in a non-empty OpenTelemetry context"},
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
    if (PyType_Ready(&MethodType) < 0) return NULL;
    return PyModule_Create(&module_def);
}
