"""The `.npy` codec of every shard member: numpy's format, no pickles.

`load_npy` parses the header itself and returns a view on the bytes: np.load parses the header with
ast.literal_eval, which was a third of the data loader's time. Unusual headers (Fortran order, object
dtypes, other versions) go through np.load, which refuses pickles.
"""

from __future__ import annotations

import io
import re

import numpy as np

_NPY_HEADER = re.compile(
    rb"'descr':\s*'([^']+)',\s*'fortran_order':\s*(True|False),\s*'shape':\s*\(([^)]*)\)"
)


def npy_bytes(array: np.ndarray) -> bytes:
    """An array in numpy's .npy format (what webdataset decodes `.npy` members with)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes | bytearray) -> np.ndarray:
    """Decode .npy bytes (no pickles) as a view on `data`; falls back to numpy for unusual headers."""
    if not isinstance(data, bytearray):
        data = bytearray(data)  # writable, so torch can wrap the arrays without warnings
    if data[:6] == b"\x93NUMPY" and data[6] in (1, 2):
        hlen_size = 2 if data[6] == 1 else 4
        hlen = int.from_bytes(data[8 : 8 + hlen_size], "little")
        start = 8 + hlen_size
        m = _NPY_HEADER.search(data[start : start + hlen])
        if m and m.group(2) == b"False":
            shape = tuple(int(x) for x in m.group(3).split(b",") if x.strip())
            dtype = np.dtype(m.group(1).decode())
            if not dtype.hasobject:
                return np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=start + hlen).reshape(
                    shape
                )
    return np.load(io.BytesIO(data), allow_pickle=False)
