/*
 * module.c - the CPython / NumPy layer over the C core (dhsa._core).
 *
 * The only file that sees Python.h. Each entry point converts and validates
 * every argument (type, dtype, shape, finiteness, option ranges) and raises
 * TypeError / ValueError naming the argument before any core function runs,
 * releases the GIL around the compute, and maps core status codes to
 * exceptions in one place (raise_status). One exit path per function.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>
#include <math.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "dhsa.h"
#include "internal.h"

/* ---- helpers ----------------------------------------------------------- */

static PyObject *raise_status(int status, const char *what) {
    PyObject *exc = PyExc_RuntimeError;
    if (status == DHSA_ENOMEM) return PyErr_NoMemory();
    if (status == DHSA_EINVAL || status == DHSA_ENONFINITE || status == DHSA_EOVERFLOW ||
        status == DHSA_ERANGE)
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

static int check_finite(PyArrayObject *a, const char *name, int num_threads) {
    int st;
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
    int tq = 0, tk = 0, tv = 0, given = 0;
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

    double sc = 1.0 / sqrt((double)qs[3]), cap = 0.0;
    int64_t win = 0;
    /* both become float32 in the core: keep them where float32 holds them
     * with room to spare, so no value silently turns into 0 or inf */
    if (parse_float_opt(scale, "scale", &sc, &given) < 0) return -1;
    if (!(sc >= 1e-30 && sc <= 1e30)) {
        PyErr_Format(PyExc_ValueError, "scale must be in [1e-30, 1e30], got %R", scale);
        return -1;
    }
    if (parse_float_opt(softcap, "softcap", &cap, &given) < 0) return -1;
    if (given && !(cap >= 1e-30 && cap <= 1e30)) {
        PyErr_Format(PyExc_ValueError, "softcap must be in [1e-30, 1e30] or None, got %R",
                     softcap);
        return -1;
    }
    if (parse_int_opt(window, "window", 1, &win, &given) < 0) return -1;
    /* a window of Lk keys or more hides nothing: clamp so that position
     * arithmetic in the core cannot overflow */
    if (win > ks[2]) win = ks[2];
    if (parse_threads(threads, &a->num_threads) < 0) return -1;
    a->shape.scale = (float)sc;
    a->shape.softcap = (float)cap;
    a->shape.window = win;

    /* the float32 copies (where needed) only now that every check passed */
    if (!(a->q = as_contiguous(q, 0)) || !(a->k = as_contiguous(k, need_v))) return -1;
    if (need_v && !(a->v = as_contiguous(v, 1))) return -1;
    /* the attention kernels scan their inputs themselves (one pass that also
     * bounds the values, see attention_failed); the prediction does not */
    if (!need_v && (check_finite(a->q, "q", a->num_threads) < 0 ||
                    check_finite(a->k, "k", a->num_threads) < 0))
        return -1;
    return 0;
}

/* Raise for a failed attention kernel, naming the argument where the status
 * is about one (the rescan runs on the error path only). */
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

static int parse_required_float(PyObject *obj, const char *name, double *out) {
    int given = 0;
    if (parse_float_opt(obj, name, out, &given) < 0) return -1;
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

/* ---- selections -------------------------------------------------------- */

/* A 1-D array of the given integer type, converted (copied if needed). */
static PyArrayObject *as_index_array(PyObject *obj, const char *name, int type) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    if (!PyArray_ISINTEGER((PyArrayObject *)obj)) {
        PyErr_Format(PyExc_TypeError, "%s must hold integers, got %R", name,
                     (PyObject *)PyArray_DESCR((PyArrayObject *)obj));
        return NULL;
    }
    if (PyArray_NDIM((PyArrayObject *)obj) != 1) {
        PyErr_Format(PyExc_ValueError, "%s must be 1-dimensional", name);
        return NULL;
    }
    return (PyArrayObject *)PyArray_FROMANY(obj, type, 1, 1,
                                            NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                                NPY_ARRAY_FORCECAST);
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

static int sel_args_parse(sel_args *s, PyObject *offsets, PyObject *starts, PyObject *ends,
                          PyObject *block_size, const dhsa_attn_shape *shape) {
    int64_t bs = 0;
    int given = 0;
    memset(s, 0, sizeof(*s));
    if (parse_int_opt(block_size, "block_size", 1, &bs, &given) < 0) return -1;
    if (!given) {
        PyErr_SetString(PyExc_TypeError, "block_size is required");
        return -1;
    }
    if (bs > shape->Lq) bs = shape->Lq; /* one block either way; no overflow below */
    /* range values are checked against [0, Lk) before the narrowing copy */
    PyArrayObject *raw_st = NULL, *raw_en = NULL;
    if (!(s->offsets = as_index_array(offsets, "offsets", NPY_INT64))) return -1;
    if (!(raw_st = as_index_array(starts, "starts", NPY_INT64))) return -1;
    if (!(raw_en = as_index_array(ends, "ends", NPY_INT64))) { Py_DECREF(raw_st); return -1; }
    const int64_t nst = PyArray_SIZE(raw_st), nen = PyArray_SIZE(raw_en);
    const int64_t *st64 = PyArray_DATA(raw_st), *en64 = PyArray_DATA(raw_en);
    int bad = nst != nen;
    for (int64_t i = 0; !bad && i < nst; i++)
        bad = st64[i] < 0 || en64[i] > shape->Lk || st64[i] >= en64[i];
    if (bad) {
        Py_DECREF(raw_st);
        Py_DECREF(raw_en);
        PyErr_SetString(PyExc_ValueError,
                        "starts and ends must have equal length with 0 <= start < end <= Lk");
        return -1;
    }
    s->starts = (PyArrayObject *)PyArray_FROMANY((PyObject *)raw_st, NPY_INT32, 1, 1,
                                                 NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_FORCECAST);
    s->ends = (PyArrayObject *)PyArray_FROMANY((PyObject *)raw_en, NPY_INT32, 1, 1,
                                               NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_FORCECAST);
    Py_DECREF(raw_st);
    Py_DECREF(raw_en);
    if (!s->starts || !s->ends) return -1;

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
    for (int64_t i = 0; i < nrows; i++)
        if (off[i + 1] < off[i]) {
            PyErr_SetString(PyExc_ValueError, "offsets must be non-decreasing");
            return -1;
        }
    s->sel.block_size = bs;
    s->sel.num_blocks = nqb;
    s->sel.num_groups = groups;
    s->sel.offsets = off;
    s->sel.starts = PyArray_DATA(s->starts);
    s->sel.ends = PyArray_DATA(s->ends);
    if (dhsa_selection_check(&s->sel, shape) != DHSA_OK) {
        PyErr_SetString(PyExc_ValueError,
                        "selection ranges must be sorted and non-overlapping within each block");
        return -1;
    }
    return 0;
}

static PyObject *py_sparse_attention(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "k", "v", "offsets", "starts", "ends", "block_size",
                             "causal", "scale", "softcap", "window", "num_threads", NULL};
    PyObject *q, *k, *v, *offsets, *starts, *ends, *block_size, *scale = Py_None,
             *softcap = Py_None, *window = Py_None, *threads = Py_None, *result = NULL;
    int causal = 1, st;
    attn_args a;
    sel_args s;
    PyArrayObject *out = NULL;
    memset(&a, 0, sizeof(a));
    memset(&s, 0, sizeof(s));
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOO|$pOOOO", kwlist, &q, &k, &v,
                                     &offsets, &starts, &ends, &block_size, &causal, &scale,
                                     &softcap, &window, &threads))
        return NULL;
    if (attn_args_parse(&a, q, k, v, causal, scale, softcap, window, threads, 1) < 0) goto done;
    if (sel_args_parse(&s, offsets, starts, ends, block_size, &a.shape) < 0) goto done;
    if (!(out = new_output(&a))) goto done;
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_attention_sparse((float *)PyArray_DATA(out), PyArray_DATA(a.q), PyArray_DATA(a.k),
                               PyArray_DATA(a.v), &a.shape, &s.sel, a.num_threads);
    Py_END_ALLOW_THREADS
    if (st != DHSA_OK) { attention_failed(st, &a, "sparse_attention"); goto done; }
    result = finish_output(out, a.dtype);
    out = NULL;
done:
    Py_XDECREF(out);
    attn_args_clear(&a);
    sel_args_clear(&s);
    (void)self;
    return result;
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

/* ---- predict ----------------------------------------------------------- */

/* predict(q, k, *, options...) -> dict of numpy arrays:
 *   bounds (B*CG, Lk+1) int64 and num_bounds (B*CG,): the chunking
 *   offsets (B*SG*NQB+1,), starts, ends (int32): the selection
 *   pairs_selected, pairs_allowed (B*SG,)
 *   chunk_scores (B*SG, NQB, max chunks) float64 or None */
static PyObject *py_predict(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "k", "causal", "scale", "window", "granularity",
                             "block_size", "sink", "local", "mode", "budget", "density",
                             "mass", "min_budget", "max_budget", "boundary_window",
                             "threshold", "min_len", "max_len", "nms_radius", "max_chunks",
                             "bounds", "num_bounds", "return_scores", "num_threads", "key_norm",
                             NULL};
    PyObject *q, *k, *scale = Py_None, *window = Py_None, *gran = NULL, *bsize = NULL,
             *sink = NULL, *local = NULL, *mode = NULL, *budget = NULL, *density = NULL,
             *mass = NULL, *minb = NULL, *maxb = NULL, *bwin = NULL, *thr = NULL, *minl = NULL,
             *maxl = NULL, *nms = NULL, *maxc = NULL,
             *bounds_in = Py_None, *nbounds_in = Py_None, *threads = Py_None, *knorm = Py_None,
             *result = NULL;
    int causal = 1, return_scores = 0, st = DHSA_OK;
    attn_args a;
    dhsa_predict_params p;
    int64_t tmp = 0;
    PyArrayObject *bounds = NULL, *nbounds = NULL, *cap = NULL, *counts = NULL, *st_buf = NULL,
                  *en_buf = NULL, *offsets = NULL, *starts = NULL, *ends = NULL,
                  *psel = NULL, *pall = NULL, *scores = NULL;
    memset(&a, 0, sizeof(a));
    memset(&p, 0, sizeof(p));
    if (!PyArg_ParseTupleAndKeywords(
            args, kwargs, "OO|$pOOOOOOOOOOOOOOOOOOOOpOO", kwlist, &q, &k, &causal, &scale, &window,
            &gran, &bsize, &sink, &local, &mode, &budget, &density, &mass, &minb, &maxb, &bwin,
            &thr, &minl, &maxl, &nms, &maxc, &bounds_in, &nbounds_in, &return_scores, &threads,
            &knorm))
        return NULL;
    if (attn_args_parse(&a, q, k, NULL, causal, scale, Py_None, window, threads, 0) < 0)
        goto done;
    if (parse_required_int(gran, "granularity", 0, &tmp) < 0) goto done;
    p.granularity = (int)DHSA_MIN(tmp, 3);
    if (parse_required_int(mode, "mode", 0, &tmp) < 0) goto done;
    p.mode = (int)DHSA_MIN(tmp, 3);
    if (parse_required_int(bsize, "block_size", 1, &p.block_size) < 0 ||
        parse_required_int(sink, "sink", 0, &p.sink) < 0 ||
        parse_required_int(local, "local", 0, &p.local) < 0 ||
        parse_required_int(budget, "budget", 1, &p.budget) < 0 ||
        parse_required_float(density, "density", &p.density) < 0 ||
        parse_required_float(mass, "mass", &p.mass) < 0 ||
        parse_required_int(minb, "min_budget", 1, &p.min_budget) < 0 ||
        parse_required_int(maxb, "max_budget", 1, &p.max_budget) < 0 ||
        parse_required_int(bwin, "boundary_window", 1, &p.boundary_window) < 0 ||
        parse_required_float(thr, "threshold", &p.chunking.threshold) < 0 ||
        parse_required_int(minl, "min_len", 1, &p.chunking.min_len) < 0 ||
        parse_required_int(maxl, "max_len", 1, &p.chunking.max_len) < 0 ||
        parse_required_int(nms, "nms_radius", 0, &p.chunking.nms_radius) < 0 ||
        parse_required_int(maxc, "max_chunks", 0, &p.chunking.max_chunks) < 0)
        goto done;
    {
        int given = 0;
        p.key_norm = 0.5;
        if (parse_float_opt(knorm, "key_norm", &p.key_norm, &given) < 0) goto done;
        if (!(p.key_norm >= 0.0 && p.key_norm <= 1.0)) {
            PyErr_SetString(PyExc_ValueError, "key_norm must be in [0, 1]");
            goto done;
        }
    }
    if (p.granularity > 2) { PyErr_SetString(PyExc_ValueError, "granularity must be 0, 1 or 2"); goto done; }
    if (p.mode > 2) { PyErr_SetString(PyExc_ValueError, "mode must be 0, 1 or 2"); goto done; }
    if (!(p.density > 0.0 && p.density <= 1.0)) { PyErr_SetString(PyExc_ValueError, "density must be in (0, 1]"); goto done; }
    if (!(p.mass > 0.0 && p.mass <= 1.0)) { PyErr_SetString(PyExc_ValueError, "mass must be in (0, 1]"); goto done; }
    if (p.max_budget < p.min_budget) { PyErr_SetString(PyExc_ValueError, "max_budget must be >= min_budget"); goto done; }
    if (p.chunking.max_len < p.chunking.min_len) { PyErr_SetString(PyExc_ValueError, "max_len must be >= min_len"); goto done; }

    /* Values past the sequence length mean the same as the length itself;
     * clamping keeps every position sum in the core far from overflow. */
    {
        const int64_t Lk = a.shape.Lk, Lq = a.shape.Lq;
        p.block_size = DHSA_MIN(p.block_size, Lq);
        p.sink = DHSA_MIN(p.sink, Lk);
        p.local = DHSA_MIN(p.local, Lk);
        p.budget = DHSA_MIN(p.budget, Lk);
        p.min_budget = DHSA_MIN(p.min_budget, Lk);
        p.max_budget = DHSA_MIN(p.max_budget, Lk);
        p.boundary_window = DHSA_MIN(p.boundary_window, Lk);
        p.chunking.min_len = DHSA_MIN(p.chunking.min_len, Lk);
        p.chunking.max_len = DHSA_MIN(p.chunking.max_len, Lk);
        p.chunking.nms_radius = DHSA_MIN(p.chunking.nms_radius, Lk);
        p.chunking.max_chunks = DHSA_MIN(p.chunking.max_chunks, Lk);
    }
    const dhsa_attn_shape *s = &a.shape;
    const int64_t CG = dhsa_predict_chunk_groups(s, &p), SG = dhsa_predict_select_groups(s, &p);
    const int64_t NQB = (s->Lq + p.block_size - 1) / p.block_size;
    npy_intp bdims[2] = {(npy_intp)(s->B * CG), (npy_intp)(s->Lk + 1)};
    if (bounds_in == Py_None) {
        if (!(bounds = (PyArrayObject *)PyArray_SimpleNew(2, bdims, NPY_INT64))) goto done;
        if (!(nbounds = (PyArrayObject *)PyArray_SimpleNew(1, bdims, NPY_INT64))) goto done;
        Py_BEGIN_ALLOW_THREADS
        st = dhsa_predict_boundaries(PyArray_DATA(bounds), PyArray_DATA(nbounds),
                                     PyArray_DATA(a.k), s, &p, a.num_threads);
        Py_END_ALLOW_THREADS
        if (st != DHSA_OK) { raise_status(st, "predict boundaries"); goto done; }
    } else {
        if (!PyArray_Check(bounds_in) || !PyArray_ISINTEGER((PyArrayObject *)bounds_in) ||
            !PyArray_Check(nbounds_in) || !PyArray_ISINTEGER((PyArrayObject *)nbounds_in)) {
            PyErr_SetString(PyExc_TypeError, "bounds and num_bounds must be integer ndarrays");
            goto done;
        }
        bounds = (PyArrayObject *)PyArray_FROMANY(bounds_in, NPY_INT64, 2, 2,
                                                  NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                                      NPY_ARRAY_FORCECAST);
        nbounds = (PyArrayObject *)PyArray_FROMANY(nbounds_in, NPY_INT64, 1, 1,
                                                   NPY_ARRAY_C_CONTIGUOUS | NPY_ARRAY_ALIGNED |
                                                       NPY_ARRAY_FORCECAST);
        if (!bounds || !nbounds) goto done;
        if (PyArray_DIM(bounds, 0) != bdims[0] || PyArray_DIM(bounds, 1) != bdims[1] ||
            PyArray_DIM(nbounds, 0) != bdims[0]) {
            PyErr_Format(PyExc_ValueError, "bounds must have shape (%zd, %zd)",
                         (Py_ssize_t)bdims[0], (Py_ssize_t)bdims[1]);
            goto done;
        }
        if (dhsa_predict_check_bounds(PyArray_DATA(bounds), PyArray_DATA(nbounds), s, &p) !=
            DHSA_OK) {
            PyErr_SetString(PyExc_ValueError,
                            "boundaries must start at 0, increase strictly and end at Lk");
            goto done;
        }
    }

    npy_intp nrows = (npy_intp)(s->B * SG * NQB), ncap = nrows + 1;
    if (!(cap = (PyArrayObject *)PyArray_SimpleNew(1, &ncap, NPY_INT64))) goto done;
    st = dhsa_predict_capacity(PyArray_DATA(cap), s, &p, PyArray_DATA(bounds),
                               PyArray_DATA(nbounds));
    if (st != DHSA_OK) { raise_status(st, "predict capacity"); goto done; }
    npy_intp total = (npy_intp)((int64_t *)PyArray_DATA(cap))[nrows];
    if (!(counts = (PyArrayObject *)PyArray_SimpleNew(1, &nrows, NPY_INT64))) goto done;
    if (!(st_buf = (PyArrayObject *)PyArray_SimpleNew(1, &total, NPY_INT32))) goto done;
    if (!(en_buf = (PyArrayObject *)PyArray_SimpleNew(1, &total, NPY_INT32))) goto done;
    int64_t ncmax = 1;
    const int64_t *nb = PyArray_DATA(nbounds);
    for (int64_t i = 0; i < s->B * CG; i++) ncmax = DHSA_MAX(ncmax, nb[i] - 1);
    if (return_scores) {
        npy_intp sdims[3] = {(npy_intp)(s->B * SG), (npy_intp)NQB, (npy_intp)ncmax};
        if (!(scores = (PyArrayObject *)PyArray_SimpleNew(3, sdims, NPY_FLOAT64))) goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    st = dhsa_predict_select(PyArray_DATA(st_buf), PyArray_DATA(en_buf), PyArray_DATA(counts),
                             scores ? PyArray_DATA(scores) : NULL, ncmax, PyArray_DATA(cap),
                             PyArray_DATA(a.q), PyArray_DATA(a.k), s, &p, PyArray_DATA(bounds),
                             PyArray_DATA(nbounds), a.num_threads);
    Py_END_ALLOW_THREADS
    if (st != DHSA_OK) { raise_status(st, "predict selection"); goto done; }

    /* compact the per-block capacity slots into CSR */
    {
        const int64_t *c = PyArray_DATA(counts), *cp = PyArray_DATA(cap);
        npy_intp nsel = 0;
        for (npy_intp i = 0; i < nrows; i++) nsel += (npy_intp)c[i];
        if (!(offsets = (PyArrayObject *)PyArray_SimpleNew(1, &ncap, NPY_INT64))) goto done;
        if (!(starts = (PyArrayObject *)PyArray_SimpleNew(1, &nsel, NPY_INT32))) goto done;
        if (!(ends = (PyArrayObject *)PyArray_SimpleNew(1, &nsel, NPY_INT32))) goto done;
        int64_t *off = PyArray_DATA(offsets);
        int32_t *so = PyArray_DATA(starts), *eo = PyArray_DATA(ends);
        const int32_t *si = PyArray_DATA(st_buf), *ei = PyArray_DATA(en_buf);
        off[0] = 0;
        for (npy_intp i = 0; i < nrows; i++) {
            memcpy(so + off[i], si + cp[i], (size_t)c[i] * sizeof(int32_t));
            memcpy(eo + off[i], ei + cp[i], (size_t)c[i] * sizeof(int32_t));
            off[i + 1] = off[i] + c[i];
        }
    }
    {
        dhsa_selection sel = {p.block_size, NQB, SG, PyArray_DATA(offsets), PyArray_DATA(starts),
                              PyArray_DATA(ends)};
        npy_intp ng = (npy_intp)(s->B * SG);
        if (!(psel = (PyArrayObject *)PyArray_SimpleNew(1, &ng, NPY_INT64))) goto done;
        if (!(pall = (PyArrayObject *)PyArray_SimpleNew(1, &ng, NPY_INT64))) goto done;
        Py_BEGIN_ALLOW_THREADS
        st = dhsa_selection_count_pairs(PyArray_DATA(psel), PyArray_DATA(pall), &sel, s,
                                        a.num_threads);
        Py_END_ALLOW_THREADS
        if (st != DHSA_OK) { raise_status(st, "predict count pairs"); goto done; }
    }
    result = Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:n,s:n}", "bounds", bounds,
                           "num_bounds", nbounds, "offsets", offsets, "starts", starts, "ends",
                           ends, "pairs_selected", psel, "pairs_allowed", pall, "chunk_scores",
                           scores ? (PyObject *)scores : Py_None, "chunk_groups", (Py_ssize_t)CG,
                           "select_groups", (Py_ssize_t)SG);
done:
    Py_XDECREF(bounds); Py_XDECREF(nbounds); Py_XDECREF(cap); Py_XDECREF(counts);
    Py_XDECREF(st_buf); Py_XDECREF(en_buf); Py_XDECREF(offsets); Py_XDECREF(starts);
    Py_XDECREF(ends); Py_XDECREF(psel); Py_XDECREF(pall); Py_XDECREF(scores);
    attn_args_clear(&a);
    (void)self;
    return result;
}

/* ---- build information, switches, machine rate ------------------------ */

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

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* sgemm_rate(n, num_threads, repeats) -> best GFLOP/s of C = A B (n x n),
 * rows of C split over the threads, single-threaded OpenBLAS in each. */
static PyObject *py_sgemm_rate(PyObject *self, PyObject *args) {
    int n = 0, threads = 1, repeats = 3;
    (void)self;
    if (!PyArg_ParseTuple(args, "ii|i", &n, &threads, &repeats)) return NULL;
    if (n < 16 || n > 16384 || threads < 1 || threads > 4096 || repeats < 1) {
        PyErr_SetString(PyExc_ValueError, "sgemm_rate: need 16 <= n <= 16384, threads >= 1, repeats >= 1");
        return NULL;
    }
    float *A = dhsa_alloc((size_t)n * n * sizeof(float));
    float *Bm = dhsa_alloc((size_t)n * n * sizeof(float));
    float *C = dhsa_alloc((size_t)n * n * sizeof(float));
    if (!A || !Bm || !C) { free(A); free(Bm); free(C); return PyErr_NoMemory(); }
    for (int64_t i = 0; i < (int64_t)n * n; i++) {
        A[i] = (float)((i * 7) % 13) * 0.01f;
        Bm[i] = (float)((i * 5) % 11) * 0.01f;
    }
    double best = 0.0;
    Py_BEGIN_ALLOW_THREADS
    for (int r = 0; r < repeats; r++) {
        double t0 = now_seconds();
#pragma omp parallel num_threads(threads)
        {
            int tid = 0, nt = 1;
#ifdef _OPENMP
            tid = omp_get_thread_num();
            nt = omp_get_num_threads();
#endif
            int r0 = (int)((int64_t)n * tid / nt), r1 = (int)((int64_t)n * (tid + 1) / nt);
            if (r1 > r0)
                dhsa_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, r1 - r0, n, n, 1.0f,
                           A + (int64_t)r0 * n, n, Bm, n, 0.0f, C + (int64_t)r0 * n, n);
        }
        double dt = now_seconds() - t0;
        double gf = 2.0 * n * (double)n * n / dt * 1e-9;
        if (gf > best) best = gf;
    }
    Py_END_ALLOW_THREADS
    free(A); free(Bm); free(C);
    return PyFloat_FromDouble(best);
}

static PyMethodDef methods[] = {
    {"dense_attention", (PyCFunction)(void (*)(void))py_dense_attention,
     METH_VARARGS | METH_KEYWORDS, "Dense attention (see dhsa.dense_attention)."},
    {"sparse_attention", (PyCFunction)(void (*)(void))py_sparse_attention,
     METH_VARARGS | METH_KEYWORDS, "Attention over a CSR selection of key ranges."},
    {"predict", (PyCFunction)(void (*)(void))py_predict, METH_VARARGS | METH_KEYWORDS,
     "DHSA sparsity prediction: chunk bounds and per-block key ranges."},
    {"count_pairs", (PyCFunction)(void (*)(void))py_count_pairs, METH_VARARGS | METH_KEYWORDS,
     "Query-key pairs kept by a selection and allowed by the masks."},
    {"build_info", py_build_info, METH_NOARGS, "Build and run-time information."},
    {"force_scalar", py_force_scalar, METH_O, "Route every kernel to its scalar twin."},
    {"allow_avx512", py_allow_avx512, METH_O, "Allow the AVX-512 kernels where available."},
    {"tile_path", (PyCFunction)(void (*)(void))py_tile_path, METH_VARARGS | METH_KEYWORDS,
     "Set (optionally) and report the tile matrix-product path for a head_dim."},
    {"sgemm_rate", py_sgemm_rate, METH_VARARGS, "Measured OpenBLAS sgemm GFLOP/s."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "dhsa._core",
                                       "C core of dhsa.", -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__core(void) {
    import_array();
    (void)dhsa_simd_available(); /* CPU features read once, before any thread */
    /* our threads call BLAS; BLAS itself must not spawn more */
    DHSA_BLAS(openblas_set_num_threads)(1);
    return PyModule_Create(&moduledef);
}
