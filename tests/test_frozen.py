"""frozen.release_pages: the frozen weights' pages leave the process, their values stay."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from ortlora.runtime.frozen import release_pages
from tests.memory import resident_bytes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and madvise: Linux")


def test_a_read_only_mapping_is_released_and_reads_back_the_same(tmp_path):
    path = tmp_path / "frozen_weights.bin"
    values = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)  # 4 MiB
    values.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r")
    assert float(mapped.sum()) == pytest.approx(float(values.sum()), rel=1e-5)  # every page read
    assert resident_bytes(path) >= values.nbytes
    assert release_pages(path) >= values.nbytes
    assert resident_bytes(path) < values.nbytes // 16
    np.testing.assert_array_equal(mapped, values)  # read back from the page cache


def test_a_writable_mapping_is_left_alone(tmp_path):
    # A copy-on-write mapping holds its writes in pages of its own; releasing them would lose the writes.
    path = tmp_path / "frozen_weights.bin"
    np.zeros(1 << 16, np.float32).tofile(path)
    written = np.memmap(path, dtype=np.float32, mode="c")
    written[:] = 7.0
    assert release_pages(path) == 0
    assert (written == 7.0).all()
