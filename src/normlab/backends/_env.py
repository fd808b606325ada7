"""Environment switches: ``os.environ.get`` for those read on every normalization call,
sizes given in MiB, and the machine's last-level cache.

Backend choice reads ``NORMLAB_BACKEND`` (and the Triton backend its CPU-interpreter
switches) on every call, so that a test or the benchmark can flip them at any time.
``os.environ.get`` encodes the key on each read (~0.7 us, several times per small
layer's training step); :func:`getenv` looks up the same mapping with the key
encoded once. It sees exactly what ``os.environ`` sees (changes made through
``os.environ``, not raw ``os.putenv`` calls).
"""

from __future__ import annotations

import functools
import os

__all__ = ["getenv", "mebibytes", "last_level_cache_bytes"]

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


def mebibytes(name: str, default: int) -> int:
    """The byte count the environment variable ``name`` gives in MiB (a float; negative
    values count as 0), or ``default`` bytes when it is unset.

    Raises ValueError naming the variable when its value is not a number.
    """
    text = getenv(name)
    if text is None:
        return default
    try:
        return max(0, int(float(text) * (1 << 20)))
    except ValueError:
        raise ValueError(f"{name}: expected a number of MiB, got {text!r}") from None


@functools.cache
def last_level_cache_bytes() -> int:
    """The CPU's level-3 cache in bytes as Linux reports it (32 MiB if unknown). Read
    once (~70 us of file reads; the CPU backend asks for every new input
    configuration)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for index in sorted(os.listdir(base)):
            with open(f"{base}/{index}/level") as f:
                if f.read().strip() != "3":
                    continue
            with open(f"{base}/{index}/size") as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
            return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 32 << 20
