/* Client connections of plain listeners in C: accept, read and write on the sockets with no
 * event-loop transport in between. Its pure-Python twin is the event loop's own server
 * (loop.create_server and its transports); both pass tests/wire and the listener tests
 * (wire/__init__.py says which one serves).
 *
 * A Hub owns an epoll descriptor. The event loop watches that one descriptor
 * (loop.add_reader(hub.fileno(), hub.run)); run() serves every ready socket, then returns.
 * Listening sockets are added with listen(fd, factory, backlog): each ready one accepts one
 * connection per run (as nginx does without multi_accept), makes its protocol with factory()
 * and a Conn for it, and calls protocol.connection_made(conn).
 *
 * A Conn is an asyncio.Transport in behaviour (write, writelines, write_eof, close, abort,
 * pause_reading, resume_reading, buffer limits with pause_writing/resume_writing,
 * get_extra_info, set_protocol): a read is one recv() into a scratch buffer and one
 * protocol.data_received(bytes); a write is sent at once, and what the socket did not take
 * waits in the Conn's buffer until the socket is writable again. Level-triggered epoll; a
 * Conn with nothing to wait for is not in the epoll set at all (so a hang-up cannot spin).
 * connection_lost is called once, from the event loop (loop.call_soon), never from inside
 * the call that ended the connection, as asyncio's transports do.
 *
 * What asyncio would hand its exception handler (a protocol callback that raised, an accept
 * that failed for want of descriptors) goes to on_error(message, exception, conn_or_None):
 * a callback that raised ends its connection (connection_lost(exc)); an accept that failed
 * with EMFILE/ENFILE/ENOBUFS/ENOMEM leaves the listener out of the epoll set until
 * resume(listener) (the caller waits a moment first: the loop would spin otherwise).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define SCRATCH (256 * 1024)
#define MAX_EVENTS 128
#define MAX_IOV 64
#define LISTENER_BIT (1ULL << 63)

static char scratch[SCRATCH];

static PyObject *s_connection_made, *s_connection_lost, *s_data_received, *s_eof_received,
    *s_pause_writing, *s_resume_writing, *s_name, *s_default, *s_peername, *s_sockname, *s_high,
    *s_low;

typedef struct Hub Hub;

typedef struct {
    PyObject_HEAD
    Hub *hub;                 /* while open: the hub's slot holds this Conn */
    PyObject *protocol;
    PyObject *peer;           /* peername, made when first asked */
    PyObject *local;          /* sockname, asked of the socket when first asked */
    int fd;                   /* -1 once the connection ended */
    Py_ssize_t slot;
    uint32_t mask;            /* the epoll interest registered; 0: not in the set */
    char *buf;                /* what the socket has not taken yet */
    size_t off, len, cap;
    size_t high, low;
    unsigned reading : 1;     /* the protocol wants data (pause_reading clears it) */
    unsigned peer_eof : 1;    /* the client's end arrived */
    unsigned closing : 1;     /* close(): the connection ends once the buffer is sent */
    unsigned eof_wanted : 1;  /* write_eof(): SHUT_WR once the buffer is sent */
    unsigned eof_sent : 1;
    unsigned paused : 1;      /* pause_writing() was called, resume_writing() not yet */
    unsigned last : 1;        /* in write_last(): sends say MSG_MORE (the FIN follows) */
    socklen_t addrlen;
    struct sockaddr_storage addr;
} Conn;

typedef struct {
    int fd;                   /* -1: the slot is free */
    int active;               /* in the epoll set */
    PyObject *factory;
} listener_t;

struct Hub {
    PyObject_HEAD
    int epfd;
    PyObject *call_soon;
    PyObject *on_error;
    Conn **conns;             /* by slot; NULL: free */
    uint32_t *uses;           /* by slot: connections it has held (stale events are told apart) */
    Py_ssize_t *free;         /* free slots, a stack */
    Py_ssize_t size, nfree, live;
    listener_t *listeners;
    Py_ssize_t nlisteners;
};

static PyTypeObject ConnType;

/* -- reporting ------------------------------------------------------------------------ */

/* The current exception, normalized, with its traceback (a new reference; NULL: none). */
static PyObject *take_exception(void) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL)
        return NULL;
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL && value != NULL)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    return value;
}

/* on_error(message, exc, conn); never raises. */
static void tell(Hub *h, const char *message, PyObject *exc, PyObject *subject) {
    PyObject *res = PyObject_CallFunction(h->on_error, "sOO", message, exc ? exc : Py_None,
                                          subject ? subject : Py_None);
    if (res == NULL)
        PyErr_WriteUnraisable(h->on_error);
    Py_XDECREF(res);
}

/* Hand the current exception to on_error. */
static void report(Hub *h, const char *message, Conn *c) {
    PyObject *exc = take_exception();
    tell(h, message, exc, (PyObject *)c);
    Py_XDECREF(exc);
}

/* -- the epoll interest ---------------------------------------------------------------- */

static uint32_t wanted(Conn *c) {
    uint32_t m = 0;
    if (c->reading && !c->peer_eof && !c->closing)
        m |= EPOLLIN;
    if (c->len)
        m |= EPOLLOUT;
    return m;
}

/* Register what the Conn waits for; -1 with errno when epoll refused. */
static int sync_mask(Conn *c) {
    uint32_t m = wanted(c);
    if (m == c->mask || c->fd < 0)
        return 0;
    struct epoll_event ev = {.events = m};
    ev.data.u64 = ((uint64_t)c->hub->uses[c->slot] << 32) | (uint64_t)c->slot;
    int op = c->mask == 0 ? EPOLL_CTL_ADD : (m == 0 ? EPOLL_CTL_DEL : EPOLL_CTL_MOD);
    if (epoll_ctl(c->hub->epfd, op, c->fd, &ev) < 0)
        return -1;
    c->mask = m;
    return 0;
}

/* -- the end of a connection ------------------------------------------------------------- */

/* Close the socket, free the slot and schedule protocol.connection_lost(exc) (exc: a new
 * reference or NULL for None). The caller holds its own reference to c. */
static void finish(Conn *c, PyObject *exc) {
    Hub *h = c->hub;
    if (c->fd < 0) {
        Py_XDECREF(exc);
        return;
    }
    close(c->fd); /* also leaves the epoll set: the descriptor is never duplicated */
    c->fd = -1;
    c->mask = 0;
    free(c->buf);
    c->buf = NULL;
    c->off = c->len = c->cap = 0;
    h->conns[c->slot] = NULL;
    h->free[h->nfree++] = c->slot;
    h->live--;
    PyObject *protocol = c->protocol;
    c->protocol = NULL;
    if (protocol != NULL) {
        PyObject *lost = PyObject_GetAttr(protocol, s_connection_lost);
        PyObject *res = NULL;
        if (lost != NULL) {
            PyObject *args[] = {lost, exc ? exc : Py_None};
            res = PyObject_Vectorcall(h->call_soon, args, 2, NULL);
        }
        if (res == NULL)
            report(h, "scheduling protocol.connection_lost() failed", c);
        Py_XDECREF(res);
        Py_XDECREF(lost);
        Py_DECREF(protocol);
    }
    Py_XDECREF(exc);
    Py_DECREF(c); /* the slot's reference */
}

/* An OSError for errno, as the connection's end cause. */
static PyObject *os_error(int err) {
    return PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
}

/* The socket failed: the connection ends at once with that error. */
static void fail(Conn *c, int err) {
    finish(c, os_error(err));
}

/* A protocol callback raised: report it, end the connection with that exception. */
static void callback_failed(Conn *c, const char *message) {
    PyObject *exc = take_exception();
    tell(c->hub, message, exc, (PyObject *)c);
    finish(c, exc);
}

/* -- writing ------------------------------------------------------------------------------ */

static int append(Conn *c, const char *data, size_t n) {
    if (c->off && c->off + c->len + n > c->cap) {
        memmove(c->buf, c->buf + c->off, c->len);
        c->off = 0;
    }
    if (c->len + n > c->cap) {
        size_t cap = c->cap ? c->cap : 16384;
        while (cap < c->len + n)
            cap *= 2;
        char *grown = realloc(c->buf, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        c->buf = grown;
        c->cap = cap;
    }
    memcpy(c->buf + c->off + c->len, data, n);
    c->len += n;
    return 0;
}

/* After the buffer grew: pause the protocol's writing above the high-water mark. */
static void maybe_pause(Conn *c) {
    if (c->paused || c->len <= c->high || c->protocol == NULL)
        return;
    c->paused = 1;
    PyObject *res = PyObject_CallMethodNoArgs(c->protocol, s_pause_writing);
    if (res == NULL)
        report(c->hub, "protocol.pause_writing() failed", c);
    Py_XDECREF(res);
}

/* The buffer went out (entirely or below the low-water mark): SHUT_WR or close when asked
 * for, resume the protocol's writing. Called with the socket open. */
static void drained(Conn *c) {
    if (c->len == 0) {
        if (c->closing) {
            finish(c, NULL);
            return;
        }
        if (c->eof_wanted && !c->eof_sent) {
            c->eof_sent = 1;
            shutdown(c->fd, SHUT_WR);
        }
    }
    if (sync_mask(c) < 0) {
        fail(c, errno);
        return;
    }
    if (c->paused && c->len <= c->low && c->protocol != NULL) {
        c->paused = 0;
        PyObject *res = PyObject_CallMethodNoArgs(c->protocol, s_resume_writing);
        if (res == NULL)
            report(c->hub, "protocol.resume_writing() failed", c);
        Py_XDECREF(res);
    }
}

/* The socket is writable: send what waits. */
static void flush(Conn *c) {
    while (c->len) {
        ssize_t n = send(c->fd, c->buf + c->off, c->len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            fail(c, errno);
            return;
        }
        c->off += (size_t)n;
        c->len -= (size_t)n;
    }
    if (c->len == 0)
        c->off = 0;
    drained(c);
}

/* 0, or -1 with a Python exception (asyncio's write raises only for misuse). */
static int check_writable(Conn *c) {
    if (c->eof_wanted) {
        PyErr_SetString(PyExc_RuntimeError, "Cannot call write() after write_eof()");
        return -1;
    }
    return 0;
}

/* Send data[0..n) now if nothing waits; keep what the socket does not take. */
static int send_or_keep(Conn *c, const char *data, size_t n) {
    if (c->len == 0) {
        while (n) {
            ssize_t sent = send(c->fd, data, n, MSG_NOSIGNAL | (c->last ? MSG_MORE : 0));
            if (sent < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    break;
                fail(c, errno);
                return 0;
            }
            data += sent;
            n -= (size_t)sent;
        }
        if (n == 0)
            return 0;
    }
    if (append(c, data, n) < 0)
        return -1;
    if (sync_mask(c) < 0) {
        fail(c, errno);
        return 0;
    }
    maybe_pause(c);
    return 0;
}

static PyObject *Conn_write(Conn *c, PyObject *data) {
    if (check_writable(c) < 0)
        return NULL;
    if (PyBytes_CheckExact(data)) {
        if (c->fd >= 0 && !c->closing && PyBytes_GET_SIZE(data))
            if (send_or_keep(c, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data)) < 0)
                return NULL;
        Py_RETURN_NONE;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
        PyErr_Format(PyExc_TypeError, "data argument must be a bytes-like object, not '%.100s'",
                     Py_TYPE(data)->tp_name);
        return NULL;
    }
    int r = 0;
    if (c->fd >= 0 && !c->closing && view.len)
        r = send_or_keep(c, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Conn_writelines(Conn *c, PyObject *list) {
    if (check_writable(c) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(list, "writelines() takes an iterable of bytes-like objects");
    if (seq == NULL)
        return NULL;
    if (PyList_CheckExact(seq) && PyList_GET_SIZE(seq) > MAX_IOV) {
        /* more than one sendmsg: pause_writing (Python) may run between them and change it */
        Py_SETREF(seq, PyList_AsTuple(seq));
        if (seq == NULL)
            return NULL;
    }
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_buffer views[MAX_IOV];
    struct iovec iov[MAX_IOV];
    Py_ssize_t i = 0;
    int r = 0;
    while (i < count && r == 0) {
        int k = 0;
        size_t total = 0;
        for (; k < MAX_IOV && i + k < count; k++) {
            if (PyObject_GetBuffer(items[i + k], &views[k], PyBUF_SIMPLE) < 0) {
                PyErr_Format(PyExc_TypeError,
                             "data argument must be a bytes-like object, not '%.100s'",
                             Py_TYPE(items[i + k])->tp_name);
                r = -1;
                break;
            }
            iov[k].iov_base = views[k].buf;
            iov[k].iov_len = (size_t)views[k].len;
            total += (size_t)views[k].len;
        }
        if (r == 0 && c->fd >= 0 && !c->closing && total) {
            int first = 0;
            if (c->len == 0) { /* nothing waits: one sendmsg, the rest kept */
                ssize_t sent;
                struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)k};
                int flags = MSG_NOSIGNAL | (c->last && i + k == count ? MSG_MORE : 0);
                do
                    sent = sendmsg(c->fd, &msg, flags);
                while (sent < 0 && errno == EINTR);
                if (sent < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
                    fail(c, errno);
                } else {
                    size_t done = sent < 0 ? 0 : (size_t)sent;
                    for (; first < k && done >= iov[first].iov_len; first++)
                        done -= iov[first].iov_len;
                    if (first < k) {
                        iov[first].iov_base = (char *)iov[first].iov_base + done;
                        iov[first].iov_len -= done;
                    }
                }
            }
            if (c->fd >= 0 && first < k) {
                for (int j = first; j < k && r == 0; j++)
                    r = append(c, iov[j].iov_base, iov[j].iov_len);
                if (r == 0 && sync_mask(c) < 0)
                    fail(c, errno);
                else if (r == 0)
                    maybe_pause(c);
            }
        }
        for (int j = 0; j < k; j++)
            PyBuffer_Release(&views[j]);
        i += k;
    }
    Py_DECREF(seq);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Conn_close(Conn *c, PyObject *Py_UNUSED(ignored));

/* writelines(pieces), then close(): the connection's last bytes. They are sent with
 * MSG_MORE, so the kernel holds them for the FIN that close() adds at once: response and
 * FIN in one segment (one packet, and one wake-up of the client, less per connection). */
static PyObject *Conn_write_last(Conn *c, PyObject *pieces) {
    if (c->fd < 0 || c->closing)
        Py_RETURN_NONE;
    c->last = 1;
    PyObject *r = Conn_writelines(c, pieces);
    c->last = 0;
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    return Conn_close(c, NULL);
}

static PyObject *Conn_write_eof(Conn *c, PyObject *Py_UNUSED(ignored)) {
    if (c->fd < 0 || c->closing || c->eof_wanted)
        Py_RETURN_NONE;
    c->eof_wanted = 1;
    if (c->len == 0) {
        c->eof_sent = 1;
        shutdown(c->fd, SHUT_WR);
    }
    Py_RETURN_NONE;
}

static PyObject *Conn_can_write_eof(Conn *c, PyObject *Py_UNUSED(ignored)) {
    Py_RETURN_TRUE;
}

static PyObject *Conn_close(Conn *c, PyObject *Py_UNUSED(ignored)) {
    if (c->fd < 0 || c->closing)
        Py_RETURN_NONE;
    c->closing = 1;
    if (c->len == 0)
        finish(c, NULL);
    else if (sync_mask(c) < 0) /* reading stops; the buffer still goes out */
        fail(c, errno);
    Py_RETURN_NONE;
}

static PyObject *Conn_abort(Conn *c, PyObject *Py_UNUSED(ignored)) {
    finish(c, NULL);
    Py_RETURN_NONE;
}

static PyObject *Conn_is_closing(Conn *c, PyObject *Py_UNUSED(ignored)) {
    return PyBool_FromLong(c->fd < 0 || c->closing);
}

/* -- reading ------------------------------------------------------------------------------ */

static PyObject *Conn_pause_reading(Conn *c, PyObject *Py_UNUSED(ignored)) {
    if (c->fd >= 0 && c->reading) {
        c->reading = 0;
        if (sync_mask(c) < 0)
            fail(c, errno);
    }
    Py_RETURN_NONE;
}

static PyObject *Conn_resume_reading(Conn *c, PyObject *Py_UNUSED(ignored)) {
    if (c->fd >= 0 && !c->reading) {
        c->reading = 1;
        if (sync_mask(c) < 0)
            fail(c, errno);
    }
    Py_RETURN_NONE;
}

static PyObject *Conn_is_reading(Conn *c, PyObject *Py_UNUSED(ignored)) {
    return PyBool_FromLong(c->fd >= 0 && !c->closing && c->reading && !c->peer_eof);
}

/* The socket is readable (or hung up): one recv, one data_received or eof_received. */
static void readable(Conn *c) {
    ssize_t n;
    do
        n = recv(c->fd, scratch, SCRATCH, 0);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            fail(c, errno);
        return;
    }
    if (n == 0) {
        c->peer_eof = 1;
        if (sync_mask(c) < 0) {
            fail(c, errno);
            return;
        }
        PyObject *keep = PyObject_CallMethodNoArgs(c->protocol, s_eof_received);
        if (keep == NULL) {
            callback_failed(c, "Fatal error: protocol.eof_received() call failed.");
            return;
        }
        int open = PyObject_IsTrue(keep);
        Py_DECREF(keep);
        if (open <= 0 && c->fd >= 0 && !c->closing) {
            PyErr_Clear();
            c->closing = 1;
            if (c->len == 0)
                finish(c, NULL);
        }
        return;
    }
    PyObject *data = PyBytes_FromStringAndSize(scratch, n);
    if (data == NULL) {
        callback_failed(c, "Fatal read error");
        return;
    }
    PyObject *res = PyObject_CallMethodOneArg(c->protocol, s_data_received, data);
    Py_DECREF(data);
    if (res == NULL) {
        callback_failed(c, "Fatal error: protocol.data_received() call failed.");
        return;
    }
    Py_DECREF(res);
}

/* -- the rest of the transport ------------------------------------------------------------ */

static PyObject *Conn_get_write_buffer_size(Conn *c, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromSize_t(c->len);
}

static PyObject *Conn_get_write_buffer_limits(Conn *c, PyObject *Py_UNUSED(ignored)) {
    return Py_BuildValue("(nn)", (Py_ssize_t)c->low, (Py_ssize_t)c->high);
}

/* Positional and keyword arguments of a METH_FASTCALL | METH_KEYWORDS method, into
 * out[0..n) by the names given (missing ones stay as they are); -1 with TypeError. */
static int fast_args(const char *method, PyObject *const *args, Py_ssize_t nargs,
                     PyObject *kwnames, PyObject **names, PyObject **out, Py_ssize_t n) {
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd arguments", method, n);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t i = 0;
        while (i < n && PyUnicode_Compare(key, names[i]) != 0)
            i++;
        if (i == n || i < nargs) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", method,
                         key);
            return -1;
        }
        out[i] = args[nargs + k];
    }
    return 0;
}

/* A limit argument: >= 0 into *out; 1 when None (not given), 0 when set, -1 on error. */
static int limit_arg(PyObject *o, Py_ssize_t *out) {
    if (o == Py_None)
        return 1;
    *out = PyLong_AsSsize_t(o);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

static PyObject *Conn_set_write_buffer_limits(Conn *c, PyObject *const *args, Py_ssize_t nargs,
                                              PyObject *kwnames) {
    PyObject *names[] = {s_high, s_low}, *got[] = {Py_None, Py_None};
    if (fast_args("set_write_buffer_limits", args, nargs, kwnames, names, got, 2) < 0)
        return NULL;
    Py_ssize_t high = 0, low = 0;
    int no_high = limit_arg(got[0], &high), no_low = limit_arg(got[1], &low);
    if (no_high < 0 || no_low < 0)
        return NULL;
    if (no_high) /* asyncio's defaults */
        high = no_low ? 64 * 1024 : 4 * low;
    if (no_low)
        low = high / 4;
    if (!(high >= low && low >= 0)) {
        PyErr_Format(PyExc_ValueError, "high (%zd) must be >= low (%zd) must be >= 0", high, low);
        return NULL;
    }
    c->high = (size_t)high;
    c->low = (size_t)low;
    maybe_pause(c);
    Py_RETURN_NONE;
}

/* "a.b.c.d" into out (16 bytes at least); its length. inet_ntop goes through printf. */
static int ipv4_text(const unsigned char *b, char *out) {
    char *p = out;
    for (int i = 0; i < 4; i++) {
        unsigned v = b[i];
        if (v >= 100) {
            *p++ = (char)('0' + v / 100);
            v %= 100;
            *p++ = (char)('0' + v / 10);
            v %= 10;
        } else if (v >= 10) {
            *p++ = (char)('0' + v / 10);
            v %= 10;
        }
        *p++ = (char)('0' + v);
        if (i < 3)
            *p++ = '.';
    }
    return (int)(p - out);
}

/* A socket address as asyncio gives it: (host, port) for IPv4, (host, port, flowinfo,
 * scope_id) for IPv6, the path for a Unix socket; None for anything else. */
static PyObject *address(const struct sockaddr_storage *a, socklen_t len) {
    char host[INET6_ADDRSTRLEN];
    if (a->ss_family == AF_INET) {
        const struct sockaddr_in *in = (const struct sockaddr_in *)a;
        int n = ipv4_text((const unsigned char *)&in->sin_addr, host);
        PyObject *h = PyUnicode_FromStringAndSize(host, n);
        PyObject *port = h ? PyLong_FromLong(ntohs(in->sin_port)) : NULL;
        PyObject *r = port ? PyTuple_Pack(2, h, port) : NULL;
        Py_XDECREF(h);
        Py_XDECREF(port);
        return r;
    }
    if (a->ss_family == AF_INET6) {
        const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)a;
        inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
        return Py_BuildValue("(siII)", host, ntohs(in6->sin6_port),
                             (unsigned)ntohl(in6->sin6_flowinfo), (unsigned)in6->sin6_scope_id);
    }
    if (a->ss_family == AF_UNIX && len > offsetof(struct sockaddr_un, sun_path)) {
        const struct sockaddr_un *un = (const struct sockaddr_un *)a;
        size_t n = len - offsetof(struct sockaddr_un, sun_path);
        return PyUnicode_DecodeFSDefaultAndSize(un->sun_path, (Py_ssize_t)strnlen(un->sun_path, n));
    }
    Py_RETURN_NONE;
}

static PyObject *Conn_get_extra_info(Conn *c, PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *kwnames) {
    PyObject *names[] = {s_name, s_default}, *got[] = {NULL, Py_None};
    if (fast_args("get_extra_info", args, nargs, kwnames, names, got, 2) < 0)
        return NULL;
    PyObject *name = got[0], *dflt = got[1];
    if (name == NULL || !PyUnicode_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "get_extra_info() needs a name (str)");
        return NULL;
    }
    if (name == s_peername || PyUnicode_Compare(name, s_peername) == 0) {
        if (c->peer == NULL) {
            c->peer = address(&c->addr, c->addrlen);
            if (c->peer == NULL)
                return NULL;
        }
        return Py_NewRef(c->peer == Py_None ? dflt : c->peer);
    }
    if (name == s_sockname || PyUnicode_Compare(name, s_sockname) == 0) {
        if (c->local == NULL) { /* (after the end: known only if asked before) */
            struct sockaddr_storage a;
            socklen_t len = sizeof(a);
            if (c->fd < 0 || getsockname(c->fd, (struct sockaddr *)&a, &len) < 0)
                return Py_NewRef(dflt);
            c->local = address(&a, len);
            if (c->local == NULL)
                return NULL;
        }
        return Py_NewRef(c->local == Py_None ? dflt : c->local);
    }
    return Py_NewRef(dflt); /* no "socket": the descriptor is the hub's alone */
}

static PyObject *Conn_get_protocol(Conn *c, PyObject *Py_UNUSED(ignored)) {
    return Py_NewRef(c->protocol ? c->protocol : Py_None);
}

static PyObject *Conn_set_protocol(Conn *c, PyObject *protocol) {
    if (c->fd < 0) /* ended: connection_lost went to the protocol it had */
        Py_RETURN_NONE;
    Py_XSETREF(c->protocol, Py_NewRef(protocol));
    Py_RETURN_NONE;
}

static PyObject *Conn_fileno(Conn *c, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(c->fd);
}

static PyObject *Conn_repr(Conn *c) {
    return PyUnicode_FromFormat("<wire.Conn fd=%d%s>", c->fd, c->closing ? " closing" : "");
}

static int Conn_traverse(Conn *c, visitproc visit, void *arg) {
    Py_VISIT(c->protocol);
    Py_VISIT(c->peer);
    Py_VISIT(c->local);
    Py_VISIT((PyObject *)c->hub);
    return 0;
}

static int Conn_clear(Conn *c) {
    Py_CLEAR(c->protocol);
    Py_CLEAR(c->peer);
    Py_CLEAR(c->local);
    return 0;
}

static void Conn_dealloc(Conn *c) {
    PyObject_GC_UnTrack(c);
    /* an open Conn is held by its hub's slot, so here it has ended (or never began) */
    if (c->fd >= 0)
        close(c->fd);
    free(c->buf);
    Conn_clear(c);
    Py_CLEAR(c->hub);
    PyObject_GC_Del(c);
}

static PyMethodDef Conn_methods[] = {
    {"write", (PyCFunction)Conn_write, METH_O, NULL},
    {"writelines", (PyCFunction)Conn_writelines, METH_O, NULL},
    {"write_last", (PyCFunction)Conn_write_last, METH_O, NULL},
    {"write_eof", (PyCFunction)Conn_write_eof, METH_NOARGS, NULL},
    {"can_write_eof", (PyCFunction)Conn_can_write_eof, METH_NOARGS, NULL},
    {"close", (PyCFunction)Conn_close, METH_NOARGS, NULL},
    {"abort", (PyCFunction)Conn_abort, METH_NOARGS, NULL},
    {"is_closing", (PyCFunction)Conn_is_closing, METH_NOARGS, NULL},
    {"pause_reading", (PyCFunction)Conn_pause_reading, METH_NOARGS, NULL},
    {"resume_reading", (PyCFunction)Conn_resume_reading, METH_NOARGS, NULL},
    {"is_reading", (PyCFunction)Conn_is_reading, METH_NOARGS, NULL},
    {"get_write_buffer_size", (PyCFunction)Conn_get_write_buffer_size, METH_NOARGS, NULL},
    {"get_write_buffer_limits", (PyCFunction)Conn_get_write_buffer_limits, METH_NOARGS, NULL},
    {"set_write_buffer_limits", (PyCFunction)(void (*)(void))Conn_set_write_buffer_limits,
     METH_FASTCALL | METH_KEYWORDS, NULL},
    {"get_extra_info", (PyCFunction)(void (*)(void))Conn_get_extra_info,
     METH_FASTCALL | METH_KEYWORDS, NULL},
    {"get_protocol", (PyCFunction)Conn_get_protocol, METH_NOARGS, NULL},
    {"set_protocol", (PyCFunction)Conn_set_protocol, METH_O, NULL},
    {"fileno", (PyCFunction)Conn_fileno, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "poise.wire._hub.Conn",
    .tp_basicsize = sizeof(Conn),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)Conn_dealloc,
    .tp_traverse = (traverseproc)Conn_traverse,
    .tp_clear = (inquiry)Conn_clear,
    .tp_repr = (reprfunc)Conn_repr,
    .tp_methods = Conn_methods,
};

/* -- the hub ------------------------------------------------------------------------------ */

static int grow(Hub *h) {
    Py_ssize_t size = h->size ? h->size * 2 : 64;
    Conn **conns = realloc(h->conns, (size_t)size * sizeof(Conn *));
    if (conns == NULL)
        return -1;
    h->conns = conns;
    uint32_t *uses = realloc(h->uses, (size_t)size * sizeof(uint32_t));
    if (uses == NULL)
        return -1;
    h->uses = uses;
    Py_ssize_t *free_ = realloc(h->free, (size_t)size * sizeof(Py_ssize_t));
    if (free_ == NULL)
        return -1;
    h->free = free_;
    for (Py_ssize_t s = size - 1; s >= h->size; s--) {
        conns[s] = NULL;
        uses[s] = 0;
        free_[h->nfree++] = s;
    }
    h->size = size;
    return 0;
}

static void accept_one(Hub *h, Py_ssize_t index) {
    listener_t *l = &h->listeners[index];
    struct sockaddr_storage addr;
    socklen_t addrlen = sizeof(addr);
    int fd = accept4(l->fd, (struct sockaddr *)&addr, &addrlen, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM) {
            /* out of descriptors or memory: leave the set until resume(), or spin */
            epoll_ctl(h->epfd, EPOLL_CTL_DEL, l->fd, NULL);
            l->active = 0;
            PyObject *exc = os_error(err);
            PyObject *which = PyLong_FromSsize_t(index);
            if (exc == NULL || which == NULL)
                PyErr_WriteUnraisable(h->on_error);
            else
                tell(h, "accept() failed", exc, which);
            Py_XDECREF(exc);
            Py_XDECREF(which);
        }
        return; /* EAGAIN (another worker took it), ECONNABORTED, ...: nothing to do */
    }
    if (h->nfree == 0 && grow(h) < 0) {
        close(fd);
        PyErr_NoMemory();
        report(h, "accept() failed", NULL);
        return;
    }
    Conn *c = PyObject_GC_New(Conn, &ConnType);
    if (c == NULL) {
        close(fd);
        report(h, "accept() failed", NULL);
        return;
    }
    c->hub = (Hub *)Py_NewRef((PyObject *)h);
    c->protocol = c->peer = c->local = NULL;
    c->fd = fd;
    c->mask = 0;
    c->buf = NULL;
    c->off = c->len = c->cap = 0;
    c->high = 64 * 1024;
    c->low = 16 * 1024;
    c->reading = 1;
    c->peer_eof = c->closing = c->eof_wanted = c->eof_sent = c->paused = c->last = 0;
    c->addrlen = addrlen;
    memcpy(&c->addr, &addr, addrlen <= sizeof(addr) ? addrlen : sizeof(addr));
    Py_ssize_t slot = h->free[--h->nfree];
    c->slot = slot;
    h->uses[slot]++;
    h->conns[slot] = c; /* the slot's reference: the new one */
    h->live++;
    PyObject_GC_Track(c);
    Py_INCREF(c); /* ours, for the calls below */
    PyObject *factory = Py_NewRef(l->factory);
    c->protocol = PyObject_CallNoArgs(factory);
    Py_DECREF(factory);
    if (c->protocol == NULL) {
        report(h, "the protocol factory failed", NULL);
        finish(c, NULL);
    } else {
        PyObject *res = PyObject_CallMethodOneArg(c->protocol, s_connection_made, (PyObject *)c);
        if (res == NULL)
            callback_failed(c, "Fatal error: protocol.connection_made() call failed.");
        else {
            Py_DECREF(res);
            /* the request is usually there already: read it now, not one round later */
            if (c->fd >= 0 && (wanted(c) & EPOLLIN))
                readable(c);
            if (c->fd >= 0 && sync_mask(c) < 0)
                fail(c, errno);
        }
    }
    Py_DECREF(c);
}

static PyObject *Hub_run(Hub *h, PyObject *Py_UNUSED(ignored)) {
    struct epoll_event events[MAX_EVENTS];
    if (h->epfd < 0)
        Py_RETURN_NONE;
    int n = epoll_wait(h->epfd, events, MAX_EVENTS, 0);
    for (int i = 0; i < n; i++) {
        uint64_t key = events[i].data.u64;
        if (key & LISTENER_BIT) {
            Py_ssize_t index = (Py_ssize_t)(key & ~LISTENER_BIT);
            if (index < h->nlisteners && h->listeners[index].active)
                accept_one(h, index);
            continue;
        }
        Py_ssize_t slot = (Py_ssize_t)(key & 0xffffffffu);
        uint32_t use = (uint32_t)(key >> 32);
        if (slot >= h->size || h->conns[slot] == NULL || h->uses[slot] != use)
            continue; /* ended by an earlier event of this round */
        Conn *c = (Conn *)Py_NewRef((PyObject *)h->conns[slot]);
        uint32_t ev = events[i].events;
        if ((ev & EPOLLOUT) && c->len)
            flush(c);
        if (c->fd >= 0 && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)) && (c->mask & EPOLLIN))
            readable(c);
        else if (c->fd >= 0 && (ev & (EPOLLHUP | EPOLLERR)) && !(ev & EPOLLOUT)) {
            /* hung up with nothing to read or write: the socket's error, else a reset */
            int err = 0;
            socklen_t len = sizeof(err);
            if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err == 0)
                err = ECONNRESET;
            fail(c, err);
        }
        Py_DECREF(c);
    }
    Py_RETURN_NONE;
}

static PyObject *Hub_listen(Hub *h, PyObject *args) {
    int fd, backlog;
    PyObject *factory;
    if (!PyArg_ParseTuple(args, "iOi", &fd, &factory, &backlog))
        return NULL;
    if (h->epfd < 0) {
        PyErr_SetString(PyExc_RuntimeError, "the hub is closed");
        return NULL;
    }
    Py_ssize_t index = 0;
    while (index < h->nlisteners && h->listeners[index].fd >= 0)
        index++;
    if (index == h->nlisteners) { /* a new slot, free until this listener is in place */
        listener_t *grown = realloc(h->listeners, (size_t)(index + 1) * sizeof(listener_t));
        if (grown == NULL)
            return PyErr_NoMemory();
        h->listeners = grown;
        h->listeners[index] = (listener_t){.fd = -1, .active = 0, .factory = NULL};
        h->nlisteners++;
    }
    if (listen(fd, backlog) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    /* accepted sockets inherit TCP_NODELAY from the listening one (Linux), as the loop's
     * transports set it on each (not for a Unix socket: the call fails, nothing to do) */
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = LISTENER_BIT | (uint64_t)index;
    if (epoll_ctl(h->epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    h->listeners[index] = (listener_t){.fd = fd, .active = 1, .factory = Py_NewRef(factory)};
    return PyLong_FromSsize_t(index);
}

static listener_t *listener_arg(Hub *h, PyObject *arg) {
    Py_ssize_t index = PyLong_AsSsize_t(arg);
    if (index == -1 && PyErr_Occurred())
        return NULL;
    if (index < 0 || index >= h->nlisteners || h->listeners[index].fd < 0) {
        PyErr_Format(PyExc_ValueError, "no listener %zd", index);
        return NULL;
    }
    return &h->listeners[index];
}

static PyObject *Hub_unlisten(Hub *h, PyObject *arg) {
    listener_t *l = listener_arg(h, arg);
    if (l == NULL)
        return NULL;
    if (l->active && h->epfd >= 0)
        epoll_ctl(h->epfd, EPOLL_CTL_DEL, l->fd, NULL);
    l->fd = -1;
    l->active = 0;
    Py_CLEAR(l->factory);
    Py_RETURN_NONE;
}

static PyObject *Hub_resume(Hub *h, PyObject *arg) {
    listener_t *l = listener_arg(h, arg);
    if (l == NULL)
        return NULL;
    if (!l->active && h->epfd >= 0) {
        struct epoll_event ev = {.events = EPOLLIN};
        ev.data.u64 = LISTENER_BIT | (uint64_t)(l - h->listeners);
        if (epoll_ctl(h->epfd, EPOLL_CTL_ADD, l->fd, &ev) < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        l->active = 1;
    }
    Py_RETURN_NONE;
}

static PyObject *Hub_fileno(Hub *h, PyObject *Py_UNUSED(ignored)) {
    return PyLong_FromLong(h->epfd);
}

/* End every connection (connection_lost is scheduled for each), forget the listeners (their
 * sockets are the caller's) and close the epoll descriptor. */
static PyObject *Hub_close(Hub *h, PyObject *Py_UNUSED(ignored)) {
    for (Py_ssize_t s = 0; s < h->size; s++) {
        Conn *c = h->conns[s];
        if (c != NULL) {
            Py_INCREF(c);
            finish(c, NULL);
            Py_DECREF(c);
        }
    }
    for (Py_ssize_t i = 0; i < h->nlisteners; i++) {
        h->listeners[i].fd = -1;
        h->listeners[i].active = 0;
        Py_CLEAR(h->listeners[i].factory);
    }
    if (h->epfd >= 0)
        close(h->epfd);
    h->epfd = -1;
    Py_RETURN_NONE;
}

static Py_ssize_t Hub_len(Hub *h) {
    return h->live;
}

static int Hub_init(Hub *h, PyObject *args, PyObject *kw) {
    static char *names[] = {"call_soon", "on_error", NULL};
    PyObject *call_soon, *on_error;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO", names, &call_soon, &on_error))
        return -1;
    if (h->epfd >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "a Hub is made once");
        return -1;
    }
    h->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (h->epfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    h->call_soon = Py_NewRef(call_soon);
    h->on_error = Py_NewRef(on_error);
    return 0;
}

static PyObject *Hub_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    Hub *h = (Hub *)type->tp_alloc(type, 0);
    if (h != NULL)
        h->epfd = -1;
    return (PyObject *)h;
}

static int Hub_traverse(Hub *h, visitproc visit, void *arg) {
    Py_VISIT(h->call_soon);
    Py_VISIT(h->on_error);
    for (Py_ssize_t s = 0; s < h->size; s++)
        Py_VISIT((PyObject *)h->conns[s]);
    for (Py_ssize_t i = 0; i < h->nlisteners; i++)
        Py_VISIT(h->listeners[i].factory);
    return 0;
}

static int Hub_clear_refs(Hub *h) {
    Py_CLEAR(h->call_soon);
    Py_CLEAR(h->on_error);
    for (Py_ssize_t s = 0; s < h->size; s++) {
        Conn *c = h->conns[s];
        if (c != NULL) { /* a cycle being collected: end the connection, no callback */
            h->conns[s] = NULL;
            Py_CLEAR(c->protocol);
            if (c->fd >= 0)
                close(c->fd);
            c->fd = -1;
            Py_DECREF(c);
        }
    }
    h->live = 0;
    for (Py_ssize_t i = 0; i < h->nlisteners; i++)
        Py_CLEAR(h->listeners[i].factory);
    return 0;
}

static void Hub_dealloc(Hub *h) {
    PyObject_GC_UnTrack(h);
    Hub_clear_refs(h);
    if (h->epfd >= 0)
        close(h->epfd);
    free(h->conns);
    free(h->uses);
    free(h->free);
    free(h->listeners);
    Py_TYPE(h)->tp_free((PyObject *)h);
}

static PyMethodDef Hub_methods[] = {
    {"run", (PyCFunction)Hub_run, METH_NOARGS, NULL},
    {"listen", (PyCFunction)Hub_listen, METH_VARARGS, NULL},
    {"unlisten", (PyCFunction)Hub_unlisten, METH_O, NULL},
    {"resume", (PyCFunction)Hub_resume, METH_O, NULL},
    {"fileno", (PyCFunction)Hub_fileno, METH_NOARGS, NULL},
    {"close", (PyCFunction)Hub_close, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods Hub_sequence = {.sq_length = (lenfunc)Hub_len};

static PyTypeObject HubType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "poise.wire._hub.Hub",
    .tp_basicsize = sizeof(Hub),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Hub_new,
    .tp_init = (initproc)Hub_init,
    .tp_dealloc = (destructor)Hub_dealloc,
    .tp_traverse = (traverseproc)Hub_traverse,
    .tp_clear = (inquiry)Hub_clear_refs,
    .tp_as_sequence = &Hub_sequence,
    .tp_methods = Hub_methods,
};

static struct PyModuleDef hub_module = {
    PyModuleDef_HEAD_INIT, "_hub", "Plain listeners' client connections in C (wire/_hub.c).",
    -1, NULL,
};

PyMODINIT_FUNC PyInit__hub(void) {
    if (PyType_Ready(&ConnType) < 0 || PyType_Ready(&HubType) < 0)
        return NULL;
    const char *names[] = {"connection_made", "connection_lost", "data_received",
                           "eof_received", "pause_writing", "resume_writing", "name",
                           "default", "peername", "sockname", "high", "low"};
    PyObject **slots[] = {&s_connection_made, &s_connection_lost, &s_data_received,
                          &s_eof_received, &s_pause_writing, &s_resume_writing, &s_name,
                          &s_default, &s_peername, &s_sockname, &s_high, &s_low};
    for (int i = 0; i < 12; i++)
        if ((*slots[i] = PyUnicode_InternFromString(names[i])) == NULL)
            return NULL;
    PyObject *m = PyModule_Create(&hub_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Hub", (PyObject *)&HubType) < 0 ||
        PyModule_AddObjectRef(m, "Conn", (PyObject *)&ConnType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
