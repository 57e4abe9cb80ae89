"""SHA-256, the key of a model (its schedule's ``model.sha256``) and of every cache entry.

CPython's built-in implementation rather than ``hashlib``'s: importing ``hashlib`` loads
OpenSSL's libcrypto and sets up its digests, 3.4-3.8 MiB of RSS in every process that
imports Hyperion, which the built-in module does not cost (docs/memory.md, "What `import
hyperion` costs"). It is ``hashlib``'s own fallback and computes the same digests, slower:
about 190 MiB/s against OpenSSL's 1.1 GiB/s (with SHA extensions) on the 2-core VM,
measured, so a model file with embedded weights costs 0.45-0.85 s more per 100 MiB, once per
compile or load (external data is located, never hashed). A Python built without it (none
of CPython's own builds) falls back to ``hashlib``.
"""

from __future__ import annotations

try:
    from _sha2 import sha256  # CPython 3.12 and later
except ImportError:
    try:
        from _sha256 import sha256  # CPython 3.11
    except ImportError:               # pragma: no cover - a Python built without its own SHA-2
        from hashlib import sha256

__all__ = ["sha256"]
