/* Finding OpenSSL's functions at run time, for poise's C modules that call OpenSSL
 * (_tickets.c, _engine.c): no OpenSSL headers or link flags are needed at build time. The
 * library opened is CPython's own ``_ssl`` module (its path comes from Python), and dlsym
 * on it also searches its dependencies, libssl and libcrypto: the SSL and SSL_CTX pointers
 * these modules are handed come from that same OpenSSL. */
#ifndef POISE_LIBSSL_H
#define POISE_LIBSSL_H

#include <Python.h>
#include <dlfcn.h>

/* dlopen ``path``; NULL with ``*why`` set to the reason (a new str) when it fails. */
static void *libssl_open(const char *path, PyObject **why) {
    void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL)
        *why = PyUnicode_FromString(dlerror());
    return lib;
}

/* Inside a setup function returning PyObject *: ``lib`` opened, or return the reason. */
#define LIBSSL_OPEN(lib, path)                                                               \
    void *lib;                                                                               \
    {                                                                                        \
        PyObject *why_ = NULL;                                                               \
        if ((lib = libssl_open(path, &why_)) == NULL)                                        \
            return why_;                                                                     \
    }

/* Look ``symbol`` up into the function pointer ``field``; inside a setup function returning
 * PyObject *, return the reason when it is missing. */
#define LIBSSL_FIND(lib, field, symbol)                                                      \
    *(void **)&(field) = dlsym(lib, symbol);                                                 \
    if ((field) == NULL)                                                                     \
        return PyUnicode_FromFormat("%s not found", symbol);

#endif
