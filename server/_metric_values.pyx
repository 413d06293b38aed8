"""The values behind every Prometheus metric of the server, compiled.

A Rank request moves about twenty-five metric values (the RPC's count, latency and
in-flight gauge; the rung, the retrieval path, the candidate counts and seven stage
latencies). prometheus_client keeps each in a Python object that takes a lock for every
change and, with several worker processes, also checks the process id and packs the
value into its memory-mapped file through ``struct``: about 1 us a change, a fifth of
the Python a request ran (py-spy, the standard bench shop at concurrency 8). These
classes keep the library's files and formats and replace only the change:

- ``MmapedValue`` (several workers): the library's own multiprocess value opens the
  file, adds the key and reads the value back, as before. Changes then write the value
  and its timestamp straight into the file's map through a view held from the start:
  the map is shared with the file, and a later growth of the file maps it anew without
  moving what is written, so the view stays valid.
- ``LocalValue`` (one process): a double.

A change is one compiled method that never lets go of the GIL, so no other thread can
interleave with it: no lock is needed. After a fork the child writes to its own
file, as the library's values do (``os.register_at_fork``).
"""
import os
import weakref

# The library's multiprocess value class these wrap, and every live value, to rebind after a fork.
_base_class = None
_live = weakref.WeakSet()


cdef class LocalValue:
    """A metric value in one process: prometheus_client's ``MutexValue`` without the lock."""

    cdef double _value
    cdef object _exemplar

    def __init__(self, typ, metric_name, name, labelnames, labelvalues, help_text, **kwargs):
        self._value = 0.0
        self._exemplar = None

    def inc(self, double amount):
        self._value += amount

    def set(self, double value, timestamp=None):
        self._value = value

    def set_exemplar(self, exemplar):
        self._exemplar = exemplar

    def get(self):
        return self._value

    def get_exemplar(self):
        return self._exemplar


cdef class MmapedValue:
    """A metric value in its process's file of prometheus_client's multiprocess directory."""

    cdef object _base  # the library's value: its file, key, and the reads
    cdef double[::1] _slot  # (value, timestamp) in the file's map
    cdef double _value
    cdef object __weakref__

    def __init__(self, typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode="", **kwargs):
        if _base_class is None:
            raise RuntimeError("server._metric_values.install() must run before a multiprocess metric is created")
        self._base = _base_class(
            typ, metric_name, name, labelnames, labelvalues, help_text, multiprocess_mode=multiprocess_mode, **kwargs
        )
        self._bind()
        _live.add(self)

    def _bind(self):
        """Hold a view of this value's 16 bytes in the file's current map; take its value."""
        base = self._base
        file = base._file
        pos = file._positions[base._key]
        self._slot = memoryview(file._m)[pos : pos + 16].cast("d")
        self._value = base._value

    def inc(self, double amount):
        self._value += amount
        self._slot[0] = self._value
        self._slot[1] = 0.0

    def set(self, double value, timestamp=None):
        self._value = value
        self._slot[0] = value
        self._slot[1] = 0.0 if timestamp is None else timestamp

    def set_exemplar(self, exemplar):
        return  # as the library's: no exemplars in multiprocess mode

    def get(self):
        return self._value

    def get_exemplar(self):
        return None


def _after_fork_in_child():
    """A forked child writes to its own file: the library's values reopen theirs (its check
    of the process id, run once), then each value here takes a view of the new one."""
    values = list(_live)
    if not values:
        return
    # The library closes the parent's maps first, which it cannot while views of them are held.
    for v in values:
        (<MmapedValue>v)._slot = None
    # Any one base value's check resets every value of the library's class.
    (<MmapedValue>values[0])._base._MmapedValue__check_for_pid_change()
    for v in values:
        (<MmapedValue>v)._bind()


def install():
    """Make prometheus_client create these values from now on; returns the class in use.

    Run before the first metric is created. With ``PROMETHEUS_MULTIPROC_DIR`` set (the
    library chose its multiprocess value at import), the multiprocess one; else the local
    one. Running it again changes nothing.
    """
    global _base_class
    from prometheus_client import values

    chosen = values.ValueClass
    if chosen in (MmapedValue, LocalValue):
        return chosen
    if getattr(chosen, "_multiprocess", False):
        _base_class = chosen
        os.register_at_fork(after_in_child=_after_fork_in_child)
        values.ValueClass = MmapedValue
    else:
        values.ValueClass = LocalValue
    return values.ValueClass
