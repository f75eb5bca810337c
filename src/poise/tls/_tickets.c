/* The session ticket key callback of poise's HTTPS listeners, in C (OpenSSL 3).
 *
 * The pure-Python twin is ``tickets._ctypes_install`` (a ctypes callback); both give OpenSSL
 * the same answers and pass the same tests (tests/tls/test_tickets.py runs each). What this
 * one saves is the ctypes round trip: argument conversion, a Python frame per call and four
 * ctypes calls inside it, about 12 µs per ticket issued or accepted on the benchmark box.
 * Python stays the authority on keys: each call asks the listener's ``TicketKeys`` for the
 * key (``encrypting()`` or ``find(name)``), so rotation and the supervisor's secrets work
 * exactly as in the twin; only the cipher and MAC set-up, the IV and the counters are here.
 *
 * No OpenSSL headers or link flags are needed: the few functions are looked up (dlsym) in
 * the library CPython's own ``_ssl`` module is linked with, as the ctypes twin does, so the
 * SSL_CTX pointers handed over come from the same OpenSSL.
 *
 * OpenSSL's ticket callback has no user-data argument, so a listener is told apart by which
 * function OpenSSL calls: SLOTS trampolines, one per slot, each holding one listener's keys.
 * A slot lives exactly as long as the SSL_CTX it was installed on: an ex_data free callback
 * releases it when OpenSSL frees the context (after the last connection that started from
 * it), so a slot is never reused while a connection could still call it. With every slot in
 * use, ``install`` answers False and poise uses the twin.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "_libssl.h"
#include <string.h>

#define SLOTS 64
#define NAME_LEN 16
#define HMAC_LEN 32
#define AES_LEN 32
#define CRYPTO_EX_INDEX_SSL_CTX 1
#define OSSL_PARAM_UTF8_STRING 4
#define OSSL_PARAM_OCTET_STRING 5
#define OSSL_PARAM_UNMODIFIED ((size_t)-1)

typedef struct {
    const char *key;
    unsigned int data_type;
    void *data;
    size_t data_size;
    size_t return_size;
} ossl_param; /* OpenSSL 3's OSSL_PARAM (core.h), a public, stable layout */

typedef int (*ticket_cb)(void *, unsigned char *, unsigned char *, void *, void *, int);
typedef void (*ex_free)(void *, void *, void *, int, long, void *);

static struct {
    int (*set_cb)(void *, ticket_cb);
    int (*encrypt_init)(void *, const void *, void *, const unsigned char *, const unsigned char *);
    int (*decrypt_init)(void *, const void *, void *, const unsigned char *, const unsigned char *);
    int (*mac_set_params)(void *, const ossl_param *);
    int (*rand_bytes)(unsigned char *, int);
    int (*get_ex_new_index)(int, long, void *, void *, void *, ex_free);
    int (*ctx_set_ex_data)(void *, int, void *);
    const void *cipher; /* AES-256-CBC, fetched once */
    int ex_index;
    int ready;
} ossl;

typedef struct {
    PyObject *keys; /* the listener's TicketKeys; NULL: free */
    void *ctx;      /* the SSL_CTX it is installed on */
} slot_t;

static slot_t slots[SLOTS];
static PyObject *on_error;   /* called with the exception when a key lookup fails */
static PyObject *s_encrypting, *s_find, *s_name, *s_hmac, *s_aes;
static PyObject *s_issued, *s_accepted, *s_unknown, *one;
static char digest_name[] = "SHA256";

static int bytes_of(PyObject *key, PyObject *attr, Py_ssize_t size, const unsigned char **out,
                    PyObject **hold) {
    PyObject *v = PyObject_GetAttr(key, attr);
    if (v == NULL)
        return -1;
    if (!PyBytes_Check(v) || PyBytes_GET_SIZE(v) != size) {
        Py_DECREF(v);
        PyErr_Format(PyExc_ValueError, "ticket key field of %zd bytes expected", size);
        return -1;
    }
    *out = (const unsigned char *)PyBytes_AS_STRING(v);
    *hold = v; /* the key object keeps the bytes alive too; released by the caller */
    return 0;
}

static int bump(PyObject *keys, PyObject *attr) {
    PyObject *v = PyObject_GetAttr(keys, attr);
    if (v == NULL)
        return -1;
    PyObject *n = PyNumber_Add(v, one);
    Py_DECREF(v);
    if (n == NULL)
        return -1;
    int rc = PyObject_SetAttr(keys, attr, n);
    Py_DECREF(n);
    return rc;
}

static int mac_init(void *hctx, const unsigned char *hmac_key) {
    ossl_param params[3] = {
        {"key", OSSL_PARAM_OCTET_STRING, (void *)hmac_key, HMAC_LEN, OSSL_PARAM_UNMODIFIED},
        {"digest", OSSL_PARAM_UTF8_STRING, digest_name, sizeof(digest_name) - 1,
         OSSL_PARAM_UNMODIFIED},
        {NULL, 0, NULL, 0, 0},
    };
    return ossl.mac_set_params(hctx, params);
}

/* Same answers as the twin: enc 1 (a ticket) or 0 (no key, or the lookup failed: none
 * issued); dec 2 (accepted, and a fresh ticket issued: TLS 1.3 tickets are for one use), 0
 * (unknown key, or the lookup failed: a full handshake); -1 when OpenSSL's own cipher or
 * MAC set-up fails (the handshake fails, as it would with OpenSSL's own keys). */
static int ticket(int slot, unsigned char *key_name, unsigned char *iv, void *cctx, void *hctx,
                  int enc) {
    PyGILState_STATE gil = PyGILState_Ensure();
    PyObject *keys = slots[slot].keys;
    PyObject *key = NULL, *found = NULL, *name = NULL, *hmac = NULL, *aes = NULL;
    const unsigned char *hmac_p, *aes_p, *name_p;
    int rc = -1;
    if (keys == NULL) { /* cannot happen while the SSL_CTX lives; no ticket then */
        rc = 0;
        goto done;
    }
    Py_INCREF(keys);
    if (enc) {
        key = PyObject_CallMethodNoArgs(keys, s_encrypting);
        if (key == NULL)
            goto failed;
        if (key == Py_None) {
            rc = 0;
            goto done;
        }
        if (bytes_of(key, s_name, NAME_LEN, &name_p, &name) < 0 ||
            bytes_of(key, s_hmac, HMAC_LEN, &hmac_p, &hmac) < 0 ||
            bytes_of(key, s_aes, AES_LEN, &aes_p, &aes) < 0)
            goto failed;
        if (ossl.rand_bytes(iv, 16) != 1)
            goto done;
        memcpy(key_name, name_p, NAME_LEN);
        if (ossl.encrypt_init(cctx, ossl.cipher, NULL, aes_p, iv) != 1 ||
            mac_init(hctx, hmac_p) != 1)
            goto done;
        if (bump(keys, s_issued) < 0)
            goto failed;
        rc = 1;
        goto done;
    }
    name = PyBytes_FromStringAndSize((const char *)key_name, NAME_LEN);
    if (name == NULL)
        goto failed;
    found = PyObject_CallMethodOneArg(keys, s_find, name);
    if (found == NULL)
        goto failed;
    if (found == Py_None) {
        if (bump(keys, s_unknown) < 0)
            goto failed;
        rc = 0;
        goto done;
    }
    if (!PyTuple_Check(found) || PyTuple_GET_SIZE(found) < 1) {
        PyErr_SetString(PyExc_TypeError, "TicketKeys.find: (key, current) expected");
        goto failed;
    }
    key = PyTuple_GET_ITEM(found, 0);
    Py_INCREF(key);
    if (bytes_of(key, s_hmac, HMAC_LEN, &hmac_p, &hmac) < 0 ||
        bytes_of(key, s_aes, AES_LEN, &aes_p, &aes) < 0)
        goto failed;
    if (ossl.decrypt_init(cctx, ossl.cipher, NULL, aes_p, iv) != 1 || mac_init(hctx, hmac_p) != 1)
        goto done;
    if (bump(keys, s_accepted) < 0)
        goto failed;
    rc = 2;
    goto done;
failed: /* a broken key lookup costs the ticket (a full handshake, or no new ticket) */
    rc = 0;
    if (on_error != NULL) {
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyErr_NormalizeException(&type, &exc, &tb);
        if (exc != NULL && tb != NULL)
            PyException_SetTraceback(exc, tb);
        PyObject *r = PyObject_CallOneArg(on_error, exc ? exc : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(exc);
        Py_XDECREF(tb);
        if (r == NULL)
            PyErr_WriteUnraisable(on_error);
        Py_XDECREF(r);
    } else {
        PyErr_WriteUnraisable(keys);
    }
done:
    Py_XDECREF(key);
    Py_XDECREF(found);
    Py_XDECREF(name);
    Py_XDECREF(hmac);
    Py_XDECREF(aes);
    Py_XDECREF(keys);
    PyGILState_Release(gil);
    return rc;
}

#define TRAMPOLINE(n)                                                                        \
    static int cb_##n(void *s, unsigned char *k, unsigned char *iv, void *c, void *h, int e) { \
        (void)s;                                                                             \
        return ticket(n, k, iv, c, h, e);                                                    \
    }
TRAMPOLINE(0) TRAMPOLINE(1) TRAMPOLINE(2) TRAMPOLINE(3) TRAMPOLINE(4) TRAMPOLINE(5) TRAMPOLINE(6) TRAMPOLINE(7)
TRAMPOLINE(8) TRAMPOLINE(9) TRAMPOLINE(10) TRAMPOLINE(11) TRAMPOLINE(12) TRAMPOLINE(13) TRAMPOLINE(14) TRAMPOLINE(15)
TRAMPOLINE(16) TRAMPOLINE(17) TRAMPOLINE(18) TRAMPOLINE(19) TRAMPOLINE(20) TRAMPOLINE(21) TRAMPOLINE(22) TRAMPOLINE(23)
TRAMPOLINE(24) TRAMPOLINE(25) TRAMPOLINE(26) TRAMPOLINE(27) TRAMPOLINE(28) TRAMPOLINE(29) TRAMPOLINE(30) TRAMPOLINE(31)
TRAMPOLINE(32) TRAMPOLINE(33) TRAMPOLINE(34) TRAMPOLINE(35) TRAMPOLINE(36) TRAMPOLINE(37) TRAMPOLINE(38) TRAMPOLINE(39)
TRAMPOLINE(40) TRAMPOLINE(41) TRAMPOLINE(42) TRAMPOLINE(43) TRAMPOLINE(44) TRAMPOLINE(45) TRAMPOLINE(46) TRAMPOLINE(47)
TRAMPOLINE(48) TRAMPOLINE(49) TRAMPOLINE(50) TRAMPOLINE(51) TRAMPOLINE(52) TRAMPOLINE(53) TRAMPOLINE(54) TRAMPOLINE(55)
TRAMPOLINE(56) TRAMPOLINE(57) TRAMPOLINE(58) TRAMPOLINE(59) TRAMPOLINE(60) TRAMPOLINE(61) TRAMPOLINE(62) TRAMPOLINE(63)
static const ticket_cb trampolines[SLOTS] = {
    cb_0, cb_1, cb_2, cb_3, cb_4, cb_5, cb_6, cb_7,
    cb_8, cb_9, cb_10, cb_11, cb_12, cb_13, cb_14, cb_15,
    cb_16, cb_17, cb_18, cb_19, cb_20, cb_21, cb_22, cb_23,
    cb_24, cb_25, cb_26, cb_27, cb_28, cb_29, cb_30, cb_31,
    cb_32, cb_33, cb_34, cb_35, cb_36, cb_37, cb_38, cb_39,
    cb_40, cb_41, cb_42, cb_43, cb_44, cb_45, cb_46, cb_47,
    cb_48, cb_49, cb_50, cb_51, cb_52, cb_53, cb_54, cb_55,
    cb_56, cb_57, cb_58, cb_59, cb_60, cb_61, cb_62, cb_63,
};

/* OpenSSL frees an SSL_CTX (no connection refers to it any more): its slot is free again */
static void release(void *parent, void *ptr, void *ad, int idx, long argl, void *argp) {
    (void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
    if (ptr == NULL)
        return;
    int slot = (int)((Py_intptr_t)ptr - 1);
    if (slot < 0 || slot >= SLOTS)
        return;
    if (!Py_IsInitialized()) { /* interpreter gone: nothing to give back */
        slots[slot].keys = NULL;
        return;
    }
    PyGILState_STATE gil = PyGILState_Ensure();
    Py_CLEAR(slots[slot].keys);
    slots[slot].ctx = NULL;
    PyGILState_Release(gil);
}

static PyObject *setup(PyObject *self, PyObject *args) {
    (void)self;
    const char *path;
    PyObject *report;
    if (!PyArg_ParseTuple(args, "zO", &path, &report))
        return NULL;
    Py_XINCREF(report);
    Py_XSETREF(on_error, report == Py_None ? NULL : report);
    if (ossl.ready)
        Py_RETURN_TRUE;
    LIBSSL_OPEN(lib, path)
#define FIND(field, symbol) LIBSSL_FIND(lib, ossl.field, symbol)
    FIND(set_cb, "SSL_CTX_set_tlsext_ticket_key_evp_cb")
    FIND(encrypt_init, "EVP_EncryptInit_ex")
    FIND(decrypt_init, "EVP_DecryptInit_ex")
    FIND(mac_set_params, "EVP_MAC_CTX_set_params")
    FIND(rand_bytes, "RAND_bytes")
    FIND(get_ex_new_index, "CRYPTO_get_ex_new_index")
    FIND(ctx_set_ex_data, "SSL_CTX_set_ex_data")
    const void *(*fetch)(void *, const char *, const char *);
    *(void **)&fetch = dlsym(lib, "EVP_CIPHER_fetch");
    if (fetch == NULL)
        return PyUnicode_FromString("EVP_CIPHER_fetch not found");
#undef FIND
    ossl.cipher = fetch(NULL, "AES-256-CBC", NULL);
    if (ossl.cipher == NULL)
        return PyUnicode_FromString("AES-256-CBC is not available");
    ossl.ex_index = ossl.get_ex_new_index(CRYPTO_EX_INDEX_SSL_CTX, 0, NULL, NULL, NULL, release);
    if (ossl.ex_index < 0)
        return PyUnicode_FromString("no SSL_CTX ex_data index");
    ossl.ready = 1;
    Py_RETURN_TRUE;
}

static PyObject *install(PyObject *self, PyObject *args) {
    (void)self;
    unsigned long long ptr;
    PyObject *keys;
    if (!PyArg_ParseTuple(args, "KO", &ptr, &keys))
        return NULL;
    if (!ossl.ready) {
        PyErr_SetString(PyExc_RuntimeError, "_tickets.setup has not succeeded");
        return NULL;
    }
    void *ctx = (void *)(Py_uintptr_t)ptr;
    for (int i = 0; i < SLOTS; i++) {
        if (slots[i].ctx == ctx && slots[i].keys != NULL) { /* installed again: new keys */
            Py_INCREF(keys);
            Py_SETREF(slots[i].keys, keys);
            Py_RETURN_TRUE;
        }
    }
    for (int i = 0; i < SLOTS; i++) {
        if (slots[i].keys != NULL)
            continue;
        if (!ossl.ctx_set_ex_data(ctx, ossl.ex_index, (void *)(Py_intptr_t)(i + 1)))
            Py_RETURN_FALSE;
        if (!ossl.set_cb(ctx, trampolines[i])) {
            ossl.ctx_set_ex_data(ctx, ossl.ex_index, NULL);
            Py_RETURN_FALSE;
        }
        Py_INCREF(keys);
        slots[i].keys = keys;
        slots[i].ctx = ctx;
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE; /* every slot in use */
}

static PyObject *in_use(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    int n = 0;
    for (int i = 0; i < SLOTS; i++)
        n += slots[i].keys != NULL;
    return PyLong_FromLong(n);
}

static PyMethodDef methods[] = {
    {"setup", setup, METH_VARARGS,
     "setup(library_path, on_error) -> True, or why the callback cannot be had (str)"},
    {"install", install, METH_VARARGS,
     "install(ssl_ctx_pointer, ticket_keys) -> bool: False when no slot is free"},
    {"in_use", in_use, METH_NOARGS, "in_use() -> slots holding a listener's keys"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "poise.tls._tickets",
    "The TLS session ticket key callback in C (see tickets.py for the twin).", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__tickets(void) {
#define INTERN(var, text)                                                                    \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                    \
        return NULL;
    INTERN(s_encrypting, "encrypting")
    INTERN(s_find, "find")
    INTERN(s_name, "name")
    INTERN(s_hmac, "hmac")
    INTERN(s_aes, "aes")
    INTERN(s_issued, "issued")
    INTERN(s_accepted, "accepted")
    INTERN(s_unknown, "unknown")
#undef INTERN
    if ((one = PyLong_FromLong(1)) == NULL)
        return NULL;
    return PyModule_Create(&module);
}
