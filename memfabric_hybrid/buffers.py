"""Memory objects accepted wherever an address is taken.

Every API that takes an address (and a size) also takes, in place of the int:
- a torch tensor (``data_ptr()``, ``nbytes``; CPU, or CUDA where the CUDA backend loaded:
  see ``mf.device_info()``),
- a numpy array (``__array_interface__``),
- any object with ``__dlpack__`` (CuPy, JAX, TensorFlow, PaddlePaddle, ...): the DLPack capsule
  gives the device, pointer, byte offset, shape and strides; host memory (kDLCPU,
  kDLCUDAHost, kDLCUDAManaged), and CUDA device memory (kDLCUDA) where the CUDA backend loaded,
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

    Example:
        >>> addr, nbytes, owner = buffer_info(bytearray(4096), writable=True)
        >>> nbytes
        4096
    """
    if isinstance(obj, (bool, float, complex, str)):
        raise TypeError(f"expected an address (int) or a memory object, not {type(obj).__name__}")
    if hasattr(obj, "data_ptr") and hasattr(obj, "is_contiguous"):  # torch.Tensor
        if not obj.is_contiguous():
            raise ValueError("the tensor is not contiguous: pass tensor.contiguous() (a copy) or a contiguous view")
        device = getattr(getattr(obj, "device", None), "type", "cpu")
        if device != "cpu":
            _need_backend(device)
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
    if hasattr(obj, "__dlpack__") and not isinstance(obj, (bytes, bytearray, memoryview)):
        return _dlpack_info(obj, writable)
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


# --- DLPack -------------------------------------------------------------------------------
# The C structs of dlpack.h (v0.8 legacy and v1.x versioned). The capsule is read, never
# consumed: left unconsumed, its destructor runs the producer's deleter, so holding the capsule
# holds the memory for as long as the call (or registration) needs it.

_KDL_CPU, _KDL_CUDA, _KDL_CUDA_HOST, _KDL_CUDA_MANAGED = 1, 2, 3, 13
_HOST_DEVICES = {_KDL_CPU, _KDL_CUDA_HOST, _KDL_CUDA_MANAGED}
_DEVICE_NAMES = {2: "CUDA", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 9: "VPI", 10: "ROCm", 14: "oneAPI"}
_FLAG_READ_ONLY = 1


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class _DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", _DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", _DLTensor),
    ]


_capsule_name = ctypes.pythonapi.PyCapsule_GetName
_capsule_name.restype = ctypes.c_char_p
_capsule_name.argtypes = [ctypes.py_object]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _dlpack_info(obj: Any, writable: bool) -> Tuple[int, int, Any]:
    """(address, size, owner) of an object exporting ``__dlpack__``."""
    device = getattr(obj, "__dlpack_device__", None)
    if device is not None:
        _need_dlpack_backend(int(device()[0]))
    try:
        capsule = obj.__dlpack__(max_version=(1, 0))
    except TypeError:  # a producer older than DLPack 1.0
        capsule = obj.__dlpack__()
    except BufferError as e:
        raise ValueError(f"the object refused to export its memory through DLPack: {e}") from None
    name = _capsule_name(capsule)
    if name == b"dltensor_versioned":
        managed = _DLManagedTensorVersioned.from_address(_capsule_pointer(capsule, name))
        if writable and managed.flags & _FLAG_READ_ONLY:
            raise ValueError("the DLPack tensor is read-only and cannot be a destination")
    elif name == b"dltensor":
        managed = _DLManagedTensor.from_address(_capsule_pointer(capsule, name))
    else:
        raise TypeError(f"__dlpack__ returned a capsule named {name!r}, not a DLPack tensor")
    t = managed.dl_tensor
    _need_dlpack_backend(int(t.device.device_type))
    if t.dtype.bits % 8:
        raise ValueError(f"DLPack elements of {t.dtype.bits} bits are not whole bytes")
    shape = [t.shape[i] for i in range(t.ndim)]
    itemsize = t.dtype.bits // 8 * max(t.dtype.lanes, 1)
    numel = 1
    for d in shape:
        numel *= d
    if t.strides and numel > 1:
        expected = 1
        for i in reversed(range(t.ndim)):
            if shape[i] != 1 and t.strides[i] != expected:
                raise ValueError(
                    f"the DLPack tensor is not contiguous (shape {shape}, strides "
                    f"{[t.strides[k] for k in range(t.ndim)]}): pass a contiguous copy"
                )
            expected *= shape[i]
    addr = (t.data or 0) + t.byte_offset
    return addr, numel * itemsize, (obj, capsule)


# torch device type / DLPack device type -> the backend that moves that memory.
_TORCH_BACKENDS = {"cuda": "cuda", "npu": "ascend"}


def _backend_reason(backend: str) -> str:
    """'' when `backend` loaded in this process, else why not (from ``device_info()``)."""
    from . import _native

    entry = _native.device_info().get(backend, {})
    return "" if entry.get("available") else str(entry.get("reason", f"no {backend} backend"))


def _need_backend(torch_device: str) -> None:
    backend = _TORCH_BACKENDS.get(torch_device)
    if backend is None:
        raise ValueError(f"a {torch_device} tensor is not memory this library can move (host, CUDA or Ascend)")
    why = _backend_reason(backend)
    if why:
        raise ValueError(f"a {torch_device} tensor needs the {backend} backend, which is not available here: {why}")


def _need_dlpack_backend(dev_type: int) -> None:
    if dev_type in _HOST_DEVICES:
        return
    if dev_type == _KDL_CUDA:
        why = _backend_reason("cuda")
        if not why:
            return
        raise ValueError(f"a CUDA DLPack tensor needs the cuda backend, which is not available here: {why}")
    name = _DEVICE_NAMES.get(dev_type, f"device type {dev_type}")
    raise ValueError(f"a {name} DLPack tensor is not memory this library can move (host or CUDA)")
