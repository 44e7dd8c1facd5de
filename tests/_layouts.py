"""Memory layouts for the reliability tests: the same values (or, for a
broadcast view, values constant along one axis) behind strides, offsets and
flags that the core must accept without copying mistakes.

``with_layout(x, kind, rng)`` returns an array equal in value to what it
shows; the tests always compare against ``np.array(view)``, so a layout that
changes the values (``broadcast``) is still checked exactly.
"""
from __future__ import annotations

import numpy as np

LAYOUTS = ("c", "fortran", "transposed", "sliced", "negative", "broadcast", "unaligned",
           "readonly", "bigendian")


def unaligned_copy(x: np.ndarray, offset: int) -> np.ndarray:
    """A copy of x whose data pointer is ``offset`` bytes past an aligned address."""
    x = np.asarray(x)
    nbytes = x.size * x.itemsize
    buf = np.empty(nbytes + 64 + offset, dtype=np.uint8)
    start = (-buf.ctypes.data) % 64 + offset  # 64-aligned, then pushed off by `offset`
    out = buf[start:start + nbytes].view(x.dtype).reshape(x.shape)
    out[...] = x
    if x.size and x.itemsize > 1 and offset % x.itemsize:
        assert not out.flags.aligned
    return out


def with_layout(x: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """x (4-D, C order) behind the memory layout ``kind`` (see LAYOUTS)."""
    if kind == "c":
        return np.ascontiguousarray(x)
    if kind == "fortran":
        return np.asfortranarray(x)
    if kind == "transposed":  # (B, L, H, D) storage seen as (B, H, L, D)
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    if kind == "sliced":  # every axis a step of 2 or 3 in a bigger buffer
        steps = tuple(int(s) for s in rng.integers(1, 4, size=4))
        big = np.zeros(tuple(n * s for n, s in zip(x.shape, steps)), dtype=x.dtype)
        view = big[tuple(slice(None, None, s) for s in steps)]
        view[...] = x
        return view
    if kind == "negative":  # reversed along length and head_dim
        return np.ascontiguousarray(x[:, :, ::-1, ::-1])[:, :, ::-1, ::-1]
    if kind == "broadcast":  # zero strides: one slice repeated along an axis
        axes = [a for a in range(4) if x.shape[a] > 1] or [3]
        axis = int(rng.choice(axes))
        one = np.take(x, [0], axis=axis)
        return np.broadcast_to(one, x.shape)
    if kind == "unaligned":
        return unaligned_copy(x, int(rng.integers(1, 4)))
    if kind == "readonly":
        y = x.copy()
        y.flags.writeable = False
        return y
    if kind == "bigendian":
        return x.astype(x.dtype.newbyteorder(">"))
    raise ValueError(kind)


def snapshot(*arrays):
    """Copies (values, dtype, shape, strides, flags) to check that nothing changed."""
    return [(np.array(a, copy=True), a.dtype, a.shape, a.strides, a.flags.writeable)
            for a in arrays]


def assert_unchanged(arrays, snap) -> None:
    for i, (a, (vals, dtype, shape, strides, writeable)) in enumerate(zip(arrays, snap)):
        assert a.dtype == dtype and a.shape == shape and a.strides == strides, f"input {i}"
        assert a.flags.writeable == writeable, f"input {i}: writeable flag changed"
        np.testing.assert_array_equal(a, vals, err_msg=f"input {i} was modified")
