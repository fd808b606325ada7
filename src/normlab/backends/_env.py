"""``os.environ.get`` for the switches read on every normalization call.

Backend choice reads ``NORMLAB_BACKEND`` (and the Triton backend its CPU-interpreter
switches) on every call, so that a test or the benchmark can flip them at any time.
``os.environ.get`` encodes the key on each read (~0.7 us, several times per small
layer's training step); :func:`getenv` looks up the same mapping with the key
encoded once. It sees exactly what ``os.environ`` sees (changes made through
``os.environ``, not raw ``os.putenv`` calls).
"""

from __future__ import annotations

import os

__all__ = ["getenv"]

_environ = os.environ
# the encoded key -> value mapping os.environ reads and writes (CPython's os._Environ)
_data = getattr(_environ, "_data", None)
_keys: dict[str, object] = {}


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``."""
    if _data is None or os.environ is not _environ:  # another mapping put in its place
        return os.environ.get(name)
    key = _keys.get(name)
    if key is None:
        key = _keys[name] = _environ.encodekey(name)
    value = _data.get(key)
    return None if value is None else _environ.decodevalue(value)
