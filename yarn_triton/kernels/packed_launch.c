/* The packed launcher: one launch plan's kernel arguments packed once, per call only the
 * data pointers and pos_base written over them.
 *
 * Triton's own launcher parses every argument of the kernel from Python objects on every
 * call (101 for rope_kernel: 15 pointers, 50 integers and floats, 36 constexprs it skips).
 * A replayed plan changes only the pointers and pos_base, so kernels/packed_launch.py packs
 * the rest into a byte template once, at the offsets the driver reports for the compiled
 * function (cuFuncGetParamInfo), and this module copies the template, writes the 16 values
 * that change and calls cuLaunchKernel.
 *
 * The driver is reached through dlopen, so this file needs no CUDA headers and builds and
 * imports on a machine without a GPU (the tests check the packing there with pack()).
 *
 * A spec (a bytes object, laid out by packed_launch.py):
 *   Header, then uint32 ptr_off[n_ptrs], uint32 param_off[n_params], then the template.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdint.h>
#include <string.h>

#define MAX_PARAMS 256
#define MAX_SIZE 4096

typedef int CUresult;
typedef void *CUfunction;
typedef void *CUstream;
typedef void *CUcontext;
typedef int CUdevice;

typedef CUresult (*launch_t)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                             CUstream, void **, void **);
typedef CUresult (*param_info_t)(CUfunction, size_t, size_t *, size_t *);
typedef CUresult (*ctx_get_t)(CUcontext *);
typedef CUresult (*ctx_set_t)(CUcontext);
typedef CUresult (*device_get_t)(CUdevice *, int);
typedef CUresult (*retain_t)(CUcontext *, CUdevice);
typedef CUresult (*error_string_t)(CUresult, const char **);

static launch_t cu_launch;
static param_info_t cu_param_info;
static ctx_get_t cu_ctx_get;
static ctx_set_t cu_ctx_set;
static device_get_t cu_device_get;
static retain_t cu_retain;
static error_string_t cu_error_string;

typedef struct {
    uint64_t function;   /* CUfunction */
    uint32_t grid[3];
    uint32_t block;      /* threads per program: 32 * num_warps */
    uint32_t shared;     /* dynamic shared memory, bytes */
    uint32_t device;     /* the ordinal whose primary context runs it when none is current */
    uint32_t n_params;
    uint32_t n_ptrs;     /* pointer slots, filled from the pointers tuple in order */
    uint32_t size;       /* bytes of packed arguments */
    uint32_t base_off;   /* pos_base's offset in them */
    uint32_t base_size;  /* 4 (int32) or 8 (int64) */
    uint32_t reserved;   /* 0: the header is a whole number of 8-byte words */
} Header;

/* The spec's header and arrays, checked against its length. */
static int read_spec(PyObject *spec, Header *h, const uint32_t **ptr_off, const uint32_t **param_off,
                     const unsigned char **tmpl) {
    if (!PyBytes_Check(spec)) {
        PyErr_SetString(PyExc_TypeError, "packed launch: spec must be bytes");
        return -1;
    }
    const char *raw = PyBytes_AS_STRING(spec);
    Py_ssize_t len = PyBytes_GET_SIZE(spec);
    if (len < (Py_ssize_t)sizeof(Header)) {
        PyErr_SetString(PyExc_ValueError, "packed launch: spec shorter than its header");
        return -1;
    }
    memcpy(h, raw, sizeof(Header));
    Py_ssize_t want = (Py_ssize_t)sizeof(Header) + 4 * ((Py_ssize_t)h->n_ptrs + h->n_params) + h->size;
    if (len != want || h->n_params > MAX_PARAMS || h->size > MAX_SIZE || (h->base_size != 4 && h->base_size != 8)) {
        PyErr_SetString(PyExc_ValueError, "packed launch: malformed spec");
        return -1;
    }
    *ptr_off = (const uint32_t *)(raw + sizeof(Header));
    *param_off = *ptr_off + h->n_ptrs;
    *tmpl = (const unsigned char *)(*param_off + h->n_params);
    return 0;
}

/* Copies the template into buf and writes this call's pointers and pos_base over it. */
static int fill(PyObject *spec, PyObject *ptrs, PyObject *base, Header *h, const uint32_t **param_off,
                unsigned char *buf) {
    const uint32_t *ptr_off;
    const unsigned char *tmpl;
    if (read_spec(spec, h, &ptr_off, param_off, &tmpl) < 0)
        return -1;
    PyObject *seq = PySequence_Fast(ptrs, "packed launch: pointers must be a tuple or list of ints");
    if (seq == NULL)
        return -1;
    if (PySequence_Fast_GET_SIZE(seq) != (Py_ssize_t)h->n_ptrs) {
        PyErr_Format(PyExc_TypeError, "packed launch: %u pointers expected", h->n_ptrs);
        Py_DECREF(seq);
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    memcpy(buf, tmpl, h->size);
    for (uint32_t i = 0; i < h->n_ptrs; i++) {
        unsigned long long p = PyLong_AsUnsignedLongLong(items[i]);
        if (p == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        uint64_t v = p;
        memcpy(buf + ptr_off[i], &v, 8);
    }
    Py_DECREF(seq);
    long long b = PyLong_AsLongLong(base);
    if (b == -1 && PyErr_Occurred())
        return -1;
    if (h->base_size == 4) {
        if (b < INT32_MIN || b > INT32_MAX) {
            PyErr_SetString(PyExc_OverflowError, "packed launch: pos_base does not fit the kernel's int32");
            return -1;
        }
        int32_t v = (int32_t)b;
        memcpy(buf + h->base_off, &v, 4);
    } else {
        int64_t v = b;
        memcpy(buf + h->base_off, &v, 8);
    }
    return 0;
}

static PyObject *cuda_error(const char *what, CUresult err) {
    const char *text = NULL;
    if (cu_error_string == NULL || cu_error_string(err, &text) != 0 || text == NULL)
        text = "unknown error";
    PyErr_Format(PyExc_RuntimeError, "yarn_triton packed launch: %s failed: CUDA error %d (%s)", what, err, text);
    return NULL;
}

/* As Triton's launcher does: a thread with no current context gets the device's primary one. */
static CUresult ensure_context(uint32_t device) {
    CUcontext ctx = NULL;
    CUresult err = cu_ctx_get(&ctx);
    if (err != 0 || ctx != NULL)
        return err;
    CUdevice dev;
    if ((err = cu_device_get(&dev, (int)device)) != 0)
        return err;
    if ((err = cu_retain(&ctx, dev)) != 0)
        return err;
    return cu_ctx_set(ctx);
}

/* load_driver() -> None: resolves the driver functions; raises when they are missing. */
static PyObject *load_driver(PyObject *self, PyObject *unused) {
    if (cu_launch != NULL)
        Py_RETURN_NONE;
    void *lib = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        PyErr_Format(PyExc_OSError, "packed launch: cannot open libcuda.so.1: %s", dlerror());
        return NULL;
    }
    param_info_t info = (param_info_t)dlsym(lib, "cuFuncGetParamInfo");  /* CUDA 12.4 and later */
    ctx_get_t get = (ctx_get_t)dlsym(lib, "cuCtxGetCurrent");
    ctx_set_t set = (ctx_set_t)dlsym(lib, "cuCtxSetCurrent");
    device_get_t dev = (device_get_t)dlsym(lib, "cuDeviceGet");
    retain_t retain = (retain_t)dlsym(lib, "cuDevicePrimaryCtxRetain");
    error_string_t errstr = (error_string_t)dlsym(lib, "cuGetErrorString");
    launch_t launch = (launch_t)dlsym(lib, "cuLaunchKernel");
    if (!info || !get || !set || !dev || !retain || !errstr || !launch) {
        PyErr_SetString(PyExc_OSError, "packed launch: libcuda.so.1 lacks cuFuncGetParamInfo (CUDA < 12.4) or "
                                       "another driver function");
        return NULL;
    }
    cu_param_info = info;
    cu_ctx_get = get;
    cu_ctx_set = set;
    cu_device_get = dev;
    cu_retain = retain;
    cu_error_string = errstr;
    cu_launch = launch;  /* last: it marks the driver loaded */
    Py_RETURN_NONE;
}

/* What every entry that calls the driver checks first: its argument count, and that
 * load_driver() ran. */
static int driver_entry(Py_ssize_t nargs, Py_ssize_t want, const char *usage) {
    if (nargs != want) {
        PyErr_SetString(PyExc_TypeError, usage);
        return -1;
    }
    if (cu_launch == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "packed launch: load_driver() first");
        return -1;
    }
    return 0;
}

/* param_layout(function: int, count: int) -> [(offset, size), ...] of the compiled function's
 * first `count` parameters. (The caller knows the count, from the PTX: asking past the last
 * parameter would be an API error, which compute-sanitizer reports.) */
static PyObject *param_layout(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (driver_entry(nargs, 2, "param_layout(function, count)") < 0)
        return NULL;
    unsigned long long f = PyLong_AsUnsignedLongLong(args[0]);
    if (f == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t count = PyLong_AsSsize_t(args[1]);
    if (count == -1 && PyErr_Occurred())
        return NULL;
    if (count < 0 || count > MAX_PARAMS) {
        PyErr_Format(PyExc_ValueError, "packed launch: %zd parameters (at most %d)", count, MAX_PARAMS);
        return NULL;
    }
    PyObject *out = PyList_New(count);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        size_t off = 0, size = 0;
        CUresult err = cu_param_info((CUfunction)(uintptr_t)f, (size_t)i, &off, &size);
        if (err != 0) {
            Py_DECREF(out);
            return cuda_error("cuFuncGetParamInfo", err);
        }
        PyObject *item = Py_BuildValue("(nn)", (Py_ssize_t)off, (Py_ssize_t)size);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, i, item);
    }
    return out;
}

/* pack(spec, pointers, pos_base) -> bytes: the arguments a launch would pass (no GPU needed). */
static PyObject *pack(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "pack(spec, pointers, pos_base)");
        return NULL;
    }
    Header h;
    const uint32_t *param_off;
    unsigned char buf[MAX_SIZE];
    if (fill(args[0], args[1], args[2], &h, &param_off, buf) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)buf, h.size);
}

/* launch(spec, stream, pointers, pos_base) -> None, on the stream (an int, cudaStream_t). */
static PyObject *launch(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (driver_entry(nargs, 4, "launch(spec, stream, pointers, pos_base)") < 0)
        return NULL;
    Header h;
    const uint32_t *param_off;
    unsigned char buf[MAX_SIZE] __attribute__((aligned(16)));
    if (fill(args[0], args[2], args[3], &h, &param_off, buf) < 0)
        return NULL;
    unsigned long long stream = PyLong_AsUnsignedLongLong(args[1]);
    if (stream == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if ((uint64_t)h.grid[0] * h.grid[1] * h.grid[2] == 0)
        Py_RETURN_NONE;
    void *params[MAX_PARAMS];
    for (uint32_t i = 0; i < h.n_params; i++)
        params[i] = buf + param_off[i];
    CUresult err;
    const char *what = "cuCtxGetCurrent";
    Py_BEGIN_ALLOW_THREADS;  /* a full launch queue blocks here: let other threads run */
    err = ensure_context(h.device);
    if (err == 0) {
        what = "cuLaunchKernel";
        err = cu_launch((CUfunction)(uintptr_t)h.function, h.grid[0], h.grid[1], h.grid[2], h.block, 1, 1,
                        h.shared, (CUstream)(uintptr_t)stream, params, NULL);
    }
    Py_END_ALLOW_THREADS;
    if (err != 0)
        return cuda_error(what, err);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"load_driver", load_driver, METH_NOARGS, "Resolve the CUDA driver functions (raises when missing)."},
    {"param_layout", (PyCFunction)(void (*)(void))param_layout, METH_FASTCALL,
     "[(offset, size)] of a CUfunction's first count parameters."},
    {"pack", (PyCFunction)(void (*)(void))pack, METH_FASTCALL, "The packed arguments of a call, as bytes."},
    {"launch", (PyCFunction)(void (*)(void))launch, METH_FASTCALL, "Launch a spec on a stream."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_yarn_triton_launch", NULL, -1, methods};

PyMODINIT_FUNC PyInit__yarn_triton_launch(void) {
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && (PyModule_AddIntConstant(m, "HEADER_SIZE", (long)sizeof(Header)) < 0 ||
                      PyModule_AddIntConstant(m, "MAX_PARAMS", MAX_PARAMS) < 0 ||
                      PyModule_AddIntConstant(m, "MAX_SIZE", MAX_SIZE) < 0)) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
