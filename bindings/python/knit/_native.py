"""Loads libknit through cffi's ABI mode, declared by the cbindgen-generated ``_knit_cdef.h``.

Where the library is looked for, in order: ``$KNIT_LIB`` (a path), ``libknit.so`` next to this
package, then the system's library path (``ctypes.util.find_library("knit")``, which sees
``ldconfig``'s cache and ``LD_LIBRARY_PATH``), e.g. after ``ffi/install.sh``.
"""

import ctypes.util
import os

from cffi import FFI

ffi = FFI()
with open(os.path.join(os.path.dirname(__file__), "_knit_cdef.h"), encoding="utf-8") as f:
    ffi.cdef(f.read())


def _candidates():
    env = os.environ.get("KNIT_LIB")
    if env:
        yield env
        return
    local = os.path.join(os.path.dirname(__file__), "libknit.so")
    if os.path.exists(local):
        yield local
    found = ctypes.util.find_library("knit")
    if found:
        yield found
    yield "libknit.so"


def _load():
    errors = []
    for path in _candidates():
        try:
            return ffi.dlopen(path)
        except OSError as e:  # try the next place
            errors.append(f"{path}: {e}")
    raise ImportError(
        "cannot load libknit (set KNIT_LIB to its path, or install it): " + "; ".join(errors)
    )


lib = _load()

# Resolve every declared function and constant now. cffi looks a `lib` attribute up on first
# use under its own non-reentrant lock; a __del__ run by a garbage collection that interrupts
# cffi while it holds that lock (in ffi.callback, say) and touches a new attribute would
# deadlock the thread. After this, attribute reads take no lock.
for _name in dir(lib):
    getattr(lib, _name)
del _name
