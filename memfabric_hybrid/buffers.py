"""Memory objects accepted wherever an address is taken.

Every API that takes an address (and a size) also takes, in place of the int:
- a torch tensor (``data_ptr()``, ``nbytes``; CPU here, CUDA once a device backend exists),
- a numpy array (``__array_interface__``),
- ``bytearray``, ``memoryview``, ``mmap.mmap`` or any object with the buffer protocol
  (``bytes`` and other read-only buffers only as a source).

The memory must be contiguous; a destination must be writable. The object is kept alive by
the call (and, for ``register_memory``, until ``unregister_memory``), so a buffer dropped by the
caller while registered is never freed under a transfer.

>>> import numpy as np, memfabric_hybrid as mf
>>> a = np.zeros(1024, dtype=np.uint8)
>>> addr, nbytes, owner = mf.buffers.buffer_info(a, writable=True)
>>> nbytes
1024
"""

from __future__ import annotations

import ctypes
from typing import Any, Tuple


def buffer_info(obj: Any, writable: bool) -> Tuple[int, int, Any]:
    """(address, size in bytes, object to keep alive) of a contiguous memory object.

    Raises TypeError for objects that hold no memory (str, float, ...), ValueError for
    non-contiguous or read-only-where-written memory, and for device memory with no backend.
    """
    if isinstance(obj, (bool, float, complex, str)):
        raise TypeError(f"expected an address (int) or a memory object, not {type(obj).__name__}")
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_contiguous"):  # torch.Tensor
        if not obj.is_contiguous():
            raise ValueError("the tensor is not contiguous: pass tensor.contiguous() (a copy) or a contiguous view")
        device = getattr(getattr(obj, "device", None), "type", "cpu")
        if device != "cpu":
            raise ValueError(f"a {device} tensor needs a device backend, and none is present on this host")
        return int(obj.data_ptr()), int(obj.numel() * obj.element_size()), obj
    iface = getattr(obj, "__array_interface__", None)
    if iface is not None:  # numpy and friends
        flags = getattr(obj, "flags", None)
        if flags is not None and not flags["C_CONTIGUOUS"]:
            raise ValueError("the array is not C-contiguous: pass numpy.ascontiguousarray(a)")
        ptr, readonly = iface["data"]
        if writable and readonly:
            raise ValueError("the array is read-only and cannot be a destination")
        return int(ptr), int(obj.nbytes), obj
    try:
        view = memoryview(obj)
    except TypeError:
        raise TypeError(
            f"expected an address (int), a tensor, an array or a buffer, not {type(obj).__name__}"
        ) from None
    if not view.contiguous:
        raise ValueError("the buffer is not contiguous")
    if view.readonly:
        if writable:
            raise ValueError(f"the {type(obj).__name__} is read-only and cannot be a destination")
        if isinstance(obj, bytes):
            return ctypes.cast(ctypes.c_char_p(obj), ctypes.c_void_p).value or 0, len(obj), obj
        try:
            import numpy as np
        except ImportError:
            raise TypeError("a read-only buffer other than bytes needs numpy to find its address") from None
        arr = np.frombuffer(view, dtype=np.uint8)
        return int(arr.__array_interface__["data"][0]), view.nbytes, (obj, arr)
    if view.nbytes == 0:
        return 0, 0, obj
    cbuf = (ctypes.c_char * view.nbytes).from_buffer(view)
    return ctypes.addressof(cbuf), view.nbytes, (obj, view, cbuf)
