"""Recording the constexpr flags of the Triton launches a block of code makes (interpreter and GPU launches alike), so
that a test of a kernel path can assert that the path it meant to run is the one that ran."""

from __future__ import annotations

import collections
import contextlib


@contextlib.contextmanager
def recorded_flags(flags_of):
    """Yields a dict {key: set of values}: for every Triton launch in the block, `flags_of(kernel name, launch
    kwargs)` returns an iterable of (key, value) pairs to record (none for kernels it does not follow)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen = collections.defaultdict(set)
    saved = [(cls, cls.run) for cls in (InterpretedFunction, JITFunction)]

    def recording(original):
        def run(self, *args, **kwargs):
            for key, value in flags_of(self.fn.__name__, kwargs):
                seen[key].add(value)
            return original(self, *args, **kwargs)
        return run

    for cls, original in saved:
        cls.run = recording(original)
    try:
        yield seen
    finally:
        for cls, original in saved:
            cls.run = original
