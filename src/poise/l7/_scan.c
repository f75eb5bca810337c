/* The native twin of src/poise/l7/scan.py: one pass over a plain HTTP/1.1 head.
 *
 * scan_request(data, max_target, max_headers, max_header_bytes, max_body, drop)
 * scan_response(data)
 *
 * Both answer None ("not plain: take the general path", which parses with httptools and
 * decides, rejections included) or a small tuple; scan.py documents what each takes and
 * returns, and tests/l7/test_scan.py checks that this file and scan.py agree on every input
 * and that the general path agrees with both.
 *
 * Safety: every index is checked against the length before it is read, or is known to be in
 * bounds because the byte that stops a loop (CR) is excluded from every table the loop
 * reads; no length arithmetic can overflow (heads are bounded by max_header_bytes, or by
 * RESPONSE_MAX). tests/l7/test_scan_asan.py builds this file with AddressSanitizer and
 * UBSan and runs the differential corpus through it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define RUNS_LOCAL 64          /* runs kept on the stack; more (a long head) go on the heap */
#define RESPONSE_MAX 65536     /* a longer response head is left to the general path */

static unsigned char TCHAR[256];  /* token (RFC 9110 §5.6.2) */
static unsigned char VALUE[256];  /* field-value bytes: HTAB, SP, VCHAR, obs-text (no DEL) */
static unsigned char TARGET[256]; /* request-target bytes llhttp takes, less '#' and '\' */
static unsigned char REGNAME[256]; /* Host reg-name (as http.HOST_RE) */
static unsigned char HEXC[256];    /* [0-9A-Fa-f:.] inside an IP literal */
static unsigned char LOWER[256];   /* ASCII lower case */

static PyObject *METHODS[7];
static const char *const METHOD_NAMES[7] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS",
                                            "PATCH"};

static void
init_tables(void)
{
    const char *tchar = "!#$%&'*+-.^_`|~";
    const char *reg = "._~!$&'()*+;=%-";
    for (int c = 0; c < 256; c++) {
        int alnum = (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
        TCHAR[c] = (unsigned char)(alnum || (c && strchr(tchar, c) != NULL));
        VALUE[c] = (unsigned char)(c == '\t' || (c >= 0x20 && c <= 0x7e) || c >= 0x80);
        TARGET[c] = (unsigned char)(c >= 0x21 && c <= 0x7e && c != '#' && c != '\\');
        REGNAME[c] = (unsigned char)(alnum || (c && strchr(reg, c) != NULL));
        HEXC[c] = (unsigned char)((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') ||
                                  (c >= 'A' && c <= 'F') || c == ':' || c == '.');
        LOWER[c] = (unsigned char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
}

/* s[0:n] equals the lower-case literal lit, ASCII letters in either case. */
static int
ieq(const unsigned char *s, Py_ssize_t n, const char *lit, Py_ssize_t litn)
{
    if (n != litn)
        return 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        if (LOWER[s[k]] != (unsigned char)lit[k])
            return 0;
    }
    return 1;
}

#define IEQ(s, n, lit) ieq((s), (n), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* The Host value matches http.HOST_RE:
 * (?:[A-Za-z0-9._~!$&'()*+;=%-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{0,5})? */
static int
host_ok(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t p = 0, q;
    if (n > 0 && s[0] == '[') {
        p = 1;
        while (p < n && HEXC[s[p]])
            p++;
        if (p == 1 || p >= n || s[p] != ']')
            return 0;
        p++;
    } else {
        while (p < n && REGNAME[s[p]])
            p++;
        if (p == 0)
            return 0;
    }
    if (p == n)
        return 1;
    if (s[p] != ':')
        return 0;
    q = ++p;
    while (p < n && s[p] >= '0' && s[p] <= '9')
        p++;
    return p == n && p - q <= 5;
}

/* The pieces of a head that are copied, in order: [start, end) byte ranges. */
typedef struct {
    Py_ssize_t *start, *end;
    Py_ssize_t count, cap;
    Py_ssize_t size;
    Py_ssize_t local_start[RUNS_LOCAL], local_end[RUNS_LOCAL];
} Runs;

/* Room for the runs of an n-byte head: every run is at least 4 bytes ("\r\nX:" or "X: y"
 * plus its CRLF), so n / 4 + 2 always suffice. 0 (MemoryError set) when out of memory. */
static int
runs_init(Runs *r, Py_ssize_t n)
{
    r->count = 0;
    r->size = 0;
    r->cap = n / 4 + 2;
    if (r->cap <= RUNS_LOCAL) {
        r->start = r->local_start;
        r->end = r->local_end;
        return 1;
    }
    r->start = PyMem_New(Py_ssize_t, (size_t)r->cap);
    r->end = PyMem_New(Py_ssize_t, (size_t)r->cap);
    if (r->start == NULL || r->end == NULL) {
        PyMem_Free(r->start);
        PyMem_Free(r->end);
        PyErr_NoMemory();
        return 0;
    }
    return 1;
}

static void
runs_free(Runs *r)
{
    if (r->start != r->local_start) {
        PyMem_Free(r->start);
        PyMem_Free(r->end);
    }
}

/* Add s[a:b] to the runs (merged with the last one when contiguous). */
static void
runs_add(Runs *r, Py_ssize_t a, Py_ssize_t b)
{
    if (r->count > 0 && r->end[r->count - 1] == a) {
        r->end[r->count - 1] = b;
    } else {
        assert(r->count < r->cap);
        r->start[r->count] = a;
        r->end[r->count] = b;
        r->count++;
    }
    r->size += b - a;
}

static PyObject *
runs_join(const Runs *r, const unsigned char *s)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, r->size);
    if (out == NULL)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    for (Py_ssize_t k = 0; k < r->count; k++) {
        Py_ssize_t len = r->end[k] - r->start[k];
        memcpy(p, s + r->start[k], (size_t)len);
        p += len;
    }
    return out;
}

static int
as_size(PyObject *o, Py_ssize_t *out)
{
    Py_ssize_t v = PyLong_AsSsize_t(o);
    if (v == -1 && PyErr_Occurred())
        return 0;
    *out = v;
    return 1;
}

/* The request scan proper: s[0:n] ends with the empty line, runs has room for its fields. */
static PyObject *
request_fields(const unsigned char *s, Py_ssize_t n, Py_ssize_t all, Py_ssize_t max_target,
               Py_ssize_t max_headers, long long max_body, PyObject *drop, Runs *runs)
{
    Py_ssize_t ndrop = PyTuple_GET_SIZE(drop);
    Py_ssize_t i = 0;
    while (s[i] >= 'A' && s[i] <= 'Z')
        i++;
    if (s[i] != ' ')
        Py_RETURN_NONE;
    PyObject *method = NULL;
    for (int m = 0; m < 7; m++) {
        const char *name = METHOD_NAMES[m];
        if ((Py_ssize_t)strlen(name) == i && memcmp(s, name, (size_t)i) == 0) {
            method = METHODS[m];
            break;
        }
    }
    if (method == NULL)
        Py_RETURN_NONE;
    Py_ssize_t t0 = ++i;
    if (s[i] != '/')
        Py_RETURN_NONE;
    while (TARGET[s[i]])
        i++;
    Py_ssize_t t1 = i;
    if (t1 - t0 > max_target || n - i < 11 || memcmp(s + i, " HTTP/1.1\r\n", 11) != 0)
        Py_RETURN_NONE;
    i += 11;

    Py_ssize_t h0 = -1, h1 = -1, c0 = -1, c1 = -1, fields = 0;
    int keep = 1;
    for (;;) {
        if (s[i] == '\r') {
            if (s[i + 1] == '\n' && i + 2 == n)
                break;
            Py_RETURN_NONE;
        }
        Py_ssize_t ns = i;
        while (TCHAR[s[i]])
            i++;
        Py_ssize_t ne = i;
        /* "Name: value": one space after the colon, no other whitespace around the value,
         * so the field is forwarded as it came (the general path rebuilds it so) */
        if (ne == ns || s[i] != ':' || s[i + 1] != ' ')
            Py_RETURN_NONE;
        i += 2;
        Py_ssize_t vs = i;
        if (s[i] == ' ' || s[i] == '\t')
            Py_RETURN_NONE;
        while (VALUE[s[i]])
            i++;
        Py_ssize_t ve = i;
        if (ve == vs || s[i] != '\r' || s[i + 1] != '\n' || s[ve - 1] == ' ' || s[ve - 1] == '\t')
            Py_RETURN_NONE;
        i += 2;
        if (++fields > max_headers)
            Py_RETURN_NONE;
        const unsigned char *name = s + ns;
        Py_ssize_t len = ne - ns;
        if (IEQ(name, len, "host")) {
            if (h0 >= 0 || !host_ok(s + vs, ve - vs))
                Py_RETURN_NONE;
            h0 = vs;
            h1 = ve;
            continue;
        }
        if (IEQ(name, len, "connection")) {
            if (IEQ(s + vs, ve - vs, "close"))
                keep = 0;
            else if (!IEQ(s + vs, ve - vs, "keep-alive"))
                Py_RETURN_NONE;
            continue;
        }
        if (IEQ(name, len, "content-length")) {
            if (c0 >= 0 || ve - vs > 18)
                Py_RETURN_NONE; /* a second one, or too long: the general path decides */
            for (Py_ssize_t k = vs; k < ve; k++) {
                if (s[k] < '0' || s[k] > '9')
                    Py_RETURN_NONE;
            }
            c0 = vs;
            c1 = ve;
            continue;
        }
        if (IEQ(name, len, "transfer-encoding") ||
            IEQ(name, len, "x-forwarded-for") || IEQ(name, len, "x-forwarded-proto") ||
            IEQ(name, len, "x-forwarded-host") || IEQ(name, len, "forwarded"))
            Py_RETURN_NONE; /* chunked, or forwarding fields to judge */
        if (IEQ(name, len, "keep-alive") || IEQ(name, len, "proxy-connection") ||
            IEQ(name, len, "te") || IEQ(name, len, "trailer") || IEQ(name, len, "upgrade") ||
            IEQ(name, len, "proxy-authorization") || memchr(name, '_', (size_t)len) != NULL)
            continue; /* hop-by-hop, or a name with "_": dropped */
        int dropped = 0;
        for (Py_ssize_t d = 0; d < ndrop && !dropped; d++) {
            PyObject *item = PyTuple_GET_ITEM(drop, d);
            dropped = ieq(name, len, PyBytes_AS_STRING(item), PyBytes_GET_SIZE(item));
        }
        if (!dropped)
            runs_add(runs, ns, i);
    }
    if (h0 < 0)
        Py_RETURN_NONE;
    PyObject *length = Py_None;
    if (c0 >= 0) {
        long long cl = 0;
        for (Py_ssize_t k = c0; k < c1; k++)
            cl = cl * 10 + (s[k] - '0'); /* at most 18 digits: no overflow */
        /* over limits.max_body_size: the general path answers 413; bytes beyond the body
         * in this read (a pipelined request): the general path parses them */
        if ((max_body > 0 && cl > max_body) || (long long)(all - n) > cl)
            Py_RETURN_NONE;
    } else if (all != n) {
        Py_RETURN_NONE; /* a bodiless request and more bytes: pipelined, parsed */
    }

    PyObject *target = PyBytes_FromStringAndSize((const char *)s + t0, t1 - t0);
    PyObject *host = PyBytes_FromStringAndSize((const char *)s + h0, h1 - h0);
    PyObject *block = runs_join(runs, s);
    if (c0 >= 0)
        length = PyBytes_FromStringAndSize((const char *)s + c0, c1 - c0);
    else
        Py_INCREF(length);
    PyObject *end = PyLong_FromSsize_t(n);
    PyObject *out = PyTuple_New(7);
    if (target == NULL || host == NULL || block == NULL || length == NULL || end == NULL ||
        out == NULL) {
        Py_XDECREF(target);
        Py_XDECREF(host);
        Py_XDECREF(block);
        Py_XDECREF(length);
        Py_XDECREF(end);
        Py_XDECREF(out);
        return NULL;
    }
    Py_INCREF(method);
    PyTuple_SET_ITEM(out, 0, method);
    PyTuple_SET_ITEM(out, 1, target);
    PyTuple_SET_ITEM(out, 2, host);
    PyTuple_SET_ITEM(out, 3, block);
    PyTuple_SET_ITEM(out, 4, PyBool_FromLong(keep));
    PyTuple_SET_ITEM(out, 5, length);
    PyTuple_SET_ITEM(out, 6, end);
    return out;
}

static PyObject *
scan_request(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    Py_ssize_t max_target, max_headers, max_header_bytes, max_body;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "scan_request() takes 6 arguments");
        return NULL;
    }
    PyObject *data = args[0], *drop = args[5];
    if (!PyBytes_CheckExact(data) || !PyTuple_CheckExact(drop)) {
        PyErr_SetString(PyExc_TypeError, "scan_request(bytes, int, int, int, int, tuple)");
        return NULL;
    }
    if (!as_size(args[1], &max_target) || !as_size(args[2], &max_headers) ||
        !as_size(args[3], &max_header_bytes) || !as_size(args[4], &max_body))
        return NULL;
    for (Py_ssize_t d = 0; d < PyTuple_GET_SIZE(drop); d++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(drop, d))) {
            PyErr_SetString(PyExc_TypeError, "scan_request(): drop must hold bytes");
            return NULL;
        }
    }
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t all = PyBytes_GET_SIZE(data);
    /* the head is s[0:n], up to its first empty line: its last four bytes are "\r\n\r\n",
     * so every loop over it stops (at a CR, which no table holds) before its end */
    Py_ssize_t n = -1;
    const unsigned char *p = s, *stop = s + (all < max_header_bytes ? all : max_header_bytes);
    if (all <= max_header_bytes && all >= 4 && memcmp(s + all - 4, "\r\n\r\n", 4) == 0) {
        /* the usual read: one bodiless head (an earlier empty line makes the scan answer
         * None: the general path parses a pipelined request) */
        n = all;
        p = stop;
    }
    while (stop - p >= 4) { /* from CR to CR (memchr), not byte by byte */
        const unsigned char *cr = memchr(p, '\r', (size_t)(stop - p - 3));
        if (cr == NULL)
            break;
        if (cr[1] == '\n' && cr[2] == '\r' && cr[3] == '\n') {
            n = cr - s + 4;
            break;
        }
        p = cr + 1;
    }
    if (n < 18)
        Py_RETURN_NONE; /* not all here, longer than max_header_bytes, or too short */
    Runs runs;
    if (!runs_init(&runs, n))
        return NULL;
    PyObject *out =
        request_fields(s, n, all, max_target, max_headers, (long long)max_body, drop, &runs);
    runs_free(&runs);
    return out;
}

/* The response scan proper: s[0:n] starts with a status line, runs has room for its fields. */
static PyObject *
response_fields(const unsigned char *s, Py_ssize_t n, Runs *runs)
{
    if (n < 17 || memcmp(s, "HTTP/1.1 ", 9) != 0)
        Py_RETURN_NONE;
    for (int k = 9; k < 12; k++) {
        if (s[k] < '0' || s[k] > '9')
            Py_RETURN_NONE;
    }
    long status = (s[9] - '0') * 100 + (s[10] - '0') * 10 + (s[11] - '0');
    if (status < 200 || status >= 500 || status == 204 || status == 304 || s[12] != ' ')
        Py_RETURN_NONE;
    Py_ssize_t i = 13;
    while (i < n && VALUE[s[i]])
        i++;
    if (i + 1 >= n || s[i] != '\r' || s[i + 1] != '\n')
        Py_RETURN_NONE;
    runs_add(runs, 0, i);
    i += 2;
    long long length = -1;
    int keep = 1;
    for (;;) {
        if (i + 1 >= n)
            Py_RETURN_NONE; /* not all here */
        if (s[i] == '\r') {
            if (s[i + 1] != '\n')
                Py_RETURN_NONE;
            i += 2;
            break;
        }
        Py_ssize_t ns = i;
        while (i < n && TCHAR[s[i]])
            i++;
        Py_ssize_t ne = i;
        if (i >= n || ne == ns || s[i] != ':')
            Py_RETURN_NONE;
        i++;
        Py_ssize_t vs = i;
        while (i < n && VALUE[s[i]])
            i++;
        if (i + 1 >= n || s[i] != '\r' || s[i + 1] != '\n')
            Py_RETURN_NONE;
        Py_ssize_t ve = i, line_end = i;
        while (vs < ve && (s[vs] == ' ' || s[vs] == '\t'))
            vs++;
        while (ve > vs && (s[ve - 1] == ' ' || s[ve - 1] == '\t'))
            ve--;
        i += 2;
        const unsigned char *name = s + ns;
        Py_ssize_t len = ne - ns;
        if (IEQ(name, len, "content-length")) {
            if (length >= 0 || ve == vs || ve - vs > 18)
                Py_RETURN_NONE;
            length = 0;
            for (Py_ssize_t k = vs; k < ve; k++) {
                if (s[k] < '0' || s[k] > '9')
                    Py_RETURN_NONE;
                length = length * 10 + (s[k] - '0');
            }
        } else if (IEQ(name, len, "connection")) {
            if (IEQ(s + vs, ve - vs, "close"))
                keep = 0;
            else if (!IEQ(s + vs, ve - vs, "keep-alive"))
                Py_RETURN_NONE;
            continue; /* dropped */
        } else if (IEQ(name, len, "transfer-encoding")) {
            Py_RETURN_NONE;
        } else if (IEQ(name, len, "keep-alive") || IEQ(name, len, "proxy-connection") ||
                   IEQ(name, len, "trailer") || IEQ(name, len, "upgrade") ||
                   IEQ(name, len, "proxy-authenticate")) {
            continue; /* hop-by-hop: dropped */
        }
        runs_add(runs, ns - 2, line_end); /* "\r\n" + the field line, as it came */
    }
    if (length < 0)
        Py_RETURN_NONE;
    PyObject *rewritten = runs_join(runs, s);
    if (rewritten == NULL)
        return NULL;
    return Py_BuildValue("(lNLnO)", status, rewritten, length, i, keep ? Py_True : Py_False);
}

static PyObject *
scan_response(PyObject *module, PyObject *data)
{
    (void)module;
    if (!PyBytes_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "scan_response(bytes)");
        return NULL;
    }
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(data);
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (n > RESPONSE_MAX)
        n = RESPONSE_MAX; /* the head must end within this much */
    Runs runs;
    if (!runs_init(&runs, n))
        return NULL;
    PyObject *out = response_fields(s, n, &runs);
    runs_free(&runs);
    return out;
}

static PyMethodDef scan_methods[] = {
    {"scan_request", (PyCFunction)(void (*)(void))scan_request, METH_FASTCALL,
     "A plain HTTP/1.1 request head: (method, target, host, fields, keep_alive, "
     "content_length, end), or None."},
    {"scan_response", scan_response, METH_O,
     "A plain HTTP/1.1 response head: (status, rewritten, length, end, keep_alive), or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef scan_module = {
    PyModuleDef_HEAD_INIT, "poise.l7._scan", "The native twin of poise.l7.scan.", -1,
    scan_methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__scan(void)
{
    init_tables();
    for (int m = 0; m < 7; m++) {
        if (METHODS[m] == NULL) {
            METHODS[m] = PyBytes_FromString(METHOD_NAMES[m]);
            if (METHODS[m] == NULL)
                return NULL;
        }
    }
    return PyModule_Create(&scan_module);
}
