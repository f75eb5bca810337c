/* The L4 relay's byte pump in C: connected client/backend socket pairs relayed with recv and
 * send, no Python call per message. Its pure-Python twin is the relay of l4/relay.py (two
 * asyncio protocols writing to each other's transports); both pass tests/l4 and the L4
 * integration tests.
 *
 * A Pump owns an epoll descriptor. The event loop watches that one descriptor
 * (loop.add_reader(pump.fileno(), pump.run)); run() serves every ready socket of every pair
 * it holds, then returns. Per pair and direction: what recv got is sent on at once; what the
 * other side did not take waits in that direction's buffer, and reading that direction
 * stops until the buffer is sent (backpressure: one buffer's worth per direction). A FIN
 * read becomes shutdown(SHUT_WR) on the other socket once the buffer is empty; when both
 * directions are shut, the pair is closed. An error on either socket (reset, broken pipe)
 * closes both with SO_LINGER 0, so the other's peer sees a reset too. Each end is told to
 * Python: on_end(id, failed_socket, client_bytes, backend_bytes), failed_socket -1 when
 * both directions ended cleanly, 0 the client's, 1 the backend's.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define SCRATCH (256 * 1024)
#define MAX_EVENTS 256

typedef struct {
    char *buf;          /* bytes read from one side that the other has not taken yet */
    size_t off, len;
    int eof;            /* the source sent FIN */
    int shut;           /* SHUT_WR sent to the destination */
    unsigned long long count; /* bytes read from the source */
} direction_t;

typedef struct {
    int fd[2];          /* 0: client, 1: backend */
    uint32_t mask[2];   /* the epoll interest registered for each */
    direction_t dir[2]; /* dir[s]: from fd[s] to fd[1 - s] */
    long long id;
} pair_t;

typedef struct {
    PyObject_HEAD
    int epfd;
    PyObject *on_end;
    pair_t **pairs;     /* by slot; NULL: free */
    uint32_t *uses;     /* by slot: pairs it has held, for ids (find) */
    Py_ssize_t size, live;
} Pump;

static char scratch[SCRATCH];

static void forget(Pump *p, pair_t *r, Py_ssize_t slot, int reset) {
    if (reset) {
        struct linger lg = {1, 0};
        for (int s = 0; s < 2; s++)
            setsockopt(r->fd[s], SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
    }
    for (int s = 0; s < 2; s++) {
        close(r->fd[s]); /* also leaves the epoll set */
        free(r->dir[s].buf);
    }
    p->pairs[slot] = NULL;
    p->live--;
}

/* Remove the pair and tell Python which socket failed (-1: none, both directions ended;
 * 0: the client's; 1: the backend's, both then reset); a failing on_end is reported,
 * never raised from run(). */
static void end(Pump *p, pair_t *r, Py_ssize_t slot, int failed) {
    long long id = r->id;
    unsigned long long in = r->dir[0].count, out = r->dir[1].count;
    forget(p, r, slot, failed >= 0);
    free(r);
    PyObject *res = PyObject_CallFunction(p->on_end, "LiKK", id, failed, in, out);
    if (res == NULL)
        PyErr_WriteUnraisable(p->on_end);
    Py_XDECREF(res);
}

#define GONE 0xffffffffu /* mask of a socket taken out of the epoll set */

static int want(Pump *p, pair_t *r, Py_ssize_t slot, int s) {
    /* fd[s] reads while its direction's buffer is empty and it has not sent FIN; it writes
     * while the other direction has bytes waiting for it. A socket with nothing left either
     * way (FIN read from it, FIN sent to it) leaves the set: its hang-up would be reported
     * on every wait while the other socket still drains. */
    if (r->mask[s] == GONE)
        return 0;
    if (r->dir[s].eof && r->dir[1 - s].shut) {
        r->mask[s] = GONE;
        return epoll_ctl(p->epfd, EPOLL_CTL_DEL, r->fd[s], NULL);
    }
    uint32_t m = 0;
    if (!r->dir[s].eof && r->dir[s].len == 0)
        m |= EPOLLIN;
    if (r->dir[1 - s].len > 0)
        m |= EPOLLOUT;
    if (m == r->mask[s])
        return 0;
    struct epoll_event ev = {.events = m, .data.u64 = ((uint64_t)slot << 1) | (uint64_t)s};
    if (epoll_ctl(p->epfd, EPOLL_CTL_MOD, r->fd[s], &ev) < 0)
        return -1;
    r->mask[s] = m;
    return 0;
}

/* send what direction d holds to fd[1 - d]; -1 on a socket error */
static int flush(pair_t *r, int d) {
    direction_t *x = &r->dir[d];
    while (x->len > 0) {
        ssize_t n = send(r->fd[1 - d], x->buf + x->off, x->len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                return 0;
            return -1;
        }
        x->off += (size_t)n;
        x->len -= (size_t)n;
    }
    free(x->buf);
    x->buf = NULL;
    x->off = 0;
    if (x->eof && !x->shut) {
        shutdown(r->fd[1 - d], SHUT_WR);
        x->shut = 1;
    }
    return 0;
}

/* fd[s] is readable: read once, send on what the other side takes, keep the rest.
 * 0, or the socket that failed: -1 - s (reading) or -1 - (1 - s) (writing) */
static int pump_in(pair_t *r, int s) {
    direction_t *x = &r->dir[s];
    ssize_t n;
    do {
        n = recv(r->fd[s], scratch, SCRATCH, 0);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1 - s;
    if (n == 0) {
        x->eof = 1;
        if (x->len == 0 && !x->shut) {
            shutdown(r->fd[1 - s], SHUT_WR);
            x->shut = 1;
        }
        return 0;
    }
    x->count += (unsigned long long)n;
    ssize_t sent = 0;
    while (sent < n) {
        ssize_t w = send(r->fd[1 - s], scratch + sent, (size_t)(n - sent), MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            return -1 - (1 - s);
        }
        sent += w;
    }
    if (sent < n) {
        x->buf = malloc((size_t)(n - sent));
        if (x->buf == NULL)
            return -1 - s;
        memcpy(x->buf, scratch + sent, (size_t)(n - sent));
        x->off = 0;
        x->len = (size_t)(n - sent);
    }
    return 0;
}

static PyObject *Pump_run(Pump *p, PyObject *unused) {
    (void)unused;
    struct epoll_event events[MAX_EVENTS];
    int n = epoll_wait(p->epfd, events, MAX_EVENTS, 0);
    for (int i = 0; i < n; i++) {
        Py_ssize_t slot = (Py_ssize_t)(events[i].data.u64 >> 1);
        int s = (int)(events[i].data.u64 & 1);
        pair_t *r = slot < p->size ? p->pairs[slot] : NULL;
        if (r == NULL)
            continue; /* ended by an earlier event of this batch */
        uint32_t ev = events[i].events;
        int failed = -1; /* which socket failed */
        if ((ev & EPOLLOUT) && flush(r, 1 - s) < 0)
            failed = s;
        if (failed < 0 && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && (r->mask[s] & EPOLLIN)) {
            int rc = pump_in(r, s);
            if (rc < 0)
                failed = -1 - rc;
        }
        if (failed < 0 && (ev & (EPOLLERR | EPOLLHUP)) && !(r->mask[s] & EPOLLIN)) {
            int err = 0;
            socklen_t len = sizeof(err);
            getsockopt(r->fd[s], SOL_SOCKET, SO_ERROR, &err, &len);
            /* a hang-up on a socket still in the set (one finished both ways has left it):
             * the peer reset it, and what is still to flow to or from it cannot */
            if (err != 0 || (ev & EPOLLHUP) != 0)
                failed = s;
        }
        if (failed >= 0) {
            end(p, r, slot, failed);
            continue;
        }
        if (r->dir[0].shut && r->dir[1].shut) {
            end(p, r, slot, -1);
            continue;
        }
        if (want(p, r, slot, 0) < 0)
            end(p, r, slot, 0);
        else if (want(p, r, slot, 1) < 0)
            end(p, r, slot, 1);
    }
    Py_RETURN_NONE;
}

static PyObject *Pump_add(Pump *p, PyObject *args) {
    int a, b;
    if (!PyArg_ParseTuple(args, "ii", &a, &b))
        return NULL;
    Py_ssize_t slot = 0;
    while (slot < p->size && p->pairs[slot] != NULL)
        slot++;
    if (slot == p->size) {
        Py_ssize_t grown = p->size ? p->size * 2 : 64;
        pair_t **pairs = realloc(p->pairs, (size_t)grown * sizeof(pair_t *));
        if (pairs == NULL)
            return PyErr_NoMemory();
        memset(pairs + p->size, 0, (size_t)(grown - p->size) * sizeof(pair_t *));
        p->pairs = pairs;
        uint32_t *uses = realloc(p->uses, (size_t)grown * sizeof(uint32_t));
        if (uses == NULL)
            return PyErr_NoMemory();
        memset(uses + p->size, 0, (size_t)(grown - p->size) * sizeof(uint32_t));
        p->uses = uses;
        p->size = grown;
    }
    pair_t *r = calloc(1, sizeof(pair_t));
    if (r == NULL)
        return PyErr_NoMemory();
    r->fd[0] = a;
    r->fd[1] = b;
    p->uses[slot] = (p->uses[slot] + 1) & 0x7fffffffu; /* 1 .. 2^31 - 1, then again */
    if (p->uses[slot] == 0)
        p->uses[slot] = 1;
    r->id = ((long long)p->uses[slot] << 32) | (long long)slot;
    for (int s = 0; s < 2; s++) {
        struct epoll_event ev = {.events = EPOLLIN,
                                 .data.u64 = ((uint64_t)slot << 1) | (uint64_t)s};
        if (epoll_ctl(p->epfd, EPOLL_CTL_ADD, r->fd[s], &ev) < 0) {
            int err = errno;
            if (s == 1)
                epoll_ctl(p->epfd, EPOLL_CTL_DEL, r->fd[0], NULL);
            free(r);
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        r->mask[s] = EPOLLIN;
    }
    p->pairs[slot] = r;
    p->live++;
    return PyLong_FromLongLong(r->id);
}

/* An id is its slot (low 32 bits) and that slot's use count (above): found at once, and an
 * id of a pair that ended never finds the slot's next pair. */
static Py_ssize_t find(Pump *p, long long id) {
    Py_ssize_t slot = (Py_ssize_t)(id & 0xffffffffLL);
    if (id <= 0 || slot >= p->size || p->pairs[slot] == NULL || p->pairs[slot]->id != id)
        return -1;
    return slot;
}

static PyObject *Pump_counts(Pump *p, PyObject *arg) {
    long long id = PyLong_AsLongLong(arg);
    if (id == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t slot = find(p, id);
    if (slot < 0)
        Py_RETURN_NONE;
    pair_t *r = p->pairs[slot];
    return Py_BuildValue("KK", r->dir[0].count, r->dir[1].count);
}

static PyObject *Pump_close(Pump *p, PyObject *args) {
    long long id;
    int reset;
    if (!PyArg_ParseTuple(args, "Lp", &id, &reset))
        return NULL;
    Py_ssize_t slot = find(p, id);
    if (slot < 0)
        Py_RETURN_NONE;
    pair_t *r = p->pairs[slot];
    PyObject *counts = Py_BuildValue("KK", r->dir[0].count, r->dir[1].count);
    if (counts == NULL)
        return NULL;
    forget(p, r, slot, reset);
    free(r);
    return counts;
}

static PyObject *Pump_buffered(Pump *p, PyObject *unused) {
    (void)unused;
    unsigned long long total = 0;
    for (Py_ssize_t i = 0; i < p->size; i++)
        if (p->pairs[i] != NULL)
            total += p->pairs[i]->dir[0].len + p->pairs[i]->dir[1].len;
    return PyLong_FromUnsignedLongLong(total);
}

static PyObject *Pump_fileno(Pump *p, PyObject *unused) {
    (void)unused;
    return PyLong_FromLong(p->epfd);
}

static Py_ssize_t Pump_len(Pump *p) { return p->live; }

static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *on_end;
    static char *names[] = {"on_end", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O", names, &on_end))
        return NULL;
    Pump *p = (Pump *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (p->epfd < 0) {
        Py_DECREF(p);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_INCREF(on_end);
    p->on_end = on_end;
    return (PyObject *)p;
}

static void Pump_dealloc(Pump *p) {
    for (Py_ssize_t i = 0; i < p->size; i++)
        if (p->pairs[i] != NULL) {
            pair_t *r = p->pairs[i];
            forget(p, r, i, 1);
            free(r);
        }
    free(p->pairs);
    free(p->uses);
    if (p->epfd >= 0)
        close(p->epfd);
    Py_XDECREF(p->on_end);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyMethodDef Pump_methods[] = {
    {"run", (PyCFunction)Pump_run, METH_NOARGS,
     "run(): serve every ready socket (the loop calls it when fileno() is readable)"},
    {"add", (PyCFunction)Pump_add, METH_VARARGS,
     "add(client_fd, backend_fd) -> id: relay a connected pair; the pump owns both descriptors"},
    {"counts", (PyCFunction)Pump_counts, METH_O,
     "counts(id) -> (client_bytes, backend_bytes), or None once it ended"},
    {"close", (PyCFunction)Pump_close, METH_VARARGS,
     "close(id, reset) -> (client_bytes, backend_bytes) or None: end it now, no on_end"},
    {"fileno", (PyCFunction)Pump_fileno, METH_NOARGS, "the epoll descriptor to watch"},
    {"buffered", (PyCFunction)Pump_buffered, METH_NOARGS,
     "buffered() -> bytes read and not yet taken by the other side, all pairs together"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Pump_as_sequence = {.sq_length = (lenfunc)Pump_len};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "poise.l4._pump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Relays connected socket pairs in C (see the file's comment).",
    .tp_new = Pump_new,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_methods = Pump_methods,
    .tp_as_sequence = &Pump_as_sequence,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "poise.l4._pump", "The L4 relay's byte pump in C.", -1, NULL,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__pump(void) {
    if (PyType_Ready(&PumpType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&PumpType);
    if (PyModule_AddObject(m, "Pump", (PyObject *)&PumpType) < 0) {
        Py_DECREF(&PumpType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
