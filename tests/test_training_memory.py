"""Freed heap memory goes back to the system (glibc keeps fragmented holes otherwise)."""

import json
import subprocess
import sys
import textwrap

import pytest

from speechlm.training.memory import release_freed_heap, resident_anonymous_mb

# Tensors of ever new sizes with live allocations between them, as batches of varying
# length leave them: freeing them leaves holes that glibc's heap keeps.
FRAGMENT = textwrap.dedent("""
    import json
    import numpy as np
    from speechlm.training.memory import release_freed_heap, resident_anonymous_mb
    big = np.ones(8 << 20, np.uint8)
    del big  # raises glibc's dynamic mmap threshold: later 2 MB blocks come from the heap
    holes, pins = [], []
    for i in range(100):
        holes.append(np.ones((2 << 20) + i * 4096, np.uint8))
        pins.append(np.ones(1 << 16, np.uint8))
    del holes
    freed = resident_anonymous_mb()
    trimmed = release_freed_heap()
    print(json.dumps([freed, trimmed, resident_anonymous_mb()]))
""")


@pytest.mark.skipif(not release_freed_heap(), reason="needs glibc's malloc_trim (Linux)")
def test_fragmented_heap_is_returned_to_the_system():
    out = subprocess.run([sys.executable, "-c", FRAGMENT], capture_output=True, text=True,
                         check=True).stdout
    freed, trimmed, after = json.loads(out)
    assert trimmed and freed - after > 150, (freed, after)  # 200 MB of holes given back


def test_resident_memory_is_read_on_linux():
    value = resident_anonymous_mb()
    if sys.platform.startswith("linux"):
        assert value is not None and value > 10
    else:
        assert value is None
