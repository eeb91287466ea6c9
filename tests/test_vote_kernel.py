"""The compiled vote kernel: built once per machine, cached, checked against numpy, and never required.

tests/test_vote.py runs every counter test on both kernels; these tests cover
how the kernel is built, found and replaced.
"""

import logging
import subprocess
from unittest import mock

import numpy as np
import pytest

from dpsign_fl import vote_kernel
from dpsign_fl.packing import last_byte_mask, pack_signs
from dpsign_fl.vote import VoteCounter
from dpsign_fl.vote_kernel import KERNEL_ENV, describe_kernel, find_compiler, library_path, load_kernel

needs_compiler = pytest.mark.skipif(find_compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh_cache(fresh_vote_kernel):
    return fresh_vote_kernel


def awkward_rows(num_rows, num_coordinates, seed):
    """Payloads as they arrive: unaligned views into one buffer, and one strided view."""
    rng = np.random.default_rng(seed)
    num_bytes = -(-num_coordinates // 8)
    buffer = rng.integers(0, 256, num_rows * num_bytes + 1, dtype=np.uint8)
    rows = [buffer[1 + i * num_bytes : 1 + (i + 1) * num_bytes] for i in range(num_rows)]
    strided = np.empty((num_bytes, 2), dtype=np.uint8)
    strided[:, 0] = rows[0]
    rows[0] = strided[:, 0]  # not contiguous: the counter copies it for the C loop
    return rows


def counts(rows, num_coordinates, kernel):
    counter = VoteCounter(num_coordinates, kernel=kernel)
    for row in rows:
        counter.add(row)
    assert counter.kernel == kernel
    return counter.positive_counts()


@needs_compiler
def test_first_use_compiles_into_the_cache_and_later_loads_do_not_compile(fresh_cache, caplog):
    with caplog.at_level(logging.INFO, logger="dpsign_fl"):
        first = load_kernel("compiled")
    assert first.path.parent == fresh_cache / "vote-kernel"
    assert first.path.is_file()
    assert "compiled the vote kernel" in caplog.text

    vote_kernel._build.cache_clear()  # as a new process would
    with mock.patch.object(subprocess, "run", side_effect=AssertionError("compiled again")):
        again = load_kernel("compiled")

    assert again.path == first.path


@needs_compiler
def test_a_corrupt_cached_library_is_compiled_again(fresh_cache, caplog):
    path = library_path(find_compiler())
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a shared library")  # e.g. left by a full disk

    with caplog.at_level(logging.WARNING, logger="dpsign_fl"):
        kernel = load_kernel("compiled")

    assert "could not load the cached vote kernel" in caplog.text
    assert kernel.path == path and path.read_bytes() != b"not a shared library"
    rows = awkward_rows(20, 1001, seed=1)
    np.testing.assert_array_equal(counts(rows, 1001, "compiled"), counts(rows, 1001, "numpy"))


@needs_compiler
def test_an_unwritable_cache_still_gives_a_working_kernel(fresh_cache, monkeypatch, caplog):
    blocker = fresh_cache.parent / "a-file"
    blocker.write_text("the cache folder cannot be made here")
    monkeypatch.setenv("DPSIGN_FL_CACHE", str(blocker))

    with caplog.at_level(logging.WARNING, logger="dpsign_fl"):
        rows = awkward_rows(40, 777, seed=2)
        compiled = counts(rows, 777, "compiled")

    assert "could not keep the vote kernel" in caplog.text
    np.testing.assert_array_equal(compiled, counts(rows, 777, "numpy"))


@needs_compiler
@pytest.mark.parametrize("num_coordinates", [8 * 2048 * 2 + 61, 8 * 2048 * 2 + 64])
def test_baseline_and_multiversioned_builds_count_like_numpy_on_unaligned_and_strided_rows(
    fresh_cache, monkeypatch, num_coordinates
):
    # Two 2 KiB blocks of the C loop plus a short one, then 0-8 tail bytes.
    rows = awkward_rows(50, num_coordinates, seed=num_coordinates)
    expected = counts(rows, num_coordinates, "numpy")
    compiler = " ".join(find_compiler())
    for flags in ("", " -DDPSIGN_NO_MULTIVERSION"):
        monkeypatch.setenv("CC", compiler + flags)
        vote_kernel._build.cache_clear()

        np.testing.assert_array_equal(counts(rows, num_coordinates, "compiled"), expected)


def test_without_a_compiler_auto_warns_once_and_counts_in_numpy(fresh_cache, monkeypatch, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")

    with caplog.at_level(logging.WARNING, logger="dpsign_fl"):
        assert load_kernel("auto") is None
        counter = VoteCounter(77, kernel="auto")
    with pytest.raises(RuntimeError, match=f"{KERNEL_ENV}=compiled, but .* no C compiler found"):
        load_kernel("compiled")

    assert counter.kernel == "numpy"
    warnings = [r for r in caplog.records if "the vote runs in numpy" in r.getMessage()]
    assert len(warnings) == 1 and "set CC" in warnings[0].getMessage()


def test_a_failing_compiler_reports_its_error(fresh_cache, monkeypatch):
    if find_compiler() is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("CC", " ".join(find_compiler()) + " -include /nonexistent/header.h")

    with pytest.raises(RuntimeError, match="exited [1-9].*nonexistent/header.h"):
        load_kernel("compiled")
    assert not (fresh_cache / "vote-kernel").exists() or not any((fresh_cache / "vote-kernel").iterdir())


def test_an_unknown_kernel_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "fast")
    with pytest.raises(ValueError, match=f"{KERNEL_ENV} must be one of .*'fast'"):
        VoteCounter(8)
    with pytest.raises(ValueError, match="the vote kernel must be one of .*'fast'"):
        VoteCounter(8, kernel="fast")
    monkeypatch.setenv(KERNEL_ENV, "numpy")
    assert VoteCounter(8).kernel == "numpy"


def test_describe_kernel_says_which_counts_and_why_not_the_compiled_one(fresh_cache, monkeypatch):
    assert describe_kernel("numpy") == ("numpy", "")
    if find_compiler() is not None:
        assert describe_kernel("auto") == describe_kernel("compiled") == ("compiled", "")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    vote_kernel._build.cache_clear()

    name, why = describe_kernel("auto")

    assert name == "numpy" and "no C compiler found" in why and KERNEL_ENV in why


@needs_compiler
@pytest.mark.parametrize("num_coordinates", [1, 9, 77, 64 * 256 * 2 + 61, 64 * 256 * 2 + 64])
def test_and_counts_equal_an_unpacked_count_for_every_row_and_mask(num_coordinates):
    rows = awkward_rows(21, num_coordinates, seed=num_coordinates)
    for row in rows:  # rows arrive with set tail bits; they never count
        row[-1] |= np.uint8(~last_byte_mask(num_coordinates) & 0xFF)
    rng = np.random.default_rng(0)
    masks = [None] + [pack_signs(rng.choice(np.array([-1, 1], dtype=np.int8), num_coordinates)) for _ in range(3)]
    kernel = load_kernel("compiled")

    counts = kernel.and_counts([np.ascontiguousarray(r) for r in rows], masks, len(rows[0]), last_byte_mask(num_coordinates))

    bits = [np.unpackbits(r, count=num_coordinates) for r in rows]
    expected = [[int(b.sum()) if m is None else int((b & np.unpackbits(m, count=num_coordinates)).sum()) for m in masks] for b in bits]
    np.testing.assert_array_equal(counts, expected)


@needs_compiler
def test_the_robust_vote_decides_the_same_on_both_kernels(monkeypatch):
    from dpsign_fl.vote import robust_vote

    num_coordinates = 30_011
    rng = np.random.default_rng(5)
    honest = [pack_signs(np.where(rng.random(num_coordinates) < 0.55, 1, -1).astype(np.int8)) for _ in range(12)]
    attackers = [np.full(len(honest[0]), 0xFF, dtype=np.uint8) for _ in range(3)]  # all ones, tail bits too
    outcomes = {}
    for kernel in ("compiled", "numpy"):
        monkeypatch.setenv(KERNEL_ENV, kernel)
        outcomes[kernel] = robust_vote(honest + attackers, num_coordinates, generator=np.random.default_rng(1))

    assert outcomes["compiled"].dropped == outcomes["numpy"].dropped == {12: "+1 rate", 13: "+1 rate", 14: "+1 rate"}
    np.testing.assert_array_equal(outcomes["compiled"].vote, outcomes["numpy"].vote)


@needs_compiler
def test_a_toolchain_without_multiversioning_gets_the_baseline_build(fresh_cache, monkeypatch, tmp_path):
    # A compiler that refuses the multiversioned build, as one without target_clones would.
    wrapper = tmp_path / "cc-without-target-clones"
    real = " ".join(find_compiler())
    wrapper.write_text(
        "#!/bin/sh\n"
        'case "$*" in *-DDPSIGN_NO_MULTIVERSION*) exec ' + real + ' "$@";; esac\n'
        'echo "error: target_clones is not supported here" >&2; exit 1\n'
    )
    wrapper.chmod(0o755)
    monkeypatch.setenv("CC", str(wrapper))

    kernel = load_kernel("compiled")

    assert kernel.path == library_path([str(wrapper)], ("-DDPSIGN_NO_MULTIVERSION",))
    rows = awkward_rows(40, 1003, seed=4)
    np.testing.assert_array_equal(counts(rows, 1003, "compiled"), counts(rows, 1003, "numpy"))
    vote_kernel._build.cache_clear()  # a later process finds the baseline build without compiling
    with mock.patch.object(subprocess, "run", side_effect=AssertionError("compiled again")):
        assert load_kernel("compiled").path == kernel.path
