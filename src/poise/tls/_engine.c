/* The TLS record engine of poise's HTTPS listeners, in C: OpenSSL driven through memory
 * BIOs, called by the listener's TLS transport (tls/transport.py) once per read and write.
 *
 * The pure-Python twin is ``engine.PyEngine``: the same five calls made through the
 * ``_ssl._SSLSocket`` methods. Both pass the same tests (tests/tls/test_engine.py and the
 * HTTPS integration tests run each). What this one saves, per call:
 *
 * - no exception for "more bytes needed": ``_ssl`` raises SSLWantReadError (an exception
 *   object with its library and reason looked up and a message formatted) on every
 *   handshake step and every read that drains the incoming BIO; here that is a return
 *   value;
 * - the GIL is kept: ``_ssl`` releases and takes it back around every OpenSSL call. With
 *   memory BIOs OpenSSL never blocks, so there is nothing to gain by releasing it; the
 *   callbacks OpenSSL makes meanwhile (SNI, ticket keys) take it with PyGILState_Ensure,
 *   which is fine when it is already held;
 * - a read drains every complete record into one bytes object, and a write returns the
 *   records to send, so the transport makes one call where the twin makes several.
 *
 * The SSL object is the one ``SSLContext._wrap_bio`` made: the context's settings, the SNI
 * callback, ALPN, client certificates and tickets are all Python's ``ssl`` as before, and
 * ``getpeercert()``, ``session_reused`` and the rest are read from that ``_SSLSocket``. Its
 * ``SSL *`` is the field after ``Socket`` in CPython's ``PySSLSocket`` (3.11 to 3.13); a
 * pointer found there is used only after OpenSSL confirms, through ``SSL_get_app_data``,
 * that the SSL object belongs to that very ``_SSLSocket`` (Python's ``_ssl`` sets it).
 *
 * No OpenSSL headers or link flags: the functions are looked up (dlsym) in the library
 * CPython's ``_ssl`` is linked with, as the ticket callback (_tickets.c) does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "_libssl.h"
#include <string.h>

#define SSL_ERROR_SSL 1
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_WANT_WRITE 3
#define SSL_ERROR_SYSCALL 5
#define SSL_ERROR_ZERO_RETURN 6
#define BIO_CTRL_PENDING 10
#define TLS1_3_VERSION 0x0304
#define READ_CHUNK 16384 /* one TLS record's plaintext at most */

static struct {
    int (*do_handshake)(void *);
    int (*read)(void *, void *, int);
    int (*write)(void *, const void *, int);
    int (*get_error)(const void *, int);
    int (*shutdown)(void *);
    int (*pending)(const void *);
    void *(*get_rbio)(const void *);
    void *(*get_wbio)(const void *);
    void *(*get_ex_data)(const void *, int);
    int (*version)(const void *);
    int (*bio_write)(void *, const void *, int);
    int (*bio_read)(void *, void *, int);
    long (*bio_ctrl)(void *, int, long, void *);
    void (*err_clear)(void);
    unsigned long (*err_get)(void);
    void (*err_string)(unsigned long, char *, size_t);
    int ready;
} ossl;

static PyObject *ssl_error; /* ssl.SSLError, given to setup() */
static PyObject *empty;     /* b"" */

typedef struct {
    PyObject_HEAD
    PyObject *Socket;
    void *ssl;
} pyssl_socket; /* the start of CPython's PySSLSocket (Modules/_ssl.c, 3.11-3.13) */

typedef struct {
    PyObject_HEAD
    PyObject *sslobj; /* the _ssl._SSLSocket that owns the SSL object */
    void *ssl;
    void *rbio;
    void *wbio;
    int peer_closed; /* the peer's close_notify has arrived */
} Engine;

/* Raise ssl.SSLError for a failed call, with OpenSSL's reason, and empty its error queue. */
static PyObject *fail(int code, const char *what) {
    char buf[256] = "";
    unsigned long e = ossl.err_get();
    if (e != 0)
        ossl.err_string(e, buf, sizeof(buf));
    ossl.err_clear();
    PyObject *args = Py_BuildValue("(is)", code, buf[0] ? buf : what);
    if (args != NULL) {
        PyErr_SetObject(ssl_error, args);
        Py_DECREF(args);
    }
    return NULL;
}

static PyObject *Engine_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *sslobj;
    static char *kwlist[] = {"sslobj", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", kwlist, &sslobj))
        return NULL;
    if (!ossl.ready) {
        PyErr_SetString(PyExc_RuntimeError, "_engine.setup has not succeeded");
        return NULL;
    }
    if (strcmp(Py_TYPE(sslobj)->tp_name, "_ssl._SSLSocket") != 0 ||
        Py_TYPE(sslobj)->tp_basicsize < (Py_ssize_t)sizeof(pyssl_socket)) {
        PyErr_SetString(PyExc_TypeError, "an _ssl._SSLSocket is expected");
        return NULL;
    }
    void *ssl = ((pyssl_socket *)sslobj)->ssl;
    if (ssl == NULL || ossl.get_ex_data(ssl, 0) != (void *)sslobj) {
        PyErr_SetString(PyExc_RuntimeError, "this _SSLSocket's layout is not the one expected");
        return NULL;
    }
    void *rbio = ossl.get_rbio(ssl), *wbio = ossl.get_wbio(ssl);
    if (rbio == NULL || wbio == NULL) {
        PyErr_SetString(PyExc_ValueError, "the _SSLSocket has no memory BIOs");
        return NULL;
    }
    Engine *self = (Engine *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    Py_INCREF(sslobj);
    self->sslobj = sslobj;
    self->ssl = ssl;
    self->rbio = rbio;
    self->wbio = wbio;
    self->peer_closed = 0;
    return (PyObject *)self;
}

static void Engine_dealloc(Engine *self) {
    Py_CLEAR(self->sslobj); /* frees the SSL object (and its BIOs) when it was the last */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int feed(Engine *self, PyObject *data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return -1;
    const char *p = view.buf;
    Py_ssize_t left = view.len;
    while (left > 0) {
        int chunk = left > INT_MAX ? INT_MAX : (int)left;
        int n = ossl.bio_write(self->rbio, p, chunk);
        if (n <= 0) {
            PyBuffer_Release(&view);
            fail(0, "cannot buffer incoming bytes");
            return -1;
        }
        p += n;
        left -= n;
    }
    PyBuffer_Release(&view);
    return 0;
}

/* The records OpenSSL wrote (b"" when none). */
static PyObject *take(Engine *self) {
    long n = ossl.bio_ctrl(self->wbio, BIO_CTRL_PENDING, 0, NULL);
    if (n <= 0)
        return Py_NewRef(empty);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL)
        return NULL;
    int got = ossl.bio_read(self->wbio, PyBytes_AS_STRING(out), (int)n);
    if (got != n) {
        Py_DECREF(out);
        return fail(0, "cannot read outgoing records");
    }
    return out;
}

static PyObject *Engine_handshake(Engine *self, PyObject *data) {
    if (data != Py_None && feed(self, data) < 0)
        return NULL;
    ossl.err_clear();
    int r = ossl.do_handshake(self->ssl);
    if (r == 1)
        Py_RETURN_TRUE;
    int err = ossl.get_error(self->ssl, r);
    if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
        ossl.err_clear();
        Py_RETURN_FALSE;
    }
    return fail(err, err == SSL_ERROR_SYSCALL ? "EOF in the handshake" : "handshake failed");
}

/* Feed ``data`` (or None) and return every byte of application data that can be
 * decrypted now (b"" when none); sets peer_closed on close_notify. */
static PyObject *Engine_read(Engine *self, PyObject *data) {
    if (data != Py_None && feed(self, data) < 0)
        return NULL;
    if (self->peer_closed)
        return Py_NewRef(empty);
    /* plaintext is never longer than the records it came in */
    long cap = ossl.bio_ctrl(self->rbio, BIO_CTRL_PENDING, 0, NULL) + ossl.pending(self->ssl);
    if (cap < READ_CHUNK)
        cap = READ_CHUNK;
    PyObject *out = PyBytes_FromStringAndSize(NULL, cap);
    if (out == NULL)
        return NULL;
    long got = 0;
    ossl.err_clear();
    for (;;) {
        long room = cap - got;
        if (room == 0) { /* cannot happen (see cap); grow rather than lose bytes */
            if (_PyBytes_Resize(&out, cap * 2) < 0)
                return NULL;
            cap *= 2;
            room = cap - got;
        }
        int n = ossl.read(self->ssl, PyBytes_AS_STRING(out) + got,
                          room > INT_MAX ? INT_MAX : (int)room);
        if (n > 0) {
            got += n;
            continue;
        }
        int err = ossl.get_error(self->ssl, n);
        if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) {
            ossl.err_clear();
            break;
        }
        if (err == SSL_ERROR_ZERO_RETURN) {
            self->peer_closed = 1;
            ossl.err_clear();
            break;
        }
        Py_DECREF(out);
        return fail(err, "read failed");
    }
    if (got == 0) {
        Py_DECREF(out);
        return Py_NewRef(empty);
    }
    if (got != cap && _PyBytes_Resize(&out, got) < 0)
        return NULL;
    return out;
}

static int write_one(Engine *self, PyObject *data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return -1;
    const char *p = view.buf;
    Py_ssize_t left = view.len;
    ossl.err_clear();
    while (left > 0) {
        int chunk = left > (1 << 30) ? (1 << 30) : (int)left;
        int n = ossl.write(self->ssl, p, chunk); /* memory BIO: all of it, or an error */
        if (n <= 0) {
            PyBuffer_Release(&view);
            fail(ossl.get_error(self->ssl, n), "write failed");
            return -1;
        }
        p += n;
        left -= n;
    }
    PyBuffer_Release(&view);
    return 0;
}

/* Encrypt ``data`` and return the records to send. */
static PyObject *Engine_write(Engine *self, PyObject *data) {
    if (write_one(self, data) < 0)
        return NULL;
    return take(self);
}

/* Encrypt each of ``pieces`` (a list or tuple) and return all the records to send. */
static PyObject *Engine_writelines(Engine *self, PyObject *pieces) {
    PyObject *seq = PySequence_Fast(pieces, "writelines() takes a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (write_one(self, items[i]) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    return take(self);
}

static PyObject *Engine_take(Engine *self, PyObject *unused) {
    (void)unused;
    return take(self);
}

/* Send close_notify (once); True when the peer's has arrived too. Failures (the
 * connection is broken anyway) answer False: the caller closes the socket either way. */
static PyObject *Engine_shutdown(Engine *self, PyObject *unused) {
    (void)unused;
    ossl.err_clear();
    int r = ossl.shutdown(self->ssl);
    ossl.err_clear();
    return PyBool_FromLong(r == 1);
}

static PyObject *Engine_get_peer_closed(Engine *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(self->peer_closed);
}

static PyObject *Engine_get_tls13(Engine *self, void *closure) {
    (void)closure;
    return PyBool_FromLong(ossl.version(self->ssl) == TLS1_3_VERSION);
}

static PyObject *Engine_get_sslobj(Engine *self, void *closure) {
    (void)closure;
    return Py_NewRef(self->sslobj);
}

static PyMethodDef Engine_methods[] = {
    {"handshake", (PyCFunction)Engine_handshake, METH_O,
     "handshake(data | None) -> True once complete; raises ssl.SSLError when it fails"},
    {"read", (PyCFunction)Engine_read, METH_O,
     "read(data | None) -> the application data decrypted now (b\"\" if none)"},
    {"write", (PyCFunction)Engine_write, METH_O, "write(data) -> the records to send"},
    {"writelines", (PyCFunction)Engine_writelines, METH_O,
     "writelines(pieces) -> the records to send"},
    {"take", (PyCFunction)Engine_take, METH_NOARGS, "take() -> records waiting to be sent"},
    {"shutdown", (PyCFunction)Engine_shutdown, METH_NOARGS,
     "shutdown() -> send close_notify; True when the peer's has arrived too"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Engine_getset[] = {
    {"peer_closed", (getter)Engine_get_peer_closed, NULL, "the peer sent close_notify", NULL},
    {"sslobj", (getter)Engine_get_sslobj, NULL, "the _ssl._SSLSocket", NULL},
    {"tls13", (getter)Engine_get_tls13, NULL, "TLS 1.3 was negotiated", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "poise.tls._engine.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Engine(sslobj): one TLS connection's records, through its memory BIOs",
    .tp_new = Engine_new,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
    .tp_getset = Engine_getset,
};

static PyObject *setup(PyObject *self, PyObject *args) {
    (void)self;
    const char *path;
    PyObject *error_class;
    if (!PyArg_ParseTuple(args, "zO", &path, &error_class))
        return NULL;
    if (ossl.ready)
        Py_RETURN_TRUE;
    LIBSSL_OPEN(lib, path)
#define FIND(field, symbol) LIBSSL_FIND(lib, ossl.field, symbol)
    FIND(do_handshake, "SSL_do_handshake")
    FIND(read, "SSL_read")
    FIND(write, "SSL_write")
    FIND(get_error, "SSL_get_error")
    FIND(shutdown, "SSL_shutdown")
    FIND(pending, "SSL_pending")
    FIND(get_rbio, "SSL_get_rbio")
    FIND(get_wbio, "SSL_get_wbio")
    FIND(get_ex_data, "SSL_get_ex_data")
    FIND(version, "SSL_version")
    FIND(bio_write, "BIO_write")
    FIND(bio_read, "BIO_read")
    FIND(bio_ctrl, "BIO_ctrl")
    FIND(err_clear, "ERR_clear_error")
    FIND(err_get, "ERR_get_error")
    FIND(err_string, "ERR_error_string_n")
#undef FIND
    Py_INCREF(error_class);
    Py_XSETREF(ssl_error, error_class);
    ossl.ready = 1;
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_VARARGS,
     "setup(library_path, ssl_error_class) -> True, or why the engine cannot be had (str)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "poise.tls._engine",
    "The TLS record engine in C (see engine.py for the twin).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__engine(void) {
    if (PyType_Ready(&EngineType) < 0)
        return NULL;
    if ((empty = PyBytes_FromStringAndSize(NULL, 0)) == NULL)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
