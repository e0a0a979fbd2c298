/*
 * speedups.c -- the message-dispatch loop of fastmux/_loop.py, in C.
 *
 * cffi cannot create Python objects from C, so a batch crosses into Python
 * as integers that Python must decode, slice and dispatch one by one.  This
 * module (limited API, so the abi3 wheel keeps working) runs the same loop
 * over the C batch directly: for each message it builds the bytes straight
 * from the arena and calls the connection's on_message.  Measured with
 * benchmarks/callgrind_dispatch.py (16 x 64 B per read, echo handler): about
 * 1,000 fewer instructions a message than the Python loop, which is 45 % of
 * fastmux's user-space overhead above a hand-written floor.
 *
 * It is an accelerator, not a second implementation of the rules: it
 * handles only FM_EV_MSG events and does exactly what Loop._dispatch does
 * for them (deliver if conn._deliver, else conn._defer(data) unless the
 * connection is closed).  At the first other event it returns, and Python
 * handles that event with the one shared implementation.  The select
 * backend, and the epoll backend without this module, use the Python loop;
 * the same test suite runs against all three.
 *
 * Only fastmux/_epoll.py imports this module.
 */
#define PY_SSIZE_T_CLEAN
#ifndef Py_LIMITED_API
#define Py_LIMITED_API 0x030A0000 /* CPython 3.10: the abi3 floor */
#endif
#include <Python.h>
#include <stdint.h>

#include "fastmux.h" /* FM_EV_MSG: the event kinds have one source */

static PyObject *s_deliver, *s_closed, *s_on_message, *s_defer;

/* dispatch(ev_addr, arena_addr, n, i, conns) -> (j, exc)
 *
 * Handle MSG events from index i while they last; j is the index of the
 * first event not handled (n when done).  If a handler raised an Exception,
 * it stops after that event and returns it as exc (the event's connection
 * is the one with id ev[4*(j-1)+1]); other exceptions propagate. */
static PyObject *dispatch(PyObject *self, PyObject *args)
{
    unsigned long long ev_addr, arena_addr;
    Py_ssize_t n, i;
    PyObject *conns;

    if (!PyArg_ParseTuple(args, "KKnnO!", &ev_addr, &arena_addr, &n, &i,
                          &PyList_Type, &conns))
        return NULL;
    const uint32_t *ev = (const uint32_t *)(uintptr_t)ev_addr;
    const char *arena = (const char *)(uintptr_t)arena_addr;

    for (; i < n; i++) {
        const uint32_t *e = ev + 4 * i;
        PyObject *conn, *data, *flag, *r;
        int deliver;

        if (e[0] != FM_EV_MSG)
            break;
        conn = PyList_GetItem(conns, (Py_ssize_t)e[1]); /* borrowed */
        if (conn == NULL)
            return NULL;
        flag = PyObject_GetAttr(conn, s_deliver);
        if (flag == NULL)
            return NULL;
        deliver = PyObject_IsTrue(flag);
        Py_DECREF(flag);
        if (deliver < 0)
            return NULL;
        data = PyBytes_FromStringAndSize(arena + e[2], (Py_ssize_t)(e[3] - e[2]));
        if (data == NULL)
            return NULL;
        if (deliver) {
            PyObject *om = PyObject_GetAttr(conn, s_on_message);
            if (om == NULL) {
                Py_DECREF(data);
                return NULL;
            }
            r = PyObject_CallFunctionObjArgs(om, conn, data, NULL);
            Py_DECREF(om);
        } else {
            int closed;
            flag = PyObject_GetAttr(conn, s_closed);
            if (flag == NULL) {
                Py_DECREF(data);
                return NULL;
            }
            closed = PyObject_IsTrue(flag);
            Py_DECREF(flag);
            if (closed < 0) {
                Py_DECREF(data);
                return NULL;
            }
            r = closed ? (Py_INCREF(Py_None), Py_None)
                       : PyObject_CallMethodObjArgs(conn, s_defer, data, NULL);
        }
        Py_DECREF(data);
        if (r == NULL) {
            PyObject *type, *value, *tb;
            if (!PyErr_ExceptionMatches(PyExc_Exception))
                return NULL; /* KeyboardInterrupt and friends leave run() */
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
            return Py_BuildValue("(nN)", i + 1, value);
        }
        Py_DECREF(r);
    }
    return Py_BuildValue("(nO)", i, Py_None);
}

static PyMethodDef methods[] = {
    {"dispatch", dispatch, METH_VARARGS,
     "dispatch(ev_addr, arena_addr, n, i, conns) -> (j, exc): deliver the "
     "MSG events of a batch from index i on; see csrc/speedups.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "fastmux._speedups",
    "The message-dispatch loop of fastmux's epoll backend, in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__speedups(void)
{
    s_deliver = PyUnicode_InternFromString("_deliver");
    s_closed = PyUnicode_InternFromString("_closed");
    s_on_message = PyUnicode_InternFromString("_on_message");
    s_defer = PyUnicode_InternFromString("_defer");
    if (!s_deliver || !s_closed || !s_on_message || !s_defer)
        return NULL;
    return PyModule_Create(&module);
}
