"""The shape of a checkpointed state: nests of dicts/lists/tuples, tensors and plain values.

``flatten`` turns a state into a JSON-able tree whose tensor leaves are indices
into a list of (path, tensor); ``unflatten`` rebuilds the state from the tree and
a list of tensors. Plain values round-trip exactly (floats through their hex
form, so nan/inf and every bit survive). Anything else is refused at the call,
naming where it sits in the state.
"""

from __future__ import annotations

import base64
import collections
import math

import torch

SUPPORTED = ("dict, list, tuple, torch.Tensor (including DTensor), None, bool, int, float, str, "
             "bytes, torch.dtype, torch.device, torch.Size")

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
)}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"tensors of dtype {dtype} cannot be checkpointed")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"checkpoint names an unknown dtype {name!r}") from None


def is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _encode_float(x: float) -> str:
    return x.hex() if math.isfinite(x) else repr(x)


def _decode_float(s: str) -> float:
    return float(s) if s in ("nan", "inf", "-inf") else float.fromhex(s)


def _encode_plain(x, where: str):
    if x is None:
        return {"n": 0}
    if isinstance(x, bool):
        return {"b": x}
    if isinstance(x, int):
        return {"i": int(x)}
    if isinstance(x, float):
        return {"f": _encode_float(float(x))}
    if isinstance(x, str):
        return {"s": str(x)}
    if isinstance(x, (bytes, bytearray)):
        return {"y": base64.b64encode(bytes(x)).decode()}
    if isinstance(x, torch.dtype):
        return {"dt": dtype_name(x)}
    if isinstance(x, torch.device):
        return {"dev": str(x)}
    return None


def _encode_key(k):
    """A dict key: a plain value or a tuple of them (never a tensor)."""
    if isinstance(k, tuple) and not hasattr(k, "_fields"):
        parts = [_encode_key(x) for x in k]
        return None if any(p is None for p in parts) else {"u": parts}
    return _encode_plain(k, "")


def _join(prefix: str, key) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def flatten(state):
    """Return (tree, leaves): leaves is a list of (path, tensor) in depth-first order."""
    leaves: list[tuple[str, torch.Tensor]] = []
    active: set[int] = set()

    def enc(x, path: str):
        if is_tensor(x):
            leaves.append((path or "<root>", x))
            return {"t": len(leaves) - 1}
        plain = _encode_plain(x, path)
        if plain is not None:
            return plain
        if isinstance(x, (dict, list, tuple)):
            if id(x) in active:
                raise ValueError(f"state[{path or '<root>'}] contains itself; a checkpoint must be a tree")
            active.add(id(x))
            try:
                if isinstance(x, dict):
                    items = []
                    for k, v in x.items():
                        kenc = _encode_key(k)
                        if kenc is None:
                            raise TypeError(f"state[{path or '<root>'}] has a key of type "
                                            f"{type(k).__name__}; keys must be plain values ({SUPPORTED})")
                        items.append([kenc, enc(v, _join(path, k))])
                    node = {"d": items}
                    if isinstance(x, collections.OrderedDict):
                        node["o"] = 1
                    return node
                if isinstance(x, torch.Size):
                    return {"z": list(x)}
                if isinstance(x, tuple) and hasattr(x, "_fields"):
                    raise TypeError(f"state[{path}] is a namedtuple ({type(x).__name__}); store it "
                                    f"as a dict (x._asdict()) or a tuple")
                kids = [enc(v, _join(path, i)) for i, v in enumerate(x)]
                return {"l": kids} if isinstance(x, list) else {"u": kids}
            finally:
                active.discard(id(x))
        raise TypeError(f"state[{path or '<root>'}] is a {type(x).__module__}.{type(x).__qualname__}, "
                        f"which cannot be checkpointed; supported: {SUPPORTED}")

    tree = enc(state, "")
    return tree, leaves


def unflatten(tree, tensors):
    """Rebuild the state; tensors[i] replaces the leaf {"t": i}."""

    def dec(node):
        (tag, val), *rest = node.items()
        if tag == "t":
            return tensors[val]
        if tag == "n":
            return None
        if tag in ("b", "i", "s"):
            return val
        if tag == "f":
            return _decode_float(val)
        if tag == "y":
            return base64.b64decode(val)
        if tag == "dt":
            return dtype_from_name(val)
        if tag == "dev":
            return torch.device(val)
        if tag == "z":
            return torch.Size(val)
        if tag == "l":
            return [dec(v) for v in val]
        if tag == "u":
            return tuple(dec(v) for v in val)
        if tag == "d":
            cls = collections.OrderedDict if node.get("o") else dict
            return cls((dec(k), dec(v)) for k, v in val)
        raise ValueError(f"checkpoint tree has an unknown node {tag!r}")

    return dec(tree)


def leaf_paths(tree) -> dict[int, str]:
    """Tensor index -> path, from a tree alone (for inspection)."""
    out: dict[int, str] = {}

    def walk(node, path):
        (tag, val), *_ = node.items()
        if tag == "t":
            out[val] = path or "<root>"
        elif tag in ("l", "u"):
            for i, v in enumerate(val):
                walk(v, _join(path, i))
        elif tag == "d":
            for k, v in val:
                walk(v, _join(path, unflatten(k, [])))

    walk(tree, "")
    return out
