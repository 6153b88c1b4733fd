"""Decompression scatter: the host code of ``cuda/codec.cu``."""

from __future__ import annotations

from typing import Any

import numpy as np

from moecore.kernels.cuda.launch import (
    THREADS,
    Backend,
    check_array,
    i32,
    launch_grid,
    resolve_backend,
)


def scatter(
    out: Any,
    idx: Any,
    values: Any,
    *,
    scale: float = 1.0,
    add: bool = False,
    backend: Backend | None = None,
) -> Any:
    """``out[idx] = values`` (after zeroing ``out``) or ``out[idx] += scale * values``.

    ``idx`` int32, strictly increasing and in range (as a decoded payload's are: checked by the
    codec on the host), ``values`` float32 of the same length. Returns ``out``.
    """
    be = resolve_backend(backend)
    flat = check_array(be, out, "out", np.float32).reshape(-1)
    idx = check_array(be, idx, "idx", np.int32, 1)
    values = check_array(be, values, "values", np.float32, 1)
    if idx.size != values.size:
        raise ValueError(f"idx has {idx.size} entries, values {values.size}")
    n, k = int(flat.size), int(idx.size)
    if not add:
        flat.fill(0)
    if k == 0:
        return out
    if add:
        be.launch(
            "codec",
            "codec_scatter_add",
            (launch_grid(k),),
            (THREADS,),
            flat,
            i32(n),
            idx,
            values,
            i32(k),
            np.float32(scale),
        )
    else:
        be.launch(
            "codec",
            "codec_scatter",
            (launch_grid(k),),
            (THREADS,),
            flat,
            i32(n),
            idx,
            values,
            i32(k),
        )
    return out
