/*
 * speedups.c -- the hot path of fastmux's epoll backend, in C.
 *
 * cffi cannot create Python objects from C, so without this module a batch
 * crosses into Python as integers that Python decodes, slices and
 * dispatches one by one, and every write is a Python frame, a list append
 * and, per connection and iteration, a join and a cffi call.  This module
 * (limited API, so the abi3 wheel keeps working) holds the two objects that
 * sit on the C core directly:
 *
 *   Core    one per epoll loop.  iterate() sends what was queued, polls with
 *           the GIL released and delivers the batch's messages; finish()
 *           sends what the iteration wrote.  It calls the core through the
 *           function table of fm_api_table() (fastmux.h), not through cffi.
 *   Stream  the base type of fastmux.Connection.  Its fields are the ones
 *           the hot path reads (_deliver, _on_message, _cid, ...), as
 *           C members that Python code reads and sets like slots; write()
 *           and writelines() put bytes straight into the core's output
 *           queue (fm_queue) -- no Python frame, no per-message list.
 *
 * It is an accelerator, not a second implementation of the rules: dispatch
 * handles only FM_EV_MSG events and does exactly what Loop._dispatch does
 * for them (deliver if conn._deliver, else conn._defer(data) unless the
 * connection is closed); at the first other event it returns and Python
 * handles that event with the one shared implementation.  A Stream not
 * bound to a Core (the select backend) writes the Python way: the bytes go
 * to its _wbuf and the loop's _flush sends them.  FASTMUX_NO_SPEEDUPS=1 runs
 * the pure-Python equivalents, and the test suite runs against all of them.
 *
 * Only fastmux/_epoll.py and fastmux/_loop.py import this module.
 */
#define PY_SSIZE_T_CLEAN
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000 /* CPython 3.10: the abi3 floor */
#endif
#include <Python.h>
#include <structmember.h>
#include <dlfcn.h>
#include <stdint.h>

#include "fastmux.h" /* FM_EV_MSG, fm_api: one source for the ABI */

/* ---- calling Python ------------------------------------------------------
 * PyObject_Vectorcall entered the limited API in 3.12, but CPython exports
 * it from 3.11 on; where it is found it saves the argument tuple (and the
 * bound method's re-packing) on every handler call. */
#ifndef PY_VECTORCALL_ARGUMENTS_OFFSET
#define PY_VECTORCALL_ARGUMENTS_OFFSET ((size_t)1 << (8 * sizeof(size_t) - 1))
#endif
typedef PyObject *(*vectorcall_fn)(PyObject *, PyObject *const *, size_t, PyObject *);
static vectorcall_fn s_vectorcall;

static PyObject *call2(PyObject *f, PyObject *a, PyObject *b)
{
    if (s_vectorcall != NULL) {
        PyObject *args[3] = {NULL, a, b};
        return s_vectorcall(f, args + 1, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    }
    return PyObject_CallFunctionObjArgs(f, a, b, NULL);
}

static PyObject *s_deliver, *s_closed, *s_on_message, *s_defer, *s_mark_dirty, *s_data;
static PyObject *s_closed_error;  /* fastmux.ConnectionClosed (setup()) */
static PyObject *s_check_bytes;   /* fastmux._checks.check_bytes (setup()) */
static PyTypeObject *s_core_type, *s_stream_type;

/* ---- Core ---------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    const fm_api *api;
    fm_loop *loop;   /* NULL once detached: the loop is closed */
    PyObject *conns; /* Loop._conns: connection objects by id */
    int n;           /* events in the batch of the last poll */
} CoreObject;

typedef struct {
    PyObject_HEAD
    PyObject *loop;       /* _loop */
    PyObject *on_message; /* _on_message */
    PyObject *wbuf;       /* _wbuf: the unbound (Python) write path */
    /* _msg_call, _msg_fn, _msg_err: if _msg_call is set, a message goes to
     * _msg_call(_msg_fn, data) instead of _on_message(conn, data), and an
     * exception from it (but SystemExit and KeyboardInterrupt) to
     * _msg_err(exc).  The asyncio transport sets them to
     * (context.run, protocol.data_received, its fatal-error path): no Python
     * frame of its own per read. */
    PyObject *msg_call, *msg_fn, *msg_err;
    /* The asyncio transport's write (_twrite): while _tw_ok (the transport
     * is open, not paused, not at EOF, not in sendfile), bytes go to the
     * core's queue here; past _tw_high it sends now and calls _tw_pause()
     * if the kernel left more than _tw_high.  Anything else goes to
     * _tw_slow(data), the transport's Python write. */
    PyObject *tw_slow, *tw_pause;
    long long tw_high;
    char tw_ok;
    CoreObject *core;     /* _core: NULL on the Python path */
    int cid;              /* _cid */
    long long queued;     /* _queued */
    char closed, wclosed, deliver; /* _closed, _wclosed, _deliver */
} StreamObject;

static int core_live(CoreObject *self)
{
    if (self->loop != NULL && self->conns != NULL)
        return 1;
    PyErr_SetString(PyExc_RuntimeError, "fastmux: the loop is closed");
    return 0;
}

static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    unsigned long long api_addr, loop_addr;
    PyObject *conns;
    CoreObject *self;
    const fm_api *api;

    if (!PyArg_ParseTuple(args, "KKO!:Core", &api_addr, &loop_addr, &PyList_Type, &conns))
        return NULL;
    api = (const fm_api *)(uintptr_t)api_addr;
    if (api == NULL || api->abi != FM_API_ABI || loop_addr == 0) {
        PyErr_SetString(PyExc_ValueError, "fastmux: core and accelerator do not match");
        return NULL;
    }
    self = (CoreObject *)PyType_GenericNew(type, NULL, NULL);
    if (self == NULL)
        return NULL;
    self->api = api;
    self->loop = (fm_loop *)(uintptr_t)loop_addr;
    Py_INCREF(conns);
    self->conns = conns;
    return (PyObject *)self;
}

static int core_traverse(PyObject *op, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(((CoreObject *)op)->conns);
    return 0;
}

static int core_clear(PyObject *op)
{
    Py_CLEAR(((CoreObject *)op)->conns);
    return 0;
}

/* tp_dealloc of both heap types: untrack, clear, free, release the type. */
static void gc_dealloc(PyObject *op, inquiry clear)
{
    PyTypeObject *tp = Py_TYPE(op);
    freefunc tp_free = (freefunc)PyType_GetSlot(tp, Py_tp_free);
    PyObject_GC_UnTrack(op);
    clear(op);
    tp_free(op);
    Py_DECREF(tp);
}

static void core_dealloc(PyObject *op)
{
    gc_dealloc(op, core_clear);
}

/* A handler raised an Exception: fetch it (as a new reference) so that
 * the caller can hand it back.  KeyboardInterrupt and friends propagate:
 * returns -1 for those. */
static int handler_failed(PyObject **exc)
{
    PyObject *type, *value, *tb;
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (value == NULL) {
        Py_INCREF(Py_None);
        value = Py_None;
    }
    *exc = value;
    return 0;
}

/* One MSG event: deliver, defer, or drop (closed).  Returns a new reference
 * to the handler's result, or NULL with an exception set. */
static PyObject *deliver_one(PyObject *conn, const char *p, Py_ssize_t len)
{
    PyObject *data, *r;
    int deliver, closed;

    if (PyObject_TypeCheck(conn, s_stream_type)) {
        StreamObject *s = (StreamObject *)conn;
        if (s->deliver && s->msg_call != NULL && s->msg_call != Py_None &&
            s->msg_fn != NULL && s->msg_err != NULL) {
            PyObject *call = s->msg_call, *fn = s->msg_fn, *err = s->msg_err;
            data = PyBytes_FromStringAndSize(p, len);
            if (data == NULL)
                return NULL;
            Py_INCREF(call); /* set_protocol may replace them meanwhile */
            Py_INCREF(fn);
            Py_INCREF(err);
            r = call2(call, fn, data);
            Py_DECREF(data);
            if (r == NULL && !PyErr_ExceptionMatches(PyExc_SystemExit) &&
                !PyErr_ExceptionMatches(PyExc_KeyboardInterrupt)) {
                PyObject *type, *value, *tb;
                PyErr_Fetch(&type, &value, &tb);
                PyErr_NormalizeException(&type, &value, &tb);
                if (tb != NULL && value != NULL)
                    PyException_SetTraceback(value, tb);
                Py_XDECREF(type);
                Py_XDECREF(tb);
                r = PyObject_CallFunctionObjArgs(err, value ? value : Py_None, NULL);
                Py_XDECREF(value);
            }
            Py_DECREF(call);
            Py_DECREF(fn);
            Py_DECREF(err);
            return r;
        }
        if (s->deliver && s->on_message != NULL) {
            PyObject *om = s->on_message;
            data = PyBytes_FromStringAndSize(p, len);
            if (data == NULL)
                return NULL;
            Py_INCREF(om); /* the handler may replace itself */
            r = call2(om, conn, data);
            Py_DECREF(om);
            Py_DECREF(data);
            return r;
        }
        deliver = s->deliver;
        closed = s->closed;
        if (!deliver && closed)
            Py_RETURN_NONE;
        data = PyBytes_FromStringAndSize(p, len);
        if (data == NULL)
            return NULL;
    } else {
        /* The getattrs below can run Python code, which may poll the loop
         * and so move or overwrite the arena `p` points into: copy first. */
        PyObject *flag;
        data = PyBytes_FromStringAndSize(p, len);
        if (data == NULL)
            return NULL;
        flag = PyObject_GetAttr(conn, s_deliver);
        deliver = flag == NULL ? -1 : PyObject_IsTrue(flag);
        Py_XDECREF(flag);
        closed = 0;
        if (deliver == 0) {
            flag = PyObject_GetAttr(conn, s_closed);
            closed = flag == NULL ? -1 : PyObject_IsTrue(flag);
            Py_XDECREF(flag);
        }
        if (deliver < 0 || closed < 0) {
            Py_DECREF(data);
            return NULL;
        }
        if (!deliver && closed) {
            Py_DECREF(data);
            Py_RETURN_NONE;
        }
    }
    if (deliver) {
        PyObject *om = PyObject_GetAttr(conn, s_on_message);
        r = om == NULL ? NULL : call2(om, conn, data);
        Py_XDECREF(om);
    } else {
        r = PyObject_CallMethodObjArgs(conn, s_defer, data, NULL);
    }
    Py_DECREF(data);
    return r;
}

/* Deliver the MSG events of the batch from index i while they last.
 * Returns j, the first event not handled (n when done), or -1 with an
 * exception set.  If a handler raised an Exception, it stops after that
 * event (j - 1) and stores the exception in *exc (else *exc is NULL). */
static Py_ssize_t core_run(CoreObject *self, Py_ssize_t i, PyObject **exc)
{
    fm_batch *b;
    Py_ssize_t n = self->n;

    *exc = NULL;
    if (!core_live(self))
        return -1;
    b = self->api->batch(self->loop);
    for (; i < n; i++) {
        const uint32_t *e = b->ev + 4 * i;
        PyObject *conn, *r;

        if (e[0] != FM_EV_MSG)
            break;
        conn = PyList_GetItem(self->conns, (Py_ssize_t)e[1]); /* borrowed */
        if (conn == NULL)
            return -1;
        Py_INCREF(conn);
        r = deliver_one(conn, b->arena + e[2], (Py_ssize_t)(e[3] - e[2]));
        Py_DECREF(conn);
        if (r == NULL)
            return handler_failed(exc) < 0 ? -1 : i + 1;
        Py_DECREF(r);
        /* The handler ran Python code: if that closed the loop, b points
         * into freed memory -- stop. */
        if (!core_live(self))
            return -1;
    }
    return i;
}

static PyObject *run_result(Py_ssize_t j, PyObject *exc)
{
    if (j < 0)
        return NULL;
    if (exc == NULL)
        return Py_BuildValue("(nO)", j, Py_None);
    return Py_BuildValue("(nN)", j, exc);
}

static int timeout_ms(PyObject *timeout, int *ms)
{
    double t;
    if (timeout == Py_None) {
        *ms = -1;
        return 0;
    }
    t = PyFloat_AsDouble(timeout);
    if (t == -1.0 && PyErr_Occurred())
        return -1;
    if (!(t > 0))
        *ms = 0;
    else if (t >= 2147483.0)
        *ms = 0x7fffffff;
    else
        *ms = (int)(t * 1000.0) + 1; /* never wake before a timer is due */
    return 0;
}

/* iterate(timeout) -> (n, j, exc): send what was queued, poll (timeout in
 * seconds, None: until something happens) with the GIL released, and
 * deliver messages as run(0) does. */
static PyObject *core_iterate(PyObject *op, PyObject *timeout)
{
    CoreObject *self = (CoreObject *)op;
    PyObject *exc;
    Py_ssize_t j;
    int ms, n;

    if (timeout_ms(timeout, &ms) < 0 || !core_live(self))
        return NULL;
    self->api->flush(self->loop, 0);
    if (ms == 0) {
        n = self->api->poll(self->loop, 0); /* no wait: keep the GIL */
    } else {
        Py_BEGIN_ALLOW_THREADS
        n = self->api->poll(self->loop, ms);
        Py_END_ALLOW_THREADS
    }
    if (n < 0) {
        self->n = 0;
        errno = -n;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->n = n;
    if (n == 0)
        return Py_BuildValue("(inO)", 0, (Py_ssize_t)0, Py_None);
    j = core_run(self, 0, &exc);
    if (j < 0)
        return NULL;
    if (exc == NULL)
        return Py_BuildValue("(inO)", n, j, Py_None);
    return Py_BuildValue("(inN)", n, j, exc);
}

static PyObject *core_dispatch(PyObject *op, PyObject *arg)
{
    Py_ssize_t i = PyLong_AsSsize_t(arg), j;
    PyObject *exc;
    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (i < 0) {
        PyErr_SetString(PyExc_IndexError, "event index out of range");
        return NULL;
    }
    j = core_run((CoreObject *)op, i, &exc);
    return run_result(j, exc);
}

static PyObject *core_event(PyObject *op, PyObject *arg)
{
    CoreObject *self = (CoreObject *)op;
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    const uint32_t *e;

    if (i == -1 && PyErr_Occurred())
        return NULL;
    if (!core_live(self))
        return NULL;
    if (i < 0 || i >= self->n) {
        PyErr_SetString(PyExc_IndexError, "event index out of range");
        return NULL;
    }
    e = self->api->batch(self->loop)->ev + 4 * i;
    return Py_BuildValue("(IIII)", e[0], e[1], e[2], e[3]);
}

static PyObject *core_finish(PyObject *op, PyObject *unused)
{
    CoreObject *self = (CoreObject *)op;
    if (self->loop != NULL)
        self->api->flush(self->loop, 1);
    Py_RETURN_NONE;
}

static PyObject *core_flush_conn(PyObject *op, PyObject *arg)
{
    CoreObject *self = (CoreObject *)op;
    long cid = PyLong_AsLong(arg);
    if (cid == -1 && PyErr_Occurred())
        return NULL;
    if (!core_live(self))
        return NULL;
    return PyLong_FromLongLong((long long)self->api->flush_conn(self->loop, (int)cid));
}

static PyObject *core_detach(PyObject *op, PyObject *unused)
{
    ((CoreObject *)op)->loop = NULL;
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"iterate", core_iterate, METH_O,
     "iterate(timeout) -> (n, j, exc): flush, poll, deliver messages; see csrc/speedups.c."},
    {"dispatch", core_dispatch, METH_O,
     "dispatch(i) -> (j, exc): deliver the batch's messages from event i on."},
    {"event", core_event, METH_O, "event(i) -> (kind, id, start, end) of the last batch."},
    {"finish", core_finish, METH_NOARGS, "Send what this iteration wrote; the iteration ends."},
    {"flush_conn", core_flush_conn, METH_O,
     "flush_conn(cid) -> bytes still queued (or -errno): send that connection's writes now."},
    {"detach", core_detach, METH_NOARGS, "The loop is being freed: never touch it again."},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot core_slots[] = {
    {Py_tp_new, core_new},
    {Py_tp_dealloc, core_dealloc},
    {Py_tp_traverse, core_traverse},
    {Py_tp_clear, core_clear},
    {Py_tp_methods, core_methods},
    {Py_tp_doc, "Core(api_addr, loop_addr, conns): the hot path over one C loop."},
    {0, NULL},
};

static PyType_Spec core_spec = {
    "fastmux._speedups.Core", sizeof(CoreObject), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC, core_slots,
};

/* ---- Stream ---------------------------------------------------------------- */

static int stream_traverse(PyObject *op, visitproc visit, void *arg)
{
    StreamObject *s = (StreamObject *)op;
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(s->loop);
    Py_VISIT(s->on_message);
    Py_VISIT(s->wbuf);
    Py_VISIT(s->msg_call);
    Py_VISIT(s->msg_fn);
    Py_VISIT(s->msg_err);
    Py_VISIT(s->tw_slow);
    Py_VISIT(s->tw_pause);
    Py_VISIT((PyObject *)s->core);
    return 0;
}

static int stream_clear(PyObject *op)
{
    StreamObject *s = (StreamObject *)op;
    Py_CLEAR(s->loop);
    Py_CLEAR(s->on_message);
    Py_CLEAR(s->wbuf);
    Py_CLEAR(s->msg_call);
    Py_CLEAR(s->msg_fn);
    Py_CLEAR(s->msg_err);
    Py_CLEAR(s->tw_slow);
    Py_CLEAR(s->tw_pause);
    Py_CLEAR(s->core);
    return 0;
}

static void stream_dealloc(PyObject *op)
{
    gc_dealloc(op, stream_clear);
}

static PyObject *stream_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    StreamObject *s = (StreamObject *)PyType_GenericNew(type, NULL, NULL);
    if (s != NULL) {
        s->cid = -1;
        s->deliver = 1;
    }
    return (PyObject *)s;
}

static int stream_write1(StreamObject *s, PyObject *data)
{
    Py_ssize_t len;
    int rc = 0;

    if (s->wclosed) {
        PyErr_SetString(s_closed_error, "write on a closed connection");
        return -1;
    }
    if (PyBytes_CheckExact(data)) {
        Py_INCREF(data);
    } else if (s_check_bytes == NULL) {
        PyErr_SetString(PyExc_TypeError, "data must be bytes");
        return -1;
    } else {
        data = call2(s_check_bytes, data, s_data);
        if (data == NULL)
            return -1;
    }
    len = PyBytes_Size(data); /* check_bytes returned something else: -1 */
    if (len < 0) {
        rc = -1;
    } else if (len > 0) {
        CoreObject *core = s->core;
        if (core != NULL && core->loop != NULL && s->cid >= 0) {
            s->queued = (long long)core->api->queue(core->loop, s->cid,
                                                    PyBytes_AsString(data), (size_t)len);
        } else if (s->wbuf == NULL) {
            PyErr_SetString(PyExc_AttributeError, "_wbuf");
            rc = -1;
        } else if (!PyList_Check(s->wbuf)) {
            PyErr_SetString(PyExc_TypeError, "_wbuf must be a list");
            rc = -1;
        } else {
            /* Our own reference: _mark_dirty runs Python code. */
            PyObject *wbuf = s->wbuf;
            Py_INCREF(wbuf);
            if (PyList_Size(wbuf) == 0) {
                PyObject *r = PyObject_CallMethodObjArgs((PyObject *)s, s_mark_dirty, NULL);
                if (r == NULL)
                    rc = -1;
                Py_XDECREF(r);
            }
            if (rc == 0)
                rc = PyList_Append(wbuf, data);
            Py_DECREF(wbuf);
        }
    }
    Py_DECREF(data);
    return rc;
}

static PyObject *stream_write(PyObject *op, PyObject *data)
{
    if (stream_write1((StreamObject *)op, data) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *stream_writelines(PyObject *op, PyObject *lines)
{
    PyObject *it = PyObject_GetIter(lines), *item;
    if (it == NULL)
        return NULL;
    while ((item = PyIter_Next(it)) != NULL) {
        int rc = stream_write1((StreamObject *)op, item);
        Py_DECREF(item);
        if (rc < 0) {
            Py_DECREF(it);
            return NULL;
        }
    }
    Py_DECREF(it);
    if (PyErr_Occurred())
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *stream_twrite(PyObject *op, PyObject *data)
{
    StreamObject *s = (StreamObject *)op;
    CoreObject *core = s->core;
    PyObject *r;
    Py_ssize_t len;
    long long q;

    if (!s->tw_ok || !PyBytes_CheckExact(data) || s->wclosed || core == NULL ||
        core->loop == NULL || s->cid < 0) {
        if (s->tw_slow == NULL || s->tw_slow == Py_None) {
            PyErr_SetString(PyExc_RuntimeError, "fastmux: _twrite without a transport");
            return NULL;
        }
        PyObject *slow = s->tw_slow, *r2;
        Py_INCREF(slow); /* the call may replace it */
        r2 = PyObject_CallFunctionObjArgs(slow, data, NULL);
        Py_DECREF(slow);
        return r2;
    }
    len = PyBytes_Size(data);
    if (len == 0)
        Py_RETURN_NONE;
    q = (long long)core->api->queue(core->loop, s->cid, PyBytes_AsString(data), (size_t)len);
    s->queued = q;
    if (q > s->tw_high) {
        /* Past the high-water mark: send now and pause the protocol only
         * for what the kernel did not take, as asyncio's transports do. */
        q = (long long)core->api->flush_conn(core->loop, s->cid);
        s->queued = q;
        if (q > s->tw_high && s->tw_pause != NULL && s->tw_pause != Py_None) {
            PyObject *pause = s->tw_pause;
            Py_INCREF(pause);
            r = PyObject_CallFunctionObjArgs(pause, NULL);
            Py_DECREF(pause);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
        }
    }
    Py_RETURN_NONE;
}

static PyObject *stream_bind(PyObject *op, PyObject *core)
{
    StreamObject *s = (StreamObject *)op;
    CoreObject *old = s->core;
    if (core != Py_None && !PyObject_TypeCheck(core, s_core_type)) {
        PyErr_SetString(PyExc_TypeError, "_bind: a Core or None");
        return NULL;
    }
    /* Set, then release the old one: its release can run Python code. */
    s->core = core == Py_None ? NULL : (CoreObject *)core;
    Py_XINCREF(s->core);
    Py_XDECREF(old);
    Py_RETURN_NONE;
}

static PyMethodDef stream_methods[] = {
    {"write", stream_write, METH_O,
     "Queue `data` (any bytes-like; its content is taken now).\n\n"
     "Everything written during one loop iteration leaves in one send at\n"
     "the end of it (a write of 16 KiB or more on the epoll backend goes at\n"
     "once).  Raises ConnectionClosed after close(), abort(),\n"
     "shutdown_write() or a detected reset."},
    {"writelines", stream_writelines, METH_O,
     "Write each item of `lines` (no separator is added)."},
    {"_twrite", stream_twrite, METH_O,
     "The asyncio transport's write, in C while the transport is open and "
     "not paused (see _tw_ok)."},
    {"_bind", stream_bind, METH_O, "Write into this Core's queue (None: the Python way)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef stream_members[] = {
    {"_loop", T_OBJECT_EX, offsetof(StreamObject, loop), 0, NULL},
    {"_on_message", T_OBJECT_EX, offsetof(StreamObject, on_message), 0, NULL},
    {"_wbuf", T_OBJECT_EX, offsetof(StreamObject, wbuf), 0, NULL},
    {"_msg_call", T_OBJECT, offsetof(StreamObject, msg_call), 0, NULL},
    {"_msg_fn", T_OBJECT, offsetof(StreamObject, msg_fn), 0, NULL},
    {"_msg_err", T_OBJECT, offsetof(StreamObject, msg_err), 0, NULL},
    {"_tw_slow", T_OBJECT, offsetof(StreamObject, tw_slow), 0, NULL},
    {"_tw_pause", T_OBJECT, offsetof(StreamObject, tw_pause), 0, NULL},
    {"_tw_high", T_LONGLONG, offsetof(StreamObject, tw_high), 0, NULL},
    {"_tw_ok", T_BOOL, offsetof(StreamObject, tw_ok), 0, NULL},
    {"_core", T_OBJECT, offsetof(StreamObject, core), READONLY, NULL},
    {"_cid", T_INT, offsetof(StreamObject, cid), 0, NULL},
    {"_queued", T_LONGLONG, offsetof(StreamObject, queued), 0, NULL},
    {"_closed", T_BOOL, offsetof(StreamObject, closed), 0, NULL},
    {"_wclosed", T_BOOL, offsetof(StreamObject, wclosed), 0, NULL},
    {"_deliver", T_BOOL, offsetof(StreamObject, deliver), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot stream_slots[] = {
    {Py_tp_new, stream_new},
    {Py_tp_dealloc, stream_dealloc},
    {Py_tp_traverse, stream_traverse},
    {Py_tp_clear, stream_clear},
    {Py_tp_methods, stream_methods},
    {Py_tp_members, stream_members},
    {Py_tp_doc, "The C base of fastmux.Connection: its hot fields and its writes."},
    {0, NULL},
};

static PyType_Spec stream_spec = {
    "fastmux._speedups.Stream", sizeof(StreamObject), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC, stream_slots,
};

/* ---- module ------------------------------------------------------------------ */

/* setup(ConnectionClosed, check_bytes): what write() raises and how it
 * converts bytes-likes (one implementation of the rule, in Python). */
static PyObject *setup(PyObject *self, PyObject *args)
{
    PyObject *closed_error, *check_bytes;
    if (!PyArg_ParseTuple(args, "OO:setup", &closed_error, &check_bytes))
        return NULL;
    Py_INCREF(closed_error);
    Py_XDECREF(s_closed_error);
    s_closed_error = closed_error;
    Py_INCREF(check_bytes);
    Py_XDECREF(s_check_bytes);
    s_check_bytes = check_bytes;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_VARARGS,
     "setup(ConnectionClosed, check_bytes): see csrc/speedups.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fastmux._speedups",
    "The hot path of fastmux's epoll backend, in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    PyObject *m;

    s_vectorcall = (vectorcall_fn)dlsym(RTLD_DEFAULT, "PyObject_Vectorcall");
    s_deliver = PyUnicode_InternFromString("_deliver");
    s_closed = PyUnicode_InternFromString("_closed");
    s_on_message = PyUnicode_InternFromString("_on_message");
    s_defer = PyUnicode_InternFromString("_defer");
    s_mark_dirty = PyUnicode_InternFromString("_mark_dirty");
    s_data = PyUnicode_InternFromString("data");
    if (!s_deliver || !s_closed || !s_on_message || !s_defer || !s_mark_dirty || !s_data)
        return NULL;
    s_closed_error = PyExc_RuntimeError;
    Py_INCREF(s_closed_error);
    m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    s_core_type = (PyTypeObject *)PyType_FromSpec(&core_spec);
    s_stream_type = (PyTypeObject *)PyType_FromSpec(&stream_spec);
    if (s_core_type == NULL || s_stream_type == NULL ||
        PyModule_AddObject(m, "Core", (PyObject *)s_core_type) < 0)
        goto fail;
    Py_INCREF(s_core_type); /* the module took one reference; we keep ours */
    if (PyModule_AddObject(m, "Stream", (PyObject *)s_stream_type) < 0)
        goto fail;
    Py_INCREF(s_stream_type);
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
