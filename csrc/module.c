/*
 * module.c - the CPython / NumPy layer over the C core (dhsa._core).
 *
 * The only file that sees Python.h. Each entry point converts its arguments
 * (type, dtype, shape; a DHSAConfig into dhsa_predict_params by field name)
 * and raises TypeError / ValueError naming the argument, releases the GIL
 * around one core call, and maps the core's status to an exception
 * (raise_status, attention_failed). The meaning of the options is checked
 * by DHSAConfig (dhsa/config.py), safety by the core. Every entry point
 * leaves through one `done:` label, where it releases what it holds; the
 * helpers release theirs before each return.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>
#include <math.h>
#include <stddef.h>
#include "dhsa.h"
#include "internal.h"
#include "rules.h"

/* ---- helpers ----------------------------------------------------------- */

static PyObject *raise_status(int status, const char *what) {
    PyObject *exc = PyExc_RuntimeError;
    if (status == DHSA_ENOMEM) return PyErr_NoMemory();
    if (status == DHSA_EINVAL || status == DHSA_ENONFINITE || status == DHSA_EOVERFLOW ||
        status == DHSA_ERANGE || status == DHSA_ESELECTION || status == DHSA_EBOUNDS)
        exc = PyExc_ValueError;
    PyErr_Format(exc, "%s: %s", what, dhsa_status_string(status));
    return NULL;
}

/* Optional float option: None leaves *out untouched and *given = 0. */
static int parse_float_opt(PyObject *obj, const char *name, double *out, int *given) {
    *given = 0;
    if (obj == NULL || obj == Py_None) return 0;
    if (PyBool_Check(obj) || !PyNumber_Check(obj) || PyComplex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a real number or None, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a real number or None, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (!isfinite(v)) {
        PyErr_Format(PyExc_ValueError, "%s must be finite, got %R", name, obj);
        return -1;
    }
    *out = v;
    *given = 1;
    return 0;
}

/* Optional integer option >= min_value: None leaves *out untouched. */
static int parse_int_opt(PyObject *obj, const char *name, int64_t min_value, int64_t *out,
                         int *given) {
    *given = 0;
    if (obj == NULL || obj == Py_None) return 0;
    if (PyBool_Check(obj) || !PyIndex_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be an integer or None, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    PyObject *idx = PyNumber_Index(obj);
    if (!idx) return -1;
    long long v = PyLong_AsLongLongAndOverflow(idx, &overflow);
    Py_DECREF(idx);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s is out of range: %R", name, obj);
        return -1;
    }
    if (v < min_value) {
        PyErr_Format(PyExc_ValueError, "%s must be >= %lld, got %lld", name,
                     (long long)min_value, v);
        return -1;
    }
    *out = (int64_t)v;
    *given = 1;
    return 0;
}

static int parse_threads(PyObject *obj, int *out) {
    int64_t v = 0;
    int given = 0;
    if (parse_int_opt(obj, "num_threads", 1, &v, &given) < 0) return -1;
    if (!given) v = dhsa_max_threads();
    if (v > 4096) {
        PyErr_Format(PyExc_ValueError, "num_threads must be <= 4096, got %lld", (long long)v);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* A q / k / v argument: an ndarray of float32 or float16, 4 dimensions,
 * no empty axis. Only looks at the object (no copy yet, so a huge broadcast
 * view with a wrong shape is refused before it is materialised). */
static int check_tensor(PyObject *obj, const char *name, int *dtype_out) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    PyArrayObject *arr = (PyArrayObject *)obj;
    const int t = PyArray_TYPE(arr);
    if (t != NPY_FLOAT32 && t != NPY_FLOAT16) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype float32 or float16, got %R", name,
                     (PyObject *)PyArray_DESCR(arr));
        return -1;
    }
    if (PyArray_NDIM(arr) != 4) {
        PyErr_Format(PyExc_ValueError,
                     "%s must have 4 dimensions (batch, heads, length, head_dim), got %d",
                     name, PyArray_NDIM(arr));
        return -1;
    }
    for (int i = 0; i < 4; i++) {
        if (PyArray_DIM(arr, i) == 0) {
            PyErr_Format(PyExc_ValueError, "%s has an empty dimension (axis %d): sequences and "
                         "heads must be non-empty", name, i);
            return -1;
        }
    }
    *dtype_out = t;
    return 0;
}

/* A new reference to a C-contiguous aligned float32 version of a checked
 * tensor (float16 kept when keep_half; the input itself when it already is
 * one). */
static PyArrayObject *as_contiguous(PyObject *obj, int keep_half) {
    const int t = PyArray_TYPE((PyArrayObject *)obj);
    /* float16 K/V may stay float16: the kernels widen them tile by tile */
    const int want = (keep_half && t == NPY_FLOAT16) ? NPY_FLOAT16 : NPY_FLOAT32;
    return (PyArrayObject *)PyArray_FROMANY(obj, want, 4, 4,
                                            NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
}

/* The error path of a failed scan: which input holds NaN / Inf. */
static int check_finite(PyArrayObject *a, const char *name, int num_threads) {
    int st;
    if (!a) return 0;
    const void *p = PyArray_DATA(a);
    const int64_t n = (int64_t)PyArray_SIZE(a);
    const int half = PyArray_TYPE(a) == NPY_FLOAT16;
    Py_BEGIN_ALLOW_THREADS
    st = half ? dhsa_max_abs_f16_threads((const uint16_t *)p, n, NULL, num_threads)
              : dhsa_max_abs_threads((const float *)p, n, NULL, num_threads);
    Py_END_ALLOW_THREADS
    if (st != DHSA_OK) {
        PyErr_Format(PyExc_ValueError, "%s contains NaN or Inf; DHSA rejects non-finite inputs",
                     name);
        return -1;
    }
    return 0;
}

/* scale (default 1 / sqrt(D)), softcap (0: none) and window (0: none) of an
 * attention call. Scale and softcap become float32 in the core: keep them
 * where float32 holds them with room to spare, so no value silently turns
 * into 0 or inf. */
static int parse_attn_options(PyObject *scale, PyObject *softcap, PyObject *window, npy_intp D,
                              double *sc, double *cap, int64_t *win) {
    int given = 0;
    *sc = 1.0 / sqrt((double)D);
    *cap = 0.0;
    *win = 0;
    if (parse_float_opt(scale, "scale", sc, &given) < 0) return -1;
    if (!(*sc >= 1e-30 && *sc <= 1e30)) {
        PyErr_Format(PyExc_ValueError, "scale must be in [1e-30, 1e30], got %R", scale);
        return -1;
    }
    if (parse_float_opt(softcap, "softcap", cap, &given) < 0) return -1;
    if (given && !(*cap >= 1e-30 && *cap <= 1e30)) {
        PyErr_Format(PyExc_ValueError, "softcap must be in [1e-30, 1e30] or None, got %R",
                     softcap);
        return -1;
    }
    return parse_int_opt(window, "window", 1, win, &given);
}

/* Convert and validate q, k, v and the attention options into a shape. */
typedef struct {
    PyArrayObject *q, *k, *v;
    int dtype;
    int num_threads;
    dhsa_attn_shape shape;
} attn_args;

static void attn_args_clear(attn_args *a) {
    Py_XDECREF(a->q);
    Py_XDECREF(a->k);
    Py_XDECREF(a->v);
}

static int attn_args_parse(attn_args *a, PyObject *q, PyObject *k, PyObject *v, int causal,
                           PyObject *scale, PyObject *softcap, PyObject *window,
                           PyObject *threads, int need_v) {
    int tq = 0, tk = 0, tv = 0;
    memset(a, 0, sizeof(*a));
    /* with v (the attention kernels) float16 K/V stay float16; the
     * prediction reads k as float32 */
    if (check_tensor(q, "q", &tq) < 0 || check_tensor(k, "k", &tk) < 0) return -1;
    if (need_v && check_tensor(v, "v", &tv) < 0) return -1;
    if (tq != tk || (need_v && tq != tv)) {
        PyErr_SetString(PyExc_TypeError, "q, k and v must share one dtype (float32 or float16)");
        return -1;
    }
    a->dtype = tq;
    /* shapes are checked on the inputs as given, before any copy */
    npy_intp *qs = PyArray_DIMS((PyArrayObject *)q), *ks = PyArray_DIMS((PyArrayObject *)k);
    if (qs[0] != ks[0]) {
        PyErr_Format(PyExc_ValueError, "batch sizes differ: q has %zd, k has %zd",
                     (Py_ssize_t)qs[0], (Py_ssize_t)ks[0]);
        return -1;
    }
    if (qs[3] != ks[3]) {
        PyErr_Format(PyExc_ValueError, "head_dim differs: q has %zd, k has %zd",
                     (Py_ssize_t)qs[3], (Py_ssize_t)ks[3]);
        return -1;
    }
    if (qs[3] > 256) {
        PyErr_Format(PyExc_ValueError, "head_dim must be <= 256, got %zd", (Py_ssize_t)qs[3]);
        return -1;
    }
    if (qs[1] % ks[1] != 0) {
        PyErr_Format(PyExc_ValueError,
                     "q heads (%zd) must be a multiple of k heads (%zd) for grouped-query attention",
                     (Py_ssize_t)qs[1], (Py_ssize_t)ks[1]);
        return -1;
    }
    if (qs[2] > ks[2]) {
        PyErr_Format(PyExc_ValueError,
                     "q length (%zd) must be <= k length (%zd): queries are the last positions",
                     (Py_ssize_t)qs[2], (Py_ssize_t)ks[2]);
        return -1;
    }
    if (ks[2] > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "k length must be < 2**31");
        return -1;
    }
    if (need_v) {
        npy_intp *vs = PyArray_DIMS((PyArrayObject *)v);
        if (vs[0] != ks[0] || vs[1] != ks[1] || vs[2] != ks[2] || vs[3] != ks[3]) {
            PyErr_SetString(PyExc_ValueError, "v must have the same shape as k");
            return -1;
        }
    }
    a->shape.B = qs[0];
    a->shape.H = qs[1];
    a->shape.Hkv = ks[1];
    a->shape.Lq = qs[2];
    a->shape.Lk = ks[2];
    a->shape.D = qs[3];
    a->shape.causal = causal ? 1 : 0;
    a->shape.kv_f16 = need_v && tk == NPY_FLOAT16;

    double sc = 0.0, cap = 0.0;
    int64_t win = 0;
    if (parse_attn_options(scale, softcap, window, qs[3], &sc, &cap, &win) < 0) return -1;
    /* a window of Lk keys or more hides nothing: clamp so that position
     * arithmetic in the core cannot overflow */
    if (win > ks[2]) win = ks[2];
    if (parse_threads(threads, &a->num_threads) < 0) return -1;
    a->shape.scale = (float)sc;
    a->shape.softcap = (float)cap;
    a->shape.window = win;

    /* the float32 copies (where needed) only now that every check passed;
     * the core scans the values (once per call) */
    if (!(a->q = as_contiguous(q, 0)) || !(a->k = as_contiguous(k, need_v))) return -1;
    if (need_v && !(a->v = as_contiguous(v, 1))) return -1;
    return 0;
}

/* Raise for a failed core call on q, k (, v), naming the argument where the
 * status is about one (the rescan runs on the error path only). */
static PyObject *attention_failed(int status, const attn_args *a, const char *what) {
    if (status == DHSA_ENONFINITE) {
        if (check_finite(a->q, "q", a->num_threads) < 0 ||
            check_finite(a->k, "k", a->num_threads) < 0 ||
            check_finite(a->v, "v", a->num_threads) < 0)
            return NULL;
    }
    if (status == DHSA_ERANGE) {
        PyErr_Format(PyExc_ValueError,
                     "%s: q and k are too large: scale * head_dim * max|q| * max|k| exceeds "
                     "2**126, so attention logits could overflow float32; rescale q or k",
                     what);
        return NULL;
    }
    return raise_status(status, what);
}

/* float32 (B, H, Lq, D) output, cast back to the input dtype at the end */
static PyArrayObject *new_output(const attn_args *a) {
    npy_intp dims[4] = {a->shape.B, a->shape.H, a->shape.Lq, a->shape.D};
    return (PyArrayObject *)PyArray_SimpleNew(4, dims, NPY_FLOAT32);
}

static PyObject *finish_output(PyArrayObject *out, int dtype) {
    if (dtype == NPY_FLOAT32) return (PyObject *)out;
    PyObject *cast = PyArray_CastToType(out, PyArray_DescrFromType(dtype), 0);
    Py_DECREF(out);
    return cast;
}

static int parse_required_int(PyObject *obj, const char *name, int64_t min_value, int64_t *out) {
    int given = 0;
    if (parse_int_opt(obj, name, min_value, out, &given) < 0) return -1;
    if (!given) {
        PyErr_Format(PyExc_TypeError, "%s is required", name);
        return -1;
    }
    return 0;
}

/* ---- dense_attention --------------------------------------------------- */

static PyObject *py_dense_attention(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "k", "v", "causal", "scale", "softcap", "window",
                             "num_threads", NULL};
    PyObject *q, *k, *v, *scale = Py_None, *softcap = Py_None, *window = Py_None,
             *threads = Py_None, *result = NULL;
    int causal = 1, st;
    attn_args a;
    PyArrayObject *out = NULL;
    memset(&a, 0, sizeof(a));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$pOOOO", kwlist, &q, &k, &v, &causal,
                                     &scale, &softcap, &window, &threads))
        return NULL;
    if (attn_args_parse(&a, q, k, v, causal, scale, softcap, window, threads, 1) < 0) goto done;
    if (!(out = new_output(&a))) goto done;
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_attention_dense((float *)PyArray_DATA(out), PyArray_DATA(a.q), PyArray_DATA(a.k),
                              PyArray_DATA(a.v), &a.shape, a.num_threads);
    Py_END_ALLOW_THREADS
    if (st != DHSA_OK) { attention_failed(st, &a, "dense_attention"); goto done; }
    result = finish_output(out, a.dtype);
    out = NULL;
done:
    Py_XDECREF(out);
    attn_args_clear(&a);
    (void)self;
    return result;
}

/* ---- a given selection --------------------------------------------------- */

/* A 1-D integer ndarray named `name` (a new reference, or NULL with an
 * exception): int64 (offsets) or int32 (starts, ends). Arrays already of that
 * type and contiguous are used as they are; other integer types are converted
 * once, refusing values the type cannot hold (so 2**32 + 1 never wraps to 1). */
static PyArrayObject *as_index_array(PyObject *obj, const char *name, int type) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject *in = (PyArrayObject *)obj;
    if (!PyArray_ISINTEGER(in)) {
        PyErr_Format(PyExc_TypeError, "%s must hold integers, got %R", name,
                     (PyObject *)PyArray_DESCR(in));
        return NULL;
    }
    if (PyArray_NDIM(in) != 1) {
        PyErr_Format(PyExc_ValueError, "%s must be 1-dimensional", name);
        return NULL;
    }
    const int flags = NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED | NPY_ARRAY_FORCECAST;
    const int t = PyArray_TYPE(in);
    if (t == type || PyArray_CanCastSafely(t, type))
        return (PyArrayObject *)PyArray_FROMANY(obj, type, 1, 1, flags);
    /* unsigned 64-bit into int64: values past 2**63 - 1 would turn negative */
    if (type == NPY_INT64) {
        PyArrayObject *out = (PyArrayObject *)PyArray_FROMANY(obj, NPY_INT64, 1, 1, flags);
        if (!out) return NULL;
        const int64_t *x = PyArray_DATA(out);
        for (npy_intp i = 0; i < PyArray_SIZE(out); i++)
            if (x[i] < 0) {
                PyErr_Format(PyExc_ValueError, "%s must be non-decreasing from 0; it holds a "
                             "value past 2**63 - 1", name);
                Py_DECREF(out);
                return NULL;
            }
        return out;
    }
    /* into int32 through int64 (no copy for an int64 array), narrowed in one pass */
    PyArrayObject *wide = (PyArrayObject *)PyArray_FROMANY(obj, NPY_INT64, 1, 1, flags);
    if (!wide) return NULL;
    npy_intp n = PyArray_SIZE(wide);
    PyArrayObject *out = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_INT32);
    if (out) {
        const int64_t *x = PyArray_DATA(wide);
        int32_t *y = PyArray_DATA(out);
        const int unsigned64 = t == NPY_UINT64 || (t == NPY_ULONG && sizeof(long) == 8) ||
                               t == NPY_ULONGLONG;
        for (npy_intp i = 0; i < n; i++) {
            if (x[i] < 0 ? unsigned64 || x[i] < INT32_MIN : x[i] > INT32_MAX) {
                PyErr_Format(PyExc_ValueError, "%s holds %lld: ranges need 0 <= start < end <= "
                             "Lk < 2**31", name, (long long)x[i]);
                Py_CLEAR(out);
                break;
            }
            y[i] = (int32_t)x[i];
        }
    }
    Py_DECREF(wide);
    return out;
}

typedef struct {
    PyArrayObject *offsets, *starts, *ends;
    dhsa_selection sel;
} sel_args;

static void sel_args_clear(sel_args *s) {
    Py_XDECREF(s->offsets);
    Py_XDECREF(s->starts);
    Py_XDECREF(s->ends);
}

/* The CSR structure of a given selection: types, lengths, the number of
 * groups the offsets imply, offsets from 0 to len(starts) that index into
 * the arrays. Their order and the ranges are checked by the core, once
 * (dhsa_selection_check). */
static int sel_args_parse(sel_args *s, PyObject *offsets, PyObject *starts, PyObject *ends,
                          PyObject *block_size, const dhsa_attn_shape *shape) {
    int64_t bs = 0;
    int given = 0;
    memset(s, 0, sizeof(*s));
    if (!offsets || !starts || !ends) {
        PyErr_SetString(PyExc_TypeError, "a selection needs offsets, starts, ends and block_size");
        return -1;
    }
    if (parse_int_opt(block_size, "block_size", 1, &bs, &given) < 0) return -1;
    if (!given) {
        PyErr_SetString(PyExc_TypeError, "block_size is required");
        return -1;
    }
    if (bs > shape->Lq) bs = shape->Lq; /* one block either way; no overflow below */
    if (!(s->offsets = as_index_array(offsets, "offsets", NPY_INT64))) return -1;
    if (!(s->starts = as_index_array(starts, "starts", NPY_INT32))) return -1;
    if (!(s->ends = as_index_array(ends, "ends", NPY_INT32))) return -1;
    const int64_t nst = PyArray_SIZE(s->starts);
    if (nst != PyArray_SIZE(s->ends)) {
        PyErr_SetString(PyExc_ValueError, "starts and ends must have equal length");
        return -1;
    }
    const int64_t nqb = (shape->Lq + bs - 1) / bs;
    const int64_t nrows = PyArray_SIZE(s->offsets) - 1;
    int64_t groups = 0;
    if (nrows == shape->B * nqb) groups = 1;
    else if (nrows == shape->B * shape->Hkv * nqb) groups = shape->Hkv;
    else if (nrows == shape->B * shape->H * nqb) groups = shape->H;
    if (groups == 0) {
        PyErr_Format(PyExc_ValueError,
                     "offsets must have B * G * ceil(Lq / block_size) + 1 entries with G in "
                     "{1, Hkv, H}; got %lld",
                     (long long)(nrows + 1));
        return -1;
    }
    const int64_t *off = PyArray_DATA(s->offsets);
    if (off[0] != 0 || off[nrows] != nst) {
        PyErr_SetString(PyExc_ValueError, "offsets must start at 0 and end at len(starts)");
        return -1;
    }
    /* every offset an index into starts / ends, so that the core's check
     * (which does not know their length) reads inside them */
    for (int64_t i = 1; i < nrows; i++)
        if (off[i] < 0 || off[i] > nst) {
            PyErr_Format(PyExc_ValueError, "offsets[%lld] = %lld is no index into starts / ends "
                         "(of length %lld)", (long long)i, (long long)off[i], (long long)nst);
            return -1;
        }
    s->sel.block_size = bs;
    s->sel.num_blocks = nqb;
    s->sel.num_groups = groups;
    s->sel.offsets = off;
    s->sel.starts = PyArray_DATA(s->starts);
    s->sel.ends = PyArray_DATA(s->ends);
    return 0;
}

/* count_pairs(offsets, starts, ends, *, block_size, B, H, Hkv, Lq, Lk, causal, window,
 *             num_threads) -> (selected (B*G,), allowed (B*G,)) */
static PyObject *py_count_pairs(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"offsets", "starts", "ends", "block_size", "B", "H", "Hkv",
                             "Lq", "Lk", "causal", "window", "num_threads", NULL};
    PyObject *offsets, *starts, *ends, *block_size = NULL, *window = Py_None, *result = NULL,
             *threads = Py_None, *dims[5] = {NULL, NULL, NULL, NULL, NULL};
    static const char *dim_names[5] = {"B", "H", "Hkv", "Lq", "Lk"};
    int64_t dim_values[5] = {0, 0, 0, 0, 0};
    int causal = 1, given = 0, num_threads = 1, st;
    sel_args s;
    PyArrayObject *sel_out = NULL, *all_out = NULL;
    dhsa_attn_shape shape;
    memset(&s, 0, sizeof(s));
    memset(&shape, 0, sizeof(shape));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$OOOOOOpOO", kwlist, &offsets, &starts,
                                     &ends, &block_size, &dims[0], &dims[1], &dims[2], &dims[3],
                                     &dims[4], &causal, &window, &threads))
        return NULL;
    for (int i = 0; i < 5; i++)
        if (parse_required_int(dims[i], dim_names[i], 1, &dim_values[i]) < 0) goto done;
    shape.B = dim_values[0]; shape.H = dim_values[1]; shape.Hkv = dim_values[2];
    shape.Lq = dim_values[3]; shape.Lk = dim_values[4]; shape.D = 1;
    shape.scale = 1.0f; shape.causal = causal; shape.kv_f16 = 0;
    if (shape.Lk > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "count_pairs: Lk must be < 2**31");
        goto done;
    }
    if (parse_int_opt(window, "window", 1, &shape.window, &given) < 0) goto done;
    if (given && shape.window > shape.Lk) shape.window = shape.Lk;
    if (parse_threads(threads, &num_threads) < 0) goto done;
    if (dhsa_attn_shape_check(&shape) != DHSA_OK) {
        PyErr_SetString(PyExc_ValueError, "count_pairs: inconsistent B, H, Hkv, Lq, Lk "
                        "(need H % Hkv == 0, Lq <= Lk, B * H * Lk < 2**63)");
        goto done;
    }
    if (sel_args_parse(&s, offsets, starts, ends, block_size, &shape) < 0) goto done;
    npy_intp n = (npy_intp)(shape.B * s.sel.num_groups);
    if (!(sel_out = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_INT64))) goto done;
    if (!(all_out = (PyArrayObject *)PyArray_SimpleNew(1, &n, NPY_INT64))) goto done;
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_selection_count_pairs(PyArray_DATA(sel_out), PyArray_DATA(all_out), &s.sel, &shape,
                                    num_threads);
    Py_END_ALLOW_THREADS
    if (st != DHSA_OK) { raise_status(st, "count_pairs"); goto done; }
    result = Py_BuildValue("OO", sel_out, all_out);
done:
    Py_XDECREF(sel_out);
    Py_XDECREF(all_out);
    sel_args_clear(&s);
    (void)self;
    return result;
}

/* ---- DHSAConfig -> dhsa_predict_params ------------------------------------ */

enum { FIELD_INT, FIELD_OPT_INT, FIELD_FLOAT, FIELD_ENUM };

/* Every field the core reads, by its DHSAConfig name. */
static const struct { const char *name; int kind; size_t offset; } config_fields[] = {
    {"budget", FIELD_INT, offsetof(dhsa_predict_params, budget)},
    {"block_size", FIELD_INT, offsetof(dhsa_predict_params, block_size)},
    {"sink", FIELD_INT, offsetof(dhsa_predict_params, sink)},
    {"local", FIELD_INT, offsetof(dhsa_predict_params, local)},
    {"budget_mode", FIELD_ENUM, offsetof(dhsa_predict_params, budget_mode)},
    {"density", FIELD_FLOAT, offsetof(dhsa_predict_params, density)},
    {"mass", FIELD_FLOAT, offsetof(dhsa_predict_params, mass)},
    {"min_budget", FIELD_INT, offsetof(dhsa_predict_params, min_budget)},
    {"max_budget", FIELD_INT, offsetof(dhsa_predict_params, max_budget)},
    {"granularity", FIELD_ENUM, offsetof(dhsa_predict_params, granularity)},
    {"chunking", FIELD_ENUM, offsetof(dhsa_predict_params, chunking)},
    {"chunk_size", FIELD_INT, offsetof(dhsa_predict_params, chunk_size)},
    {"boundary_window", FIELD_INT, offsetof(dhsa_predict_params, boundary_window)},
    {"threshold", FIELD_FLOAT, offsetof(dhsa_predict_params, threshold)},
    {"min_chunk", FIELD_INT, offsetof(dhsa_predict_params, min_chunk)},
    {"max_chunk", FIELD_INT, offsetof(dhsa_predict_params, max_chunk)},
    {"nms_radius", FIELD_INT, offsetof(dhsa_predict_params, nms_radius)},
    {"max_chunks", FIELD_OPT_INT, offsetof(dhsa_predict_params, max_chunks)},
    {"normalization", FIELD_ENUM, offsetof(dhsa_predict_params, normalization)},
    {"method", FIELD_ENUM, offsetof(dhsa_predict_params, method)},
    {"dense_tail", FIELD_INT, offsetof(dhsa_predict_params, dense_tail)},
    {"chunk_score", FIELD_ENUM, offsetof(dhsa_predict_params, chunk_score)},
    {"decode_score", FIELD_ENUM, offsetof(dhsa_predict_params, decode_score)},
};

#define NUM_CONFIG_FIELDS (sizeof(config_fields) / sizeof(config_fields[0]))

/* The field names as interned strings, made once at import: no str is built
 * per call and attribute lookups hit the interned fast path. */
static PyObject *config_names[NUM_CONFIG_FIELDS];

static int config_names_init(void) {
    for (size_t i = 0; i < NUM_CONFIG_FIELDS; i++)
        if (!(config_names[i] = PyUnicode_InternFromString(config_fields[i].name))) return -1;
    return 0;
}

/* One field: an int (None -> 0 for FIELD_OPT_INT), a finite real, or a
 * string the core's name table knows. */
static int config_field(PyObject *value, const char *name, int kind, char *dst) {
    if (kind == FIELD_ENUM) {
        const char *str = PyUnicode_Check(value) ? PyUnicode_AsUTF8(value) : NULL;
        if (!str) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "config.%s must be a str, got %s", name,
                         Py_TYPE(value)->tp_name);
            return -1;
        }
        if (dhsa_enum_value(name, str, (int *)(void *)dst) != DHSA_OK) {
            PyErr_Format(PyExc_ValueError, "config.%s = '%s' is not run by the C core", name, str);
            return -1;
        }
        return 0;
    }
    if (kind == FIELD_FLOAT) {
        double v = 0.0;
        int given = 0;
        char label[64];
        snprintf(label, sizeof(label), "config.%s", name);
        if (value == Py_None) {
            PyErr_Format(PyExc_TypeError, "%s must be a real number, got None", label);
            return -1;
        }
        if (parse_float_opt(value, label, &v, &given) < 0) return -1;
        memcpy(dst, &v, sizeof(v));
        return 0;
    }
    int64_t v = 0;
    int given = 0;
    char label[64];
    snprintf(label, sizeof(label), "config.%s", name);
    if (kind == FIELD_INT && value == Py_None) {
        PyErr_Format(PyExc_TypeError, "%s must be an integer, got None", label);
        return -1;
    }
    /* the core refuses negative values (DHSA_EINVAL); here only the type */
    if (parse_int_opt(value, label, INT64_MIN, &v, &given) < 0) return -1;
    memcpy(dst, &v, sizeof(v));
    return 0;
}

/* config (a DHSAConfig, or any object with its attributes) -> *p */
static int params_from_config(PyObject *config, dhsa_predict_params *p) {
    memset(p, 0, sizeof(*p));
    for (size_t i = 0; i < NUM_CONFIG_FIELDS; i++) {
        PyObject *value = PyObject_GetAttr(config, config_names[i]);
        if (!value) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "config must be a DHSAConfig: %s has no field '%s'",
                         Py_TYPE(config)->tp_name, config_fields[i].name);
            return -1;
        }
        const int r = config_field(value, config_fields[i].name, config_fields[i].kind,
                                   (char *)p + config_fields[i].offset);
        Py_DECREF(value);
        if (r < 0) return -1;
    }
    return 0;
}

/* Caller-given boundaries: one 1-D integer array for every chunking group, or
 * a sequence of n of them, into *bounds (n, Lk + 1) and *num_bounds (n)
 * (PyMem buffers the caller frees). Only types and counts here; the values
 * are the core's to check (DHSA_EBOUNDS). */
static int parse_boundaries(PyObject *obj, int64_t n, int64_t Lk, int64_t **bounds,
                            int64_t **num_bounds) {
    PyObject *seq = NULL;
    int rc = -1;
    *bounds = NULL;
    *num_bounds = NULL;
    const int shared = PyArray_Check(obj) && PyArray_NDIM((PyArrayObject *)obj) == 1;
    if (!shared) {
        if (PyUnicode_Check(obj) || !(seq = PySequence_Fast(obj, "x"))) {
            PyErr_Clear();
            PyErr_SetString(PyExc_TypeError,
                            "boundaries must be a 1-D integer array or a sequence of them");
            goto done;
        }
        if (PySequence_Fast_GET_SIZE(seq) != n) {
            PyErr_Format(PyExc_ValueError, "boundaries must give %lld arrays (batch x chunk "
                         "groups), got %zd", (long long)n, PySequence_Fast_GET_SIZE(seq));
            goto done;
        }
    }
    *bounds = PyMem_Calloc((size_t)(n * (Lk + 1)), sizeof(int64_t));
    *num_bounds = PyMem_Calloc((size_t)n, sizeof(int64_t));
    if (!*bounds || !*num_bounds) { PyErr_NoMemory(); goto done; }
    for (int64_t g = 0; g < n; g++) {
        PyObject *item = shared ? obj : PySequence_Fast_GET_ITEM(seq, g);
        PyArrayObject *row = (PyArrayObject *)PyArray_FROM_O(item);
        if (!row) goto done;
        if (PyArray_NDIM(row) != 1 || !PyArray_ISINTEGER(row)) {
            Py_DECREF(row);
            PyErr_SetString(PyExc_TypeError, "boundaries must hold 1-D integer arrays");
            goto done;
        }
        PyArrayObject *r64 = (PyArrayObject *)PyArray_FROMANY(
            (PyObject *)row, NPY_INT64, 1, 1, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                                  NPY_ARRAY_FORCECAST);
        Py_DECREF(row);
        if (!r64) goto done;
        const int64_t len = PyArray_SIZE(r64);
        /* a row too long for Lk + 1 entries is refused by the core's check */
        memcpy(*bounds + g * (Lk + 1), PyArray_DATA(r64),
               (size_t)DHSA_MIN(len, Lk + 1) * sizeof(int64_t));
        (*num_bounds)[g] = len;
        Py_DECREF(r64);
    }
    rc = 0;
done:
    Py_XDECREF(seq);
    if (rc < 0) {
        PyMem_Free(*bounds);
        PyMem_Free(*num_bounds);
        *bounds = *num_bounds = NULL;
    }
    return rc;
}

/* A learned boundary model: a 2-D float64-convertible array of one row per
 * chunking group, each dhsa_bmodel_len(heads * D) long, every value finite,
 * for dynamic chunking without caller-given boundaries. *arr keeps the
 * converted array alive; p->boundary_model points into it. */
static int parse_boundary_model(PyObject *obj, const dhsa_attn_shape *s, dhsa_predict_params *p,
                                int with_bounds, PyArrayObject **arr) {
    *arr = NULL;
    if (obj == Py_None) return 0;
    if (p->chunking != DHSA_CHUNK_DYNAMIC) {
        PyErr_SetString(PyExc_ValueError,
                        "boundary_model needs config.chunking='dynamic' (it scores the boundaries)");
        return -1;
    }
    if (with_bounds) {
        PyErr_SetString(PyExc_ValueError, "give boundaries or boundary_model, not both");
        return -1;
    }
    if (PyUnicode_Check(obj) || PyBytes_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "boundary_model must be a 2-D array of reals");
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)PyArray_FROMANY(
        obj, NPY_FLOAT64, 0, 0, NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
    if (!a) {
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "boundary_model must be a 2-D array of reals");
        return -1;
    }
    int64_t kh0 = 0, heads = 0;
    const int64_t cg = dhsa_rule_chunk_groups(s, p->granularity);
    dhsa_rule_chunk_heads(s, p->granularity, 0, &kh0, &heads);
    const int64_t len = dhsa_bmodel_len(heads * s->D);
    if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 0) != cg || PyArray_DIM(a, 1) != len) {
        PyObject *got = PyObject_GetAttrString((PyObject *)a, "shape");
        PyErr_Format(PyExc_ValueError,
                     "boundary_model must have shape (%lld, %lld) (chunk groups, 2 * %lld * "
                     "head_dim + %d), got %R", (long long)cg, (long long)len, (long long)heads,
                     (int)DHSA_BMODEL_TAIL, got ? got : Py_None);
        Py_XDECREF(got);
        Py_DECREF(a);
        return -1;
    }
    const double *d = PyArray_DATA(a);
    for (int64_t i = 0; i < cg * len; i++)
        if (!isfinite(d[i])) {
            PyErr_Format(PyExc_ValueError, "boundary_model[%lld, %lld] is not finite",
                         (long long)(i / len), (long long)(i % len));
            Py_DECREF(a);
            return -1;
        }
    p->boundary_model = d;
    *arr = a;
    return 0;
}

/* ---- a prediction as NumPy arrays ------------------------------------------ */

static void prediction_capsule_free(PyObject *capsule) {
    dhsa_prediction_free(PyCapsule_GetPointer(capsule, "dhsa.prediction"));
}

/* An array over one buffer of the prediction, kept alive by the capsule. */
static PyObject *wrap(PyObject *capsule, void *data, int nd, npy_intp *dims, int type) {
    PyObject *arr = PyArray_SimpleNewFromData(nd, dims, type, data);
    if (!arr) return NULL;
    Py_INCREF(capsule);
    if (PyArray_SetBaseObject((PyArrayObject *)arr, capsule) < 0) {
        Py_DECREF(arr);
        return NULL;
    }
    return arr;
}

/* The dict of a prediction (steals pred). Its buffers become the arrays'
 * memory, without a copy; the last array to go frees the prediction. */
static PyObject *prediction_dict(dhsa_prediction *pred, const dhsa_attn_shape *s) {
    PyObject *capsule = PyCapsule_New(pred, "dhsa.prediction", prediction_capsule_free);
    PyObject *d = NULL, *item = NULL;
    if (!capsule) { dhsa_prediction_free(pred); return NULL; }
    if (!(d = PyDict_New())) goto fail;
    npy_intp ncg = (npy_intp)(s->B * pred->chunk_groups);
    npy_intp nsg = (npy_intp)(s->B * pred->select_groups);
    const npy_intp nrows = nsg * (npy_intp)pred->num_blocks;
    npy_intp bdims[2] = {ncg, (npy_intp)(s->Lk + 1)}, noff = nrows + 1;
    npy_intp nr = (npy_intp)pred->num_ranges;
    npy_intp sdims[3] = {nsg, (npy_intp)pred->num_blocks, (npy_intp)pred->score_stride};
    struct { const char *key; void *data; int nd; npy_intp *dims; int type; } arrays[] = {
        {"bounds", pred->bounds, 2, bdims, NPY_INT64},
        {"num_bounds", pred->num_bounds, 1, &ncg, NPY_INT64},
        {"offsets", pred->offsets, 1, &noff, NPY_INT64},
        {"starts", pred->starts, 1, &nr, NPY_INT32},
        {"ends", pred->ends, 1, &nr, NPY_INT32},
        {"pairs_selected", pred->pairs_selected, 1, &nsg, NPY_INT64},
        {"pairs_allowed", pred->pairs_allowed, 1, &nsg, NPY_INT64},
        {"chunk_scores", pred->chunk_scores, 3, sdims, NPY_FLOAT64},
    };
    for (size_t i = 0; i < sizeof(arrays) / sizeof(arrays[0]); i++) {
        /* a buffer the call did not make (a given selection's ranges) is None */
        if (arrays[i].data) item = wrap(capsule, arrays[i].data, arrays[i].nd, arrays[i].dims,
                                        arrays[i].type);
        else { item = Py_None; Py_INCREF(item); }
        if (!item || PyDict_SetItemString(d, arrays[i].key, item) < 0) goto fail;
        Py_CLEAR(item);
    }
    struct { const char *key; PyObject *value; } scalars[] = {
        {"chunk_groups", PyLong_FromLongLong(pred->chunk_groups)},
        {"select_groups", PyLong_FromLongLong(pred->select_groups)},
        {"num_blocks", PyLong_FromLongLong(pred->num_blocks)},
        {"block_size", PyLong_FromLongLong(pred->block_size)},
        {"predict_seconds", PyFloat_FromDouble(pred->predict_seconds)},
        {"attention_seconds", PyFloat_FromDouble(pred->attention_seconds)},
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof(scalars) / sizeof(scalars[0]); i++) {
        if (!bad && (!scalars[i].value ||
                     PyDict_SetItemString(d, scalars[i].key, scalars[i].value) < 0))
            bad = 1;
        Py_XDECREF(scalars[i].value);
    }
    if (bad) goto fail;
    Py_DECREF(capsule);
    return d;
fail:
    Py_XDECREF(item);
    Py_XDECREF(d);
    Py_DECREF(capsule);
    return NULL;
}

/* Raise for a failed prediction: the bad boundaries row by its index. */
static PyObject *predict_failed(int status, const attn_args *a, const int64_t *bounds,
                                const int64_t *num_bounds, int64_t n, const char *what) {
    if (status == DHSA_EBOUNDS && bounds) {
        const int64_t g = dhsa_predict_bad_bounds(bounds, num_bounds, n, a->shape.Lk);
        PyErr_Format(PyExc_ValueError, "boundaries[%lld] must rise strictly from 0 to Lk=%lld",
                     (long long)g, (long long)a->shape.Lk);
        return NULL;
    }
    if (status == DHSA_ESELECTION) {
        PyErr_Format(PyExc_ValueError, "%s: selection: %s", what, dhsa_status_string(status));
        return NULL;
    }
    return attention_failed(status, a, what);
}

/* ---- predict ----------------------------------------------------------- */

/* predict(q, k, config, *, causal, scale, window, boundaries, return_scores,
 *         num_threads) -> dict of numpy arrays:
 *   bounds (B*CG, Lk+1) int64 and num_bounds (B*CG,): the chunking
 *   offsets (B*SG*NQB+1,) int64, starts, ends (int32): the selection
 *   pairs_selected, pairs_allowed (B*SG,) int64
 *   chunk_scores (B*SG, NQB, max chunks) float64 or None
 *   chunk_groups, select_groups, num_blocks, block_size, predict_seconds */
static PyObject *py_predict(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "k", "config", "causal", "scale", "window", "boundaries",
                             "return_scores", "num_threads", "boundary_model", NULL};
    PyObject *q, *k, *config, *scale = Py_None, *window = Py_None, *bounds_in = Py_None,
             *threads = Py_None, *bmodel_in = Py_None, *result = NULL;
    PyArrayObject *bmodel = NULL;
    int causal = 1, return_scores = 0, st = DHSA_OK;
    attn_args a;
    dhsa_predict_params p;
    dhsa_prediction *pred = NULL;
    int64_t *bounds = NULL, *num_bounds = NULL, ncg = 0;
    memset(&a, 0, sizeof(a));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$pOOOpOO", kwlist, &q, &k, &config,
                                     &causal, &scale, &window, &bounds_in, &return_scores,
                                     &threads, &bmodel_in))
        return NULL;
    if (attn_args_parse(&a, q, k, NULL, causal, scale, Py_None, window, threads, 0) < 0)
        goto done;
    if (params_from_config(config, &p) < 0) goto done;
    ncg = a.shape.B * dhsa_rule_chunk_groups(&a.shape, p.granularity);
    if (bounds_in != Py_None &&
        parse_boundaries(bounds_in, ncg, a.shape.Lk, &bounds, &num_bounds) < 0)
        goto done;
    if (parse_boundary_model(bmodel_in, &a.shape, &p, bounds_in != Py_None, &bmodel) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_predict(&pred, PyArray_DATA(a.q), PyArray_DATA(a.k), &a.shape, &p, bounds,
                      num_bounds, return_scores ? DHSA_PREDICT_SCORES : 0, a.num_threads);
    Py_END_ALLOW_THREADS
    if (st != DHSA_OK) { predict_failed(st, &a, bounds, num_bounds, ncg, "predict"); goto done; }
    result = prediction_dict(pred, &a.shape);
done:
    Py_XDECREF(bmodel);
    PyMem_Free(bounds);
    PyMem_Free(num_bounds);
    attn_args_clear(&a);
    (void)self;
    return result;
}

/* ---- sparse_attention -------------------------------------------------- */

/* sparse_attention(q, k, v, *, config=None, boundaries=None, offsets=None,
 *                  starts=None, ends=None, block_size=None, causal, scale, softcap,
 *                  window, num_threads, return_info=False)
 * -> out, or (out, dict as predict's) with return_info. With config the
 * selection is predicted in the same core call (q, k, v scanned once); else
 * offsets / starts / ends / block_size give it (int64 offsets and int32
 * ranges used without a copy), and the dict holds the pair counts only. */
static PyObject *py_sparse_attention(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "k", "v", "config", "boundaries", "offsets", "starts", "ends",
                             "block_size", "causal", "scale", "softcap", "window",
                             "num_threads", "return_info", "boundary_model", NULL};
    PyObject *q, *k, *v, *config = Py_None, *bounds_in = Py_None, *offsets = NULL,
             *starts = NULL, *ends = NULL, *block_size = Py_None, *scale = Py_None,
             *softcap = Py_None, *window = Py_None, *threads = Py_None, *result = NULL,
             *info = NULL, *bmodel_in = Py_None;
    PyArrayObject *bmodel = NULL;
    int causal = 1, return_info = 0, st;
    attn_args a;
    sel_args s;
    dhsa_predict_params p;
    dhsa_prediction *pred = NULL;
    int64_t *bounds = NULL, *num_bounds = NULL, ncg = 0;
    PyArrayObject *out = NULL;
    memset(&a, 0, sizeof(a));
    memset(&s, 0, sizeof(s));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$OOOOOOpOOOOpO", kwlist, &q, &k, &v,
                                     &config, &bounds_in, &offsets, &starts, &ends, &block_size,
                                     &causal, &scale, &softcap, &window, &threads, &return_info,
                                     &bmodel_in))
        return NULL;
    const int given_sel = offsets || starts || ends || block_size != Py_None;
    if ((config == Py_None) == !given_sel) {
        PyErr_SetString(PyExc_TypeError,
                        "sparse_attention needs either config or offsets/starts/ends/block_size");
        return NULL;
    }
    if (config == Py_None && (bounds_in != Py_None || bmodel_in != Py_None)) {
        PyErr_SetString(PyExc_TypeError, bounds_in != Py_None
                            ? "boundaries need a config (they feed the prediction)"
                            : "boundary_model needs a config (it feeds the prediction)");
        return NULL;
    }
    if (attn_args_parse(&a, q, k, v, causal, scale, softcap, window, threads, 1) < 0) goto done;
    if (config != Py_None) {
        if (params_from_config(config, &p) < 0) goto done;
        ncg = a.shape.B * dhsa_rule_chunk_groups(&a.shape, p.granularity);
        if (bounds_in != Py_None &&
            parse_boundaries(bounds_in, ncg, a.shape.Lk, &bounds, &num_bounds) < 0)
            goto done;
        if (parse_boundary_model(bmodel_in, &a.shape, &p, bounds_in != Py_None, &bmodel) < 0)
            goto done;
    } else if (sel_args_parse(&s, offsets, starts, ends, block_size, &a.shape) < 0) {
        goto done;
    }
    if (!(out = new_output(&a))) goto done;
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_sparse_attention((float *)PyArray_DATA(out), &pred, PyArray_DATA(a.q),
                               PyArray_DATA(a.k), PyArray_DATA(a.v), &a.shape,
                               config != Py_None ? &p : NULL, bounds, num_bounds,
                               config != Py_None ? NULL : &s.sel,
                               return_info ? DHSA_PREDICT_COUNTS : 0, a.num_threads);
    Py_END_ALLOW_THREADS
    if (st != DHSA_OK) {
        predict_failed(st, &a, bounds, num_bounds, ncg, "sparse_attention");
        goto done;
    }
    if (!return_info) {
        dhsa_prediction_free(pred);
        result = finish_output(out, a.dtype);
        out = NULL;
        goto done;
    }
    info = prediction_dict(pred, &a.shape);
    if (!info) goto done;
    {
        PyObject *o = finish_output(out, a.dtype);
        out = NULL;
        if (o) result = Py_BuildValue("NO", o, info);
    }
done:
    Py_XDECREF(bmodel);
    Py_XDECREF(out);
    Py_XDECREF(info);
    PyMem_Free(bounds);
    PyMem_Free(num_bounds);
    attn_args_clear(&a);
    sel_args_clear(&s);
    (void)self;
    return result;
}


/* ---- KVCache: a KV cache with its chunk state (decode.c) ------------------- */

/* _core.KVCache(config, batch, num_kv_heads, head_dim, half, boundary_model=None).
 * The object owns one dhsa_kv_cache. `busy` is set (under the GIL) while a
 * call runs without the GIL, so a second thread gets an error instead of a
 * race on the cache. */
typedef struct {
    PyObject_HEAD
    dhsa_kv_cache *c;
    int64_t B, Hkv, D, CG;
    int half, busy;
} KVCacheObject;

static int cache_acquire(KVCacheObject *self) {
    if (!self->c) {
        PyErr_SetString(PyExc_ValueError, "KVCache is not initialised");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "KVCache is in use by another thread; a cache serves one call at a time");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static void KVCache_dealloc(KVCacheObject *self) {
    dhsa_kv_cache_free(self->c);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int KVCache_init(KVCacheObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"config", "batch", "num_kv_heads", "head_dim", "half",
                             "boundary_model", NULL};
    PyObject *config, *bmodel_in = Py_None, *b_obj, *h_obj, *d_obj;
    PyArrayObject *bmodel = NULL;
    int half = 0;
    int64_t B = 0, Hkv = 0, D = 0;
    dhsa_predict_params p;
    if (self->c) {
        PyErr_SetString(PyExc_RuntimeError, "KVCache is already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOp|O", kwlist, &config, &b_obj, &h_obj,
                                     &d_obj, &half, &bmodel_in))
        return -1;
    if (parse_required_int(b_obj, "batch", 1, &B) < 0 ||
        parse_required_int(h_obj, "num_kv_heads", 1, &Hkv) < 0 ||
        parse_required_int(d_obj, "head_dim", 1, &D) < 0)
        return -1;
    if (D > 256) {
        PyErr_Format(PyExc_ValueError, "head_dim must be <= 256, got %lld", (long long)D);
        return -1;
    }
    if (B > INT32_MAX || Hkv > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "batch and num_kv_heads must be < 2**31");
        return -1;
    }
    if (params_from_config(config, &p) < 0) return -1;
    if (p.max_chunks != 0) {
        PyErr_SetString(PyExc_ValueError, "KVCache needs config.max_chunks=None: a cap on "
                        "chunks would leave the open chunk growing without end");
        return -1;
    }
    dhsa_attn_shape s = {B, Hkv, Hkv, 1, 1, D, 1.0f, 0.0f, 0, 1, 0};
    if (parse_boundary_model(bmodel_in, &s, &p, 0, &bmodel) < 0) return -1;
    const int st = dhsa_kv_cache_create(&self->c, B, Hkv, D, half, &p);
    Py_XDECREF(bmodel);
    if (st != DHSA_OK) {
        raise_status(st, "KVCache");
        return -1;
    }
    self->B = B; self->Hkv = Hkv; self->D = D; self->half = half;
    self->CG = dhsa_rule_chunk_groups(&s, p.granularity);
    return 0;
}

/* k or v for append: (batch, num_kv_heads, n, head_dim) in the cache's dtype */
static PyArrayObject *cache_input(KVCacheObject *self, PyObject *obj, const char *name) {
    int t = 0;
    if (check_tensor(obj, name, &t) < 0) return NULL;
    const int want = self->half ? NPY_FLOAT16 : NPY_FLOAT32;
    if (t != want) {
        PyErr_Format(PyExc_TypeError, "%s must have the cache's dtype %s, got %R", name,
                     self->half ? "float16" : "float32", (PyObject *)PyArray_DESCR((PyArrayObject *)obj));
        return NULL;
    }
    npy_intp *d = PyArray_DIMS((PyArrayObject *)obj);
    if (d[0] != self->B || d[1] != self->Hkv || d[3] != self->D) {
        PyErr_Format(PyExc_ValueError, "%s must have shape (%lld, %lld, n, %lld) (batch, "
                     "num_kv_heads, length, head_dim of the cache), got (%zd, %zd, %zd, %zd)",
                     name, (long long)self->B, (long long)self->Hkv, (long long)self->D,
                     (Py_ssize_t)d[0], (Py_ssize_t)d[1], (Py_ssize_t)d[2], (Py_ssize_t)d[3]);
        return NULL;
    }
    return (PyArrayObject *)PyArray_FROMANY(obj, want, 4, 4,
                                            NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED);
}

static PyObject *KVCache_append(KVCacheObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"k", "v", "num_threads", NULL};
    PyObject *k_in, *v_in, *threads = Py_None, *result = NULL;
    PyArrayObject *k = NULL, *v = NULL;
    int T = 1, st;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$O", kwlist, &k_in, &v_in, &threads))
        return NULL;
    if (parse_threads(threads, &T) < 0) return NULL;
    if (!(k = cache_input(self, k_in, "k")) || !(v = cache_input(self, v_in, "v"))) goto done;
    if (PyArray_DIM(k, 2) != PyArray_DIM(v, 2)) {
        PyErr_SetString(PyExc_ValueError, "v must have the same shape as k");
        goto done;
    }
    if (cache_acquire(self) < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_kv_cache_append(self->c, PyArray_DATA(k), PyArray_DATA(v), PyArray_DIM(k, 2), T);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st == DHSA_ENONFINITE) {
        if (check_finite(k, "k", T) == 0) check_finite(v, "v", T);
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "k or v contains NaN or Inf");
        goto done;
    }
    if (st == DHSA_EOVERFLOW) {
        PyErr_SetString(PyExc_ValueError, "KVCache.append: a cache holds fewer than 2**31 keys");
        goto done;
    }
    if (st != DHSA_OK) { raise_status(st, "KVCache.append"); goto done; }
    result = Py_None;
    Py_INCREF(result);
done:
    Py_XDECREF(k);
    Py_XDECREF(v);
    return result;
}

static PyObject *KVCache_length(KVCacheObject *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromLongLong(self->c ? dhsa_kv_cache_length(self->c) : 0);
}

static PyObject *KVCache_chunks(KVCacheObject *self, PyObject *arg) {
    int64_t g = 0;
    if (!self->c) return raise_status(DHSA_EINVAL, "KVCache");
    if (parse_required_int(arg, "group", 0, &g) < 0) return NULL;
    const int64_t *b;
    int64_t nb;
    if (g >= self->B * self->CG || dhsa_kv_cache_chunks(self->c, g, &b, &nb) != DHSA_OK) {
        PyErr_Format(PyExc_ValueError, "group must be in [0, %lld), got %lld",
                     (long long)(self->B * self->CG), (long long)g);
        return NULL;
    }
    npy_intp n = (npy_intp)nb;
    PyObject *arr = PyArray_SimpleNew(1, &n, NPY_INT64);
    if (arr) memcpy(PyArray_DATA((PyArrayObject *)arr), b, (size_t)nb * sizeof(int64_t));
    return arr;
}

static PyObject *KVCache_prefill_bounds(KVCacheObject *self, PyObject *unused) {
    (void)unused;
    if (!self->c) return raise_status(DHSA_EINVAL, "KVCache");
    const int64_t L = dhsa_kv_cache_length(self->c), n = self->B * self->CG;
    if (L < 1) {
        PyErr_SetString(PyExc_ValueError, "KVCache is empty");
        return NULL;
    }
    npy_intp dims[2] = {(npy_intp)n, (npy_intp)(L + 1)}, nn = (npy_intp)n;
    PyObject *b = PyArray_SimpleNew(2, dims, NPY_INT64), *nb = PyArray_SimpleNew(1, &nn, NPY_INT64);
    if (!b || !nb) { Py_XDECREF(b); Py_XDECREF(nb); return NULL; }
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_kv_cache_prefill_bounds(self->c, PyArray_DATA((PyArrayObject *)b),
                                      PyArray_DATA((PyArrayObject *)nb));
    Py_END_ALLOW_THREADS
    if (st != DHSA_OK) { Py_DECREF(b); Py_DECREF(nb); return raise_status(st, "KVCache"); }
    return Py_BuildValue("NN", b, nb);
}

static PyObject *KVCache_read(KVCacheObject *self, PyObject *args) {
    long long a = 0, e = 0;
    if (!PyArg_ParseTuple(args, "LL", &a, &e)) return NULL;
    if (!self->c) return raise_status(DHSA_EINVAL, "KVCache");
    const int64_t L = dhsa_kv_cache_length(self->c);
    if (a < 0 || e < a || e > L) {
        PyErr_Format(PyExc_ValueError, "positions [%lld, %lld) are not inside [0, %lld)", a, e,
                     (long long)L);
        return NULL;
    }
    npy_intp dims[4] = {(npy_intp)self->B, (npy_intp)self->Hkv, (npy_intp)(e - a),
                        (npy_intp)self->D};
    const int t = self->half ? NPY_FLOAT16 : NPY_FLOAT32;
    PyObject *k = PyArray_SimpleNew(4, dims, t), *v = PyArray_SimpleNew(4, dims, t);
    if (!k || !v) { Py_XDECREF(k); Py_XDECREF(v); return NULL; }
    dhsa_kv_cache_read(self->c, PyArray_DATA((PyArrayObject *)k),
                       PyArray_DATA((PyArrayObject *)v), a, e);
    return Py_BuildValue("NN", k, v);
}

static PyObject *KVCache_crop(KVCacheObject *self, PyObject *arg) {
    int64_t n = 0;
    if (!self->c) return raise_status(DHSA_EINVAL, "KVCache");
    if (parse_required_int(arg, "length", 0, &n) < 0) return NULL;
    if (n > dhsa_kv_cache_length(self->c)) {
        PyErr_Format(PyExc_ValueError, "length must be <= the cache's %lld keys, got %lld",
                     (long long)dhsa_kv_cache_length(self->c), (long long)n);
        return NULL;
    }
    if (cache_acquire(self) < 0) return NULL;
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_kv_cache_crop(self->c, n);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st != DHSA_OK) return raise_status(st, "KVCache.crop");
    Py_RETURN_NONE;
}

static PyObject *KVCache_reorder(KVCacheObject *self, PyObject *arg) {
    if (!self->c) return raise_status(DHSA_EINVAL, "KVCache");
    PyArrayObject *idx = as_index_array(arg, "index", NPY_INT64);
    if (!idx) return NULL;
    const int64_t n = PyArray_SIZE(idx);
    const int64_t *d = PyArray_DATA(idx);
    for (int64_t i = 0; i < n; i++)
        if (d[i] < 0 || d[i] >= self->B) {
            PyErr_Format(PyExc_ValueError, "index[%lld] = %lld is not a batch item of the cache "
                         "(batch %lld)", (long long)i, (long long)d[i], (long long)self->B);
            Py_DECREF(idx);
            return NULL;
        }
    if (n < 1) {
        PyErr_SetString(PyExc_ValueError, "index must not be empty");
        Py_DECREF(idx);
        return NULL;
    }
    if (cache_acquire(self) < 0) { Py_DECREF(idx); return NULL; }
    int st;
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_kv_cache_reorder(self->c, d, n);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    Py_DECREF(idx);
    if (st != DHSA_OK) return raise_status(st, "KVCache.reorder");
    self->B = n;
    Py_RETURN_NONE;
}

static PyObject *KVCache_nbytes(KVCacheObject *self, PyObject *unused) {
    (void)unused;
    int64_t kv = 0, state = 0;
    if (self->c) dhsa_kv_cache_bytes(self->c, &kv, &state);
    return Py_BuildValue("LL", (long long)kv, (long long)state);
}

static PyMethodDef KVCache_methods[] = {
    {"append", (PyCFunction)(void (*)(void))KVCache_append, METH_VARARGS | METH_KEYWORDS,
     "Append k, v (batch, num_kv_heads, n, head_dim)."},
    {"length", (PyCFunction)KVCache_length, METH_NOARGS, "Number of cached positions."},
    {"chunks", (PyCFunction)KVCache_chunks, METH_O, "Committed bounds of one chunking group."},
    {"prefill_bounds", (PyCFunction)KVCache_prefill_bounds, METH_NOARGS,
     "(bounds, num_bounds) of the prediction over every cached key."},
    {"read", (PyCFunction)KVCache_read, METH_VARARGS, "Copies of k, v at positions [a, b)."},
    {"crop", (PyCFunction)KVCache_crop, METH_O, "Keep the first n positions."},
    {"reorder", (PyCFunction)KVCache_reorder, METH_O, "New batch item i = old item index[i]."},
    {"nbytes", (PyCFunction)KVCache_nbytes, METH_NOARGS, "(K/V bytes, chunk state bytes)."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject KVCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dhsa._core.KVCache",
    .tp_basicsize = sizeof(KVCacheObject),
    .tp_dealloc = (destructor)KVCache_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A KV cache with DHSA's incremental chunk state (see dhsa.KVCache).",
    .tp_methods = KVCache_methods,
    .tp_init = (initproc)KVCache_init,
    .tp_new = PyType_GenericNew,
};

/* decode_attention(q, cache, *, budget, sink, local, reuse, scale, softcap, window,
 *                  num_threads, return_info) -> out or (out, dict as predict's
 *                  + reused_groups) */
static PyObject *py_decode_attention(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "cache", "budget", "sink", "local", "reuse", "scale",
                             "softcap", "window", "num_threads", "return_info", NULL};
    PyObject *q_in, *cache_in, *budget_in = Py_None, *sink_in = Py_None, *local_in = Py_None,
             *reuse_in = Py_None, *scale = Py_None,
             *softcap = Py_None, *window = Py_None, *threads = Py_None, *result = NULL;
    int return_info = 0, st, T = 1, tq = 0;
    PyArrayObject *q = NULL, *out = NULL;
    dhsa_prediction *pred = NULL;
    int64_t budget = 0, sink = 0, local = 0, reuse = 1, win = 0;
    double sc = 0.0, cap = 0.0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$OOOOOOOOp", kwlist, &q_in, &cache_in,
                                     &budget_in, &sink_in, &local_in, &reuse_in, &scale,
                                     &softcap, &window, &threads, &return_info))
        return NULL;
    if (!PyObject_TypeCheck(cache_in, &KVCacheType)) {
        PyErr_Format(PyExc_TypeError, "cache must be a KVCache, got %s", Py_TYPE(cache_in)->tp_name);
        return NULL;
    }
    KVCacheObject *cache = (KVCacheObject *)cache_in;
    if (!cache->c) return raise_status(DHSA_EINVAL, "KVCache");
    if (parse_required_int(budget_in, "budget", 0, &budget) < 0 ||
        parse_required_int(sink_in, "sink", 0, &sink) < 0 ||
        parse_required_int(local_in, "local", 0, &local) < 0 || parse_threads(threads, &T) < 0)
        return NULL;
    if (reuse_in != Py_None && parse_required_int(reuse_in, "reuse", 1, &reuse) < 0) return NULL;
    if (check_tensor(q_in, "q", &tq) < 0) return NULL;
    npy_intp *qs = PyArray_DIMS((PyArrayObject *)q_in);
    const int64_t L = dhsa_kv_cache_length(cache->c);
    if (qs[0] != cache->B) {
        PyErr_Format(PyExc_ValueError, "batch sizes differ: q has %zd, the cache %lld",
                     (Py_ssize_t)qs[0], (long long)cache->B);
        return NULL;
    }
    if (qs[3] != cache->D) {
        PyErr_Format(PyExc_ValueError, "head_dim differs: q has %zd, the cache %lld",
                     (Py_ssize_t)qs[3], (long long)cache->D);
        return NULL;
    }
    if (qs[1] % cache->Hkv != 0) {
        PyErr_Format(PyExc_ValueError, "q heads (%zd) must be a multiple of the cache's KV "
                     "heads (%lld)", (Py_ssize_t)qs[1], (long long)cache->Hkv);
        return NULL;
    }
    if (qs[2] > L) {
        PyErr_Format(PyExc_ValueError, "q length (%zd) must be <= the cache's length (%lld): "
                     "queries are the last cached positions", (Py_ssize_t)qs[2], (long long)L);
        return NULL;
    }
    if (parse_attn_options(scale, softcap, window, qs[3], &sc, &cap, &win) < 0) return NULL;
    if (!(q = as_contiguous(q_in, 0))) return NULL;
    npy_intp dims[4] = {qs[0], qs[1], qs[2], qs[3]};
    if (!(out = (PyArrayObject *)PyArray_SimpleNew(4, dims, NPY_FLOAT32))) goto done;
    if (cache_acquire(cache) < 0) goto done;
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_decode_attention(PyArray_DATA(out), return_info ? &pred : NULL, PyArray_DATA(q),
                               cache->c, dims[1], dims[2], (float)sc, (float)cap, win, budget,
                               sink, local, reuse, T);
    Py_END_ALLOW_THREADS
    cache->busy = 0;
    if (st == DHSA_ENONFINITE) {
        PyErr_SetString(PyExc_ValueError, "q contains NaN or Inf; DHSA rejects non-finite inputs");
        goto done;
    }
    if (st == DHSA_ERANGE) {
        PyErr_SetString(PyExc_ValueError, "decode_attention: q and the cached k are too large: "
                        "scale * head_dim * max|q| * max|k| exceeds 2**126");
        goto done;
    }
    if (st != DHSA_OK) { raise_status(st, "decode_attention"); goto done; }
    {
        /* float16 out only when q and the cache are both float16 (a float32
         * cache's values need not fit it) */
        PyObject *o = finish_output(out, tq == NPY_FLOAT16 && cache->half ? NPY_FLOAT16
                                                                          : NPY_FLOAT32);
        out = NULL;
        if (!o) goto done;
        if (!return_info) { result = o; goto done; }
        dhsa_attn_shape s = {cache->B, dims[1], cache->Hkv, dims[2], L, cache->D, (float)sc,
                             (float)cap, win, 1, cache->half};
        const long long reused = (long long)pred->reused_groups;
        PyObject *info = prediction_dict(pred, &s);
        pred = NULL;
        if (!info) { Py_DECREF(o); goto done; }
        PyObject *nr = PyLong_FromLongLong(reused);
        if (!nr || PyDict_SetItemString(info, "reused_groups", nr) < 0) {
            Py_XDECREF(nr); Py_DECREF(info); Py_DECREF(o); goto done;
        }
        Py_DECREF(nr);
        result = Py_BuildValue("NN", o, info);
    }
done:
    dhsa_prediction_free(pred);
    Py_XDECREF(q);
    Py_XDECREF(out);
    (void)self;
    return result;
}

/* ---- check_inputs -------------------------------------------------------- */

/* check_inputs(q, k, v=None, *, causal, scale, softcap, window, num_threads)
 * -> None: the argument conversion and the input scan every other entry point
 * runs, for code that computes in NumPy (the baselines) but must refuse bad
 * input the same way. */
static PyObject *py_check_inputs(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "k", "v", "causal", "scale", "softcap", "window",
                             "num_threads", NULL};
    PyObject *q, *k, *v = Py_None, *scale = Py_None, *softcap = Py_None, *window = Py_None,
             *threads = Py_None, *result = NULL;
    int causal = 1, st;
    attn_args a;
    memset(&a, 0, sizeof(a));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|O$pOOOO", kwlist, &q, &k, &v, &causal,
                                     &scale, &softcap, &window, &threads))
        return NULL;
    const int with_v = v != Py_None;
    if (attn_args_parse(&a, q, k, with_v ? v : NULL, causal, scale, softcap, window, threads,
                        with_v) < 0)
        goto done;
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_check_inputs(PyArray_DATA(a.q), PyArray_DATA(a.k),
                           a.v ? PyArray_DATA(a.v) : NULL, &a.shape, a.num_threads);
    Py_END_ALLOW_THREADS
    if (st != DHSA_OK) { attention_failed(st, &a, "check_inputs"); goto done; }
    result = Py_None;
    Py_INCREF(result);
done:
    attn_args_clear(&a);
    (void)self;
    return result;
}

/* ---- build information and switches ------------------------------------ */

static PyObject *py_build_info(PyObject *self, PyObject *unused) {
    (void)self; (void)unused;
    return Py_BuildValue("{s:s,s:s,s:s,s:O,s:s,s:s,s:i,s:s,s:s}", "version", DHSA_VERSION,
                         "simd_path", dhsa_simd_path(),
                         "tile_path_d64", dhsa_tile_path_name(dhsa_tile_path(64)),
                         "simd_available",
                         dhsa_simd_available() ? Py_True : Py_False, "blas", "OpenBLAS",
                         "blas_config", dhsa_blas_config(), "max_threads", dhsa_max_threads(),
                         "blas_core", dhsa_blas_corename(), "compiler",
#if defined(__clang__)
                         "clang " __clang_version__
#elif defined(__GNUC__)
                         "gcc " __VERSION__
#else
                         "unknown"
#endif
    );
}

static PyObject *py_force_scalar(PyObject *self, PyObject *arg) {
    int v = PyObject_IsTrue(arg);
    (void)self;
    if (v < 0) return NULL;
    dhsa_simd_force_scalar(v);
    Py_RETURN_NONE;
}

static PyObject *py_allow_avx512(PyObject *self, PyObject *arg) {
    int v = PyObject_IsTrue(arg);
    (void)self;
    if (v < 0) return NULL;
    dhsa_simd_allow_avx512(v);
    Py_RETURN_NONE;
}

/* tile_path(path=None, head_dim=64) -> name of the tile-product path in
 * effect for head_dim, after setting it when path is one of "auto",
 * "avx512f", "avx2-fma", "openblas", "scalar". */
static PyObject *py_tile_path(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"path", "head_dim", NULL};
    static const char *names[] = {"auto", "avx512f", "avx2-fma", "openblas", "scalar"};
    const char *name = NULL;
    long long D = 64;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|zL", kwlist, &name, &D)) return NULL;
    if (D < 1 || D > 256) {
        PyErr_Format(PyExc_ValueError, "head_dim must be in [1, 256], got %lld", D);
        return NULL;
    }
    if (name) {
        int found = -1;
        for (int i = 0; i < 5; i++)
            if (strcmp(name, names[i]) == 0) found = i;
        if (found < 0) {
            PyErr_Format(PyExc_ValueError, "path must be one of 'auto', 'avx512f', 'avx2-fma', "
                         "'openblas', 'scalar'; got '%s'", name);
            return NULL;
        }
        dhsa_tile_path_set(found); /* the names are in enum order */
    }
    return PyUnicode_FromString(dhsa_tile_path_name(dhsa_tile_path((int64_t)D)));
}

static PyMethodDef methods[] = {
    {"dense_attention", (PyCFunction)(void (*)(void))py_dense_attention,
     METH_VARARGS | METH_KEYWORDS, "Dense attention (see dhsa.dense_attention)."},
    {"sparse_attention", (PyCFunction)(void (*)(void))py_sparse_attention,
     METH_VARARGS | METH_KEYWORDS,
     "Sparse attention: predicted from a config in the same call, or over a given selection."},
    {"predict", (PyCFunction)(void (*)(void))py_predict, METH_VARARGS | METH_KEYWORDS,
     "DHSA sparsity prediction from a DHSAConfig: chunk bounds and per-block key ranges."},
    {"count_pairs", (PyCFunction)(void (*)(void))py_count_pairs, METH_VARARGS | METH_KEYWORDS,
     "Query-key pairs kept by a selection and allowed by the masks."},
    {"check_inputs", (PyCFunction)(void (*)(void))py_check_inputs, METH_VARARGS | METH_KEYWORDS,
     "The argument conversion and input scan of every call, without computing anything."},
    {"decode_attention", (PyCFunction)(void (*)(void))py_decode_attention,
     METH_VARARGS | METH_KEYWORDS, "Attention of the last queries over a KVCache (sparse decode)."},
    {"build_info", py_build_info, METH_NOARGS, "Build and run-time information."},
    {"force_scalar", py_force_scalar, METH_O,
     "Route the row kernels to their scalar twins and the tile products to OpenBLAS."},
    {"allow_avx512", py_allow_avx512, METH_O, "Allow the AVX-512 kernels where available."},
    {"tile_path", (PyCFunction)(void (*)(void))py_tile_path, METH_VARARGS | METH_KEYWORDS,
     "Set (optionally) and report the tile matrix-product path for a head_dim."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "dhsa._core",
                                       "C core of dhsa.", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    (void)dhsa_simd_available(); /* CPU features read once, before any thread */
    /* our threads call BLAS; BLAS itself must not spawn more */
    DHSA_BLAS(openblas_set_num_threads)(1);
    if (config_names_init() < 0) return NULL;
    if (PyType_Ready(&KVCacheType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    Py_INCREF(&KVCacheType);
    if (PyModule_AddObject(m, "KVCache", (PyObject *)&KVCacheType) < 0) {
        Py_DECREF(&KVCacheType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
