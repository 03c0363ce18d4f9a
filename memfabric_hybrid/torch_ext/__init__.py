"""Paged KV caches on the Transfer Engine: register a cache, share its layout through the
config store, and move a request's blocks to a peer in one batched transfer.

A paged KV cache (vLLM, SGLang, ...) is one or more tensors with a *block* dimension: e.g. one
tensor ``[layers, num_blocks, block_size, heads, head_dim]`` (``block_dim=1``), or one tensor
per layer ``[2, num_blocks, block_size, heads, head_dim]`` (K and V planes, ``block_dim=1``),
or ``[num_blocks, block_size, heads, head_dim]`` (``block_dim=0``). Everything before the block
dimension is enumerated into *segments* (one per layer and plane); everything after it is one
block, which must be contiguous. Works with torch CPU tensors and numpy arrays, and with torch
CUDA tensors where the CUDA backend loaded (the Transfer Engine's device paths ran on a GPU;
this module's CUDA use has not yet).

Example (prefill side, then decode side):

>>> import memfabric_hybrid as mf
>>> from memfabric_hybrid import torch_ext
>>> layout = torch_ext.register_kv_cache(engine, kv, block_dim=1)
>>> torch_ext.publish_kv_layout(store, "kv/prefill-0", layout)
>>> peer = torch_ext.fetch_kv_layout(store, "kv/decode-0")
>>> torch_ext.transfer_blocks(engine, peer, [3, 4, 5], [10, 11, 12])
0
"""

from __future__ import annotations

import itertools
import json
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from .._types import TransferOpcode

__all__ = [
    "KvCacheLayout",
    "describe_kv_cache",
    "register_kv_cache",
    "unregister_kv_cache",
    "publish_kv_layout",
    "fetch_kv_layout",
    "connect_kv_peer",
    "transfer_blocks",
]

Segment = Tuple[int, int, int, int]  # (address, num_blocks, block_stride, block_bytes)


@dataclass(frozen=True)
class KvCacheLayout:
    """Where a KV cache's blocks are: ``segments`` of ``(address, num_blocks, block_stride,
    block_bytes)``, one per layer (and K/V plane), in the same order on every engine of a
    model. ``session_id`` names the engine that owns the memory ("" until registered).

    Example:
        >>> layout = describe_kv_cache(torch.zeros(2, 8, 16, 4, 64), block_dim=1)
        >>> layout.num_blocks, len(layout.segments), layout.bytes_per_block
        (8, 2, 16384)
    """

    segments: Tuple[Segment, ...]
    num_blocks: int
    session_id: str = ""
    _spans: Tuple[Tuple[int, int], ...] = field(default=(), repr=False, compare=False)

    @property
    def bytes_per_block(self) -> int:
        """Bytes one block id stands for, over all segments."""
        return sum(s[3] for s in self.segments)

    def to_bytes(self) -> bytes:
        """The layout as JSON (what ``publish_kv_layout`` stores).

        Example:
            >>> KvCacheLayout.from_bytes(layout.to_bytes()) == layout
            True
        """
        return json.dumps(
            {"version": 1, "session_id": self.session_id, "num_blocks": self.num_blocks,
             "segments": [list(s) for s in self.segments]}
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "KvCacheLayout":
        """Parse ``to_bytes()`` output; ValueError for anything else."""
        try:
            d = json.loads(data)
            if d.get("version") != 1:
                raise ValueError(f"layout version {d.get('version')!r} (this library reads 1)")
            segs = tuple(tuple(int(v) for v in s) for s in d["segments"])
            if any(len(s) != 4 or min(s) < 0 for s in segs):
                raise ValueError("a segment is not 4 non-negative ints")
            return cls(segs, int(d["num_blocks"]), str(d["session_id"]))  # type: ignore[arg-type]
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"not a KV-cache layout: {e}") from None


def _geometry(t: Any) -> Tuple[int, List[int], List[int], int]:
    """(base address, shape, byte strides, element size) of a torch tensor or numpy array."""
    if hasattr(t, "data_ptr") and hasattr(t, "stride"):  # torch.Tensor
        device = getattr(getattr(t, "device", None), "type", "cpu")
        if device != "cpu":
            from ..buffers import _need_backend

            _need_backend(device)
        es = int(t.element_size())
        return int(t.data_ptr()), [int(d) for d in t.shape], [int(s) * es for s in t.stride()], es
    iface = getattr(t, "__array_interface__", None)
    if iface is not None:
        if iface["data"][1]:
            raise ValueError("the array is read-only; a KV cache must be writable")
        strides = getattr(t, "strides", None)
        return int(iface["data"][0]), [int(d) for d in t.shape], [int(s) for s in strides], int(t.itemsize)
    raise TypeError(f"expected a torch tensor or a numpy array, not {type(t).__name__}")


def _tensor_segments(t: Any, block_dim: int) -> Tuple[List[Segment], int, Tuple[int, int]]:
    base, shape, strides, es = _geometry(t)
    nd = len(shape)
    if not -nd <= block_dim < nd:
        raise ValueError(f"block_dim {block_dim} is out of range for a {nd}-dimensional tensor")
    k = block_dim % nd
    if any(s < 0 for s in strides):
        raise ValueError("negative strides are not supported in a KV cache")
    expected = es
    for i in range(nd - 1, k, -1):
        if shape[i] != 1 and strides[i] != expected:
            raise ValueError(
                f"a block (dimensions {k + 1}.. of shape {shape}) is not contiguous (strides {strides})"
            )
        expected *= shape[i]
    block_bytes = expected
    num_blocks = shape[k]
    stride = strides[k] if num_blocks > 1 else block_bytes
    if num_blocks == 0 or block_bytes == 0:
        raise ValueError(f"the cache is empty (shape {shape})")
    if stride < block_bytes:
        raise ValueError(f"blocks overlap: block stride {stride} < block size {block_bytes}")
    segs = []
    for idx in itertools.product(*(range(d) for d in shape[:k])):
        addr = base + sum(i * strides[j] for j, i in enumerate(idx))
        segs.append((addr, num_blocks, stride, block_bytes))
    end = base + sum((d - 1) * s for d, s in zip(shape, strides)) + es
    return segs, num_blocks, (base, end)


def _as_list(tensors: Any) -> List[Any]:
    if isinstance(tensors, (list, tuple)):
        if not tensors:
            raise ValueError("no tensors given")
        return list(tensors)
    return [tensors]


def describe_kv_cache(tensors: Any, block_dim: int = 0) -> KvCacheLayout:
    """The layout of ``tensors`` (one tensor or a list, e.g. one per layer) without registering
    anything. Every tensor must have the same number of blocks along ``block_dim``.

    Example:
        >>> describe_kv_cache(np.zeros((4, 16, 1024), np.uint8), block_dim=1).segments[0][1:]
        (16, 1024, 1024)
    """
    segments: List[Segment] = []
    spans: List[Tuple[int, int]] = []
    num_blocks: Optional[int] = None
    for t in _as_list(tensors):
        segs, nb, span = _tensor_segments(t, block_dim)
        if num_blocks is not None and nb != num_blocks:
            raise ValueError(f"tensors disagree on the number of blocks ({num_blocks} and {nb})")
        num_blocks = nb
        segments.extend(segs)
        spans.append(span)
    # Views of one allocation register once: merge overlapping or touching spans.
    merged: List[List[int]] = []
    for s, e in sorted(spans):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    assert num_blocks is not None
    return KvCacheLayout(tuple(segments), num_blocks, "", tuple((s, e) for s, e in merged))


class _EngineKv:
    """What torch_ext remembers per engine: its registered caches and peers' layouts."""

    def __init__(self) -> None:
        self.local: Optional[KvCacheLayout] = None
        self.owners: Dict[int, Any] = {}
        self.peers: Dict[str, KvCacheLayout] = {}


_STATE: "weakref.WeakKeyDictionary[Any, _EngineKv]" = weakref.WeakKeyDictionary()


def _state(engine: Any) -> _EngineKv:
    st = _STATE.get(engine)
    if st is None:
        st = _STATE[engine] = _EngineKv()
    return st


def register_kv_cache(engine: Any, tensors: Any, block_dim: int = 0) -> KvCacheLayout:
    """Register a KV cache with ``engine`` (an initialized ``TransferEngine``) and make it the
    engine's local cache for ``transfer_blocks``. The tensors are kept alive until
    ``unregister_kv_cache`` (or until the engine is gone). Raises ``MemFabricError`` if the
    engine refuses the memory (e.g. overlapping an earlier registration).

    Example:
        >>> kv = torch.zeros(32, 256, 16, 8, 128, dtype=torch.float16)  # layers x blocks x ...
        >>> layout = register_kv_cache(engine, kv, block_dim=1)
        >>> len(layout.segments), layout.bytes_per_block
        (32, 1048576)
    """
    from .. import MemFabricError, get_last_err_msg

    layout = describe_kv_cache(tensors, block_dim)
    st = _state(engine)
    if st.local is not None:
        raise ValueError("this engine already has a registered KV cache: unregister_kv_cache() it first")
    done: List[int] = []
    for start, end in layout._spans:
        rc = engine.register_memory(start, end - start)
        if rc != 0:
            for s in done:
                engine.unregister_memory(s)
            err = MemFabricError(f"registering the KV cache failed ({rc}): {get_last_err_msg()}")
            err.code = rc  # type: ignore[attr-defined]
            raise err
        done.append(start)
    st.owners = {id(t): t for t in _as_list(tensors)}
    local = KvCacheLayout(layout.segments, layout.num_blocks, engine.session_id, layout._spans)
    st.local = local
    return local


def unregister_kv_cache(engine: Any) -> int:
    """Unregister the engine's KV cache and release its tensors. Returns 0 or the first error
    code of ``unregister_memory``.

    Example:
        >>> unregister_kv_cache(engine)
        0
    """
    st = _state(engine)
    if st.local is None:
        return 0
    rc = 0
    for start, _ in st.local._spans:
        r = engine.unregister_memory(start)
        rc = rc or r
    st.local, st.owners = None, {}
    return rc


def publish_kv_layout(store: Any, key: str, layout: KvCacheLayout) -> None:
    """Put ``layout`` in the config store under ``key`` (``store`` a ``mf.StoreClient``), for
    peers to ``fetch_kv_layout``.

    Example:
        >>> publish_kv_layout(mf.StoreClient(url), "kv/decode-0", layout)
    """
    if not layout.session_id:
        raise ValueError("the layout names no engine: publish the one register_kv_cache returned")
    store.set(key, layout.to_bytes())


def fetch_kv_layout(store: Any, key: str, timeout: Optional[float] = None) -> KvCacheLayout:
    """Wait (up to ``timeout`` seconds, default the store client's) for the layout under
    ``key`` and return it. Raises ``StoreTimeoutError`` if it never appears.

    Example:
        >>> peer = fetch_kv_layout(mf.StoreClient(url), "kv/decode-0", timeout=30)
    """
    return KvCacheLayout.from_bytes(store.get(key, True, timeout))


def connect_kv_peer(engine: Any, layout: KvCacheLayout) -> None:
    """Remember ``layout`` as the cache of the engine it names, so that ``transfer_blocks``
    can take that engine's session id as ``peer``.

    Example:
        >>> connect_kv_peer(engine, fetch_kv_layout(store, "kv/decode-0"))
        >>> transfer_blocks(engine, "10.0.0.2:17000", [0, 1], [4, 5])
        0
    """
    if not layout.session_id:
        raise ValueError("the layout names no engine")
    _state(engine).peers[layout.session_id] = layout


def _ids(ids: Union[Sequence[int], Iterable[int], Any]) -> List[int]:
    if hasattr(ids, "tolist"):  # torch tensors, numpy arrays
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)):
        raise TypeError("block ids must be ints")
    return list(ids)


def transfer_blocks(
    engine: Any,
    peer: Union[str, KvCacheLayout],
    src_block_ids: Any,
    dst_block_ids: Any,
    stream: Any = None,
    *,
    opcode: int = TransferOpcode.WRITE,
    local: Optional[KvCacheLayout] = None,
) -> int:
    """Move blocks between this engine's KV cache and a peer's: for every layer (segment),
    block ``src_block_ids[i]`` here goes to block ``dst_block_ids[i]`` there (``opcode`` WRITE,
    the default), or comes from it (READ). ``peer`` is the peer's layout, or its session id
    after ``connect_kv_peer``. Adjacent blocks are coalesced and the whole request is one
    batched transfer; with a ``stream`` it is queued and this returns at once. Ids may be lists,
    ranges, numpy arrays or int tensors. Returns 0 or an error code (``get_last_err_msg()``).

    Example:
        >>> transfer_blocks(engine, peer_layout, [7, 8, 9], [0, 1, 2])
        0
        >>> s = mf.Stream()
        >>> transfer_blocks(engine, peer_layout, range(16), range(16, 32), s)
        0
        >>> s.synchronize()
        0
    """
    st = _STATE.get(engine)
    mine = local or (st.local if st else None)
    if mine is None:
        raise ValueError("this engine has no KV cache: call register_kv_cache() first (or pass local=)")
    if isinstance(peer, KvCacheLayout):
        theirs = peer
    else:
        theirs_opt = st.peers.get(peer) if st else None
        if theirs_opt is None:
            raise ValueError(f"no layout known for peer {peer!r}: pass its KvCacheLayout or connect_kv_peer() it")
        theirs = theirs_opt
    return int(
        engine.transfer_blocks(
            theirs.session_id,
            mine.segments,
            theirs.segments,
            _ids(src_block_ids),
            _ids(dst_block_ids),
            int(opcode),
            stream,
        )
    )
