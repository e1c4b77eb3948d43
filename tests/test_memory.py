"""Memory the C allocator holds free goes back to the system, and oneDNN's cache of kernels per shape
stays small (splitserve_common/memory.py, issue 12).

Forward passes of ever-changing shapes fragment glibc's heaps: without releasing, a real
model_service's RSS grew 76 % over a 10-minute soak while the memory in use stayed flat. With the
release, what still grew was memory in use: one cached oneDNN GELU kernel per new batch shape.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from client.tensor_client import TensorClient
from splitserve_common import memory
from tests import model_factory, servers
from tests.adapter_helpers import rss_mib

needs_glibc = pytest.mark.skipif(not memory.can_release(), reason="no glibc malloc_trim here")

# A heap fragmented the way tensors of many sizes fragment it: a freed 16 MiB block raises glibc's
# mmap threshold, so the next 1 MiB blocks come from the heap; all but the last (which pins the top)
# are freed. RSS stays up until the free pages in the middle of the heap are released.
_FRAGMENT = textwrap.dedent("""
    import numpy as np
    from splitserve_common import memory
    from tests.adapter_helpers import rss_mib
    big = np.ones(16 * 2**20 // 8); del big
    blocks = [np.ones(2**20 // 8) for _ in range(200)]
    pin = blocks.pop()
    del blocks
    before = rss_mib()
    released = memory.release_free_memory()
    print(before, rss_mib(), released)
""")


@needs_glibc
def test_release_free_memory_returns_a_fragmented_heap():
    out = subprocess.run([sys.executable, "-c", _FRAGMENT], capture_output=True, text=True, check=True,
                         cwd=servers.ROOT).stdout.split()
    before, after, released = float(out[0]), float(out[1]), out[2]
    assert released == "True"
    assert before - after > 150, f"RSS {before:.0f} -> {after:.0f} MiB: the ~200 MiB held free were not released"


@needs_glibc
def test_releaser_releases_once_after_work_and_not_when_idle():
    releaser = memory.MemoryReleaser(0.05)
    try:
        time.sleep(0.2)
        assert releaser.releases == 0  # no work, no release
        releaser.worked()
        deadline = time.monotonic() + 30  # the release thread may run seconds late on a loaded machine
        while releaser.releases == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert releaser.releases == 1
        time.sleep(0.2)
        assert releaser.releases == 1  # nothing since: no more
    finally:
        releaser.close()


@needs_glibc
def test_releaser_releases_at_most_once_per_interval_under_steady_work():
    releaser = memory.MemoryReleaser(0.2)
    try:
        # Work for a second, and on until the first release (its thread may run late on a loaded machine).
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < 1.0 or (releaser.releases == 0 and elapsed < 30):
            releaser.worked()
            time.sleep(0.001)
        assert 1 <= releaser.releases <= elapsed / 0.2 + 1, (releaser.releases, elapsed)
    finally:
        releaser.close()


def test_releaser_off_with_zero_interval():
    releaser = memory.MemoryReleaser(0)
    releaser.worked()
    assert not releaser.active and releaser.releases == 0
    releaser.close()


# oneDNN kernels over new shapes: the memory in use (mallinfo2, after a trim) that 300 new shapes left behind,
# after 100 others. argv[1]: "default" (oneDNN's own bounds) or a bound applied as model_service applies it (after
# torch is imported, before the first kernel); argv[2]: "gelu" (MiniLM's activation, [rows, length, 1536], six
# layers a pass) or "linear" (model_service/matmuls.py's product over a row count).
_NEW_SHAPES = textwrap.dedent("""
    import ctypes, sys
    import torch
    from splitserve_common import memory
    if sys.argv[1] != "default":
        memory.bound_onednn_cache(int(sys.argv[1]))
    torch.set_num_threads(1)
    libc = ctypes.CDLL("libc.so.6")
    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    libc.mallinfo2.restype = MallInfo2
    def in_use():
        libc.malloc_trim(0)
        return libc.mallinfo2().uordblks / 2**20
    weight, bias = torch.randn(256, 64), torch.randn(256)
    def gelu(k):
        for _layer in range(6):
            torch.nn.functional.gelu(torch.ones(1 + k % 2, 1 + k // 2, 1536))
    def linear(k):
        torch.ops.mkldnn._linear_pointwise(torch.ones(1 + k, 64), weight, bias, "none", [], "")
    op = {"gelu": gelu, "linear": linear}[sys.argv[2]]
    for k in range(100):
        op(k)
    before = in_use()
    for k in range(100, 400):
        op(k)
    print(in_use() - before)
""")


def _growth_mib(bound: str, op: str) -> float:
    return float(subprocess.run([sys.executable, "-c", _NEW_SHAPES, bound, op], capture_output=True, text=True,
                                check=True, cwd=servers.ROOT).stdout)


@needs_glibc
@pytest.mark.parametrize("op, unbounded_at_least", [("gelu", 6.0), ("linear", 100.0)])
def test_onednn_cache_bound_keeps_kernels_of_new_shapes_from_accumulating(op, unbounded_at_least):
    """300 new shapes: with oneDNN's own bounds (1,024 entries) each GELU left ~27 KiB in use, each linear
    product ~0.55 MiB; bounded to 64 (the default of --onednn-cache-entries), the first 64 fill the caches
    and the rest replace them."""
    unbounded, bounded = _growth_mib("default", op), _growth_mib("64", op)
    print(f"memory in use after 300 new {op} shapes: +{unbounded:.1f} MiB unbounded, +{bounded:.1f} MiB bounded")
    assert unbounded > unbounded_at_least, f"oneDNN no longer caches a {op} kernel per shape: revisit the bound"
    assert bounded < 1, f"+{bounded:.1f} MiB in use over 300 new {op} shapes with the caches bounded to 64"


def _varied_passes(address: str, shapes: list[tuple[int, int]], callers: int = 2) -> None:
    """Embeddings of random token ids, one shape per request, from `callers` threads at once."""
    def call(k: int) -> None:
        with TensorClient(address, timeout=120) as client:
            for batch, length in shapes[k::callers]:
                ids = np.random.default_rng(batch * length).integers(1000, 2000, (batch, length))
                client.infer({"input_ids": ids, "attention_mask": np.ones_like(ids)}, outputs=["last_hidden_state"])

    threads = [threading.Thread(target=call, args=(k,)) for k in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@needs_glibc
@pytest.mark.slow
def test_model_service_rss_stays_flat_over_varied_shapes():
    """all-MiniLM-L6-v2 on two forward workers (the CPU default): after 60 passes of varied shapes, 120 more
    add at most RSS_GROWTH_MIB. Without releasing, each 100 such passes left ~70 MiB more RSS."""
    rng = random.Random(0)
    shapes = [(rng.randint(1, 16), rng.randint(8, 96)) for _ in range(180)]
    with servers.model_service(model_factory.minilm_dir(), "--metrics-port", "0", "--forward-workers", "2",
                               "--release-memory-seconds", "0.5") as server:
        _varied_passes(server.address, shapes[:60])
        time.sleep(1.0)
        start = rss_mib(server.proc.pid)
        _varied_passes(server.address, shapes[60:])
        # The release comes --release-memory-seconds after the last pass; on a loaded machine its thread may
        # run seconds late, so poll for it (without releasing, RSS stays up for good).
        deadline = time.monotonic() + RELEASE_WAIT_SECONDS
        while (end := rss_mib(server.proc.pid)) - start >= RSS_GROWTH_MIB and time.monotonic() < deadline:
            time.sleep(0.1)
    print(f"model_service RSS after 60 passes {start:.0f} MiB, after 120 more {end:.0f} MiB")
    assert end - start < RSS_GROWTH_MIB, f"RSS grew {end - start:.0f} MiB over 120 passes of varied shapes"


RSS_GROWTH_MIB = 25.0


@needs_glibc
def test_preproc_rss_comes_back_after_large_tokenize():
    """Tokenize of 100 texts x 50,000 characters (~1.3 M tokens, a ~40 MB answer) left preproc's RSS
    hundreds of MiB up; released after the call it comes back within PREPROC_RSS_LEFT_MIB."""
    from client.preproc_client import PreprocClient
    from tests.ops_helpers import SHARED_SENTENCES, read_sentences

    text = " ".join(read_sentences(SHARED_SENTENCES)) * 200
    texts = [text[i:i + 50_000] for i in range(100)]
    directory = model_factory.minilm_dir()
    with servers.model_service(directory, "--metrics-port", "0") as model, \
            servers.preproc_service(directory, model.address, "--metrics-port", "0",
                                    "--release-memory-seconds", "0.5") as preproc, \
            PreprocClient(preproc.address, timeout=300) as client:
        client.tokenize(texts[:2])
        start = rss_mib(preproc.proc.pid)
        answers = client.tokenize(texts)
        assert len(answers) == 100 and len(answers[0].ids) > 5000
        del answers
        # The release comes --release-memory-seconds after the call; on a loaded machine its thread may
        # run seconds late, so poll for it (without releasing, RSS stays hundreds of MiB up for good).
        deadline = time.monotonic() + RELEASE_WAIT_SECONDS
        while (end := rss_mib(preproc.proc.pid)) - start >= PREPROC_RSS_LEFT_MIB and time.monotonic() < deadline:
            time.sleep(0.1)
    print(f"preproc RSS before {start:.0f} MiB, after the large Tokenize {end:.0f} MiB")
    assert end - start < PREPROC_RSS_LEFT_MIB


PREPROC_RSS_LEFT_MIB = 40.0
RELEASE_WAIT_SECONDS = 20.0


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
@pytest.mark.parametrize("flag", ["--release-memory-seconds", "--drain-seconds"])
def test_seconds_out_of_range_are_refused_by_name(flag, value, capsys):
    from model_service.cli import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model-dir", "x", flag, value])
    assert exit_info.value.code == 2
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_onednn_cache_entries_is_a_count(value, capsys):
    from model_service.cli import parse_args

    assert parse_args(["--model-dir", "x"]).onednn_cache_entries == 64
    assert parse_args(["--model-dir", "x", "--onednn-cache-entries", "1"]).onednn_cache_entries == 1
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model-dir", "x", "--onednn-cache-entries", value])
    assert exit_info.value.code == 2
    assert "--onednn-cache-entries" in capsys.readouterr().err


def test_seconds_in_the_environment_are_checked_too(monkeypatch, capsys):
    from preproc_service.cli import main

    monkeypatch.setenv("PREPROC_MODEL_UNREACHABLE_GRACE_SECONDS", "nan")
    with pytest.raises(SystemExit) as exit_info:
        main(["--model-dir", "x"])
    assert exit_info.value.code == 2
    assert "PREPROC_MODEL_UNREACHABLE_GRACE_SECONDS" in capsys.readouterr().err
