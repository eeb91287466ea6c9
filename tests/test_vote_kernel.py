"""The compiled vote kernel: built once per machine, cached, checked against numpy, and never required.

tests/test_vote.py runs every counter test on both kernels; these tests cover
how the kernel is built, found and replaced.
"""

import json
import logging
import os
import shutil
import subprocess
from unittest import mock

import numpy as np
import pytest

from dpsign_fl.vote import kernel as vote_kernel
from dpsign_fl.vote.packing import last_byte_mask, pack_signs
from dpsign_fl.vote import VoteCounter
from dpsign_fl.vote.kernel import KERNEL_ENV, describe_kernel, find_compiler, library_path, load_kernel

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

    assert f"does not use the cache folder {blocker / 'vote-kernel'}: {blocker} is not a folder" in caplog.text
    np.testing.assert_array_equal(compiled, counts(rows, 777, "numpy"))


@needs_compiler
def test_a_cache_that_cannot_keep_the_library_still_gives_a_working_kernel(fresh_cache, monkeypatch, caplog):
    monkeypatch.setattr(vote_kernel, "write_atomic", mock.Mock(side_effect=OSError(28, "No space left on device")))

    with caplog.at_level(logging.WARNING, logger="dpsign_fl"):
        kernel = load_kernel("compiled")

    assert "could not keep the vote kernel" in caplog.text and kernel.path is None
    assert unanimous_counts() == [1000] * 1000


# A library another user plants where the kernel is cached: its constructor runs as whoever loads it (it
# leaves a marker file to show that it did) and its vote counts nothing.
PLANTED_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

__attribute__((constructor)) static void planted(void) {
    FILE *marker = fopen(MARKER, "w");
    if (marker) { fputs("the planted library ran", marker); fclose(marker); }
}
int dpsign_vote_add(const uint8_t *const *rows, size_t num_rows, size_t num_bytes, uint8_t tail_mask,
                    uint64_t *const *planes, size_t num_planes) { return 0; }
void dpsign_and_counts(const uint8_t *const *rows, size_t num_rows, const uint8_t *const *masks,
                       size_t num_masks, size_t num_bytes, uint8_t tail_mask, uint64_t *counts) {
    memset(counts, 0, 8 * num_rows * num_masks);
}
"""
ANOTHER_USER = 65534  # nobody


def build_library(folder, source, name):
    """A shared library built from ``source`` with the machine's compiler (not the kernel's build)."""
    (folder / f"{name}.c").write_text(source)
    subprocess.run([*find_compiler(), "-shared", "-fPIC", "-o", str(folder / f"{name}.so"), str(folder / f"{name}.c")],
                   check=True, capture_output=True)
    return folder / f"{name}.so"


@pytest.fixture
def planted(tmp_path):
    """(a library that counts nothing and runs code when loaded, the marker file that code writes)."""
    marker = tmp_path / "the-planted-library-ran"
    (tmp_path / "build").mkdir()
    return build_library(tmp_path / "build", PLANTED_SOURCE.replace("MARKER", json.dumps(str(marker))), "planted"), marker


def unanimous_counts():
    """The compiled kernel's +1 counts of 1000 voters who all send +1 on 1000 coordinates."""
    return counts([np.full(125, 0xFF, dtype=np.uint8)] * 1000, 1000, "compiled").tolist()


def chown_tree(folder, uid):
    for path in (folder, *folder.rglob("*")):
        os.chown(path, uid, uid, follow_symlinks=False)


@needs_compiler
@pytest.mark.parametrize(
    ("mode", "owner", "reason"),
    [
        (0o777, None, "is writable by group or others (mode 777)"),
        (0o770, None, "is writable by group or others (mode 770)"),
        (0o755, ANOTHER_USER, f"is owned by uid {ANOTHER_USER}"),
    ],
    ids=["others-writable", "group-writable", "another-user-s"],
)
def test_a_cache_folder_others_can_change_is_refused_and_the_kernel_is_built_privately(fresh_cache, caplog, mode, owner, reason):
    fresh_cache.mkdir()
    fresh_cache.chmod(mode)
    if owner is not None:
        if os.getuid() != 0:
            pytest.skip("giving a folder to another user needs root")
        os.chown(fresh_cache, owner, owner)

    with caplog.at_level(logging.WARNING, logger="dpsign_fl"):
        assert unanimous_counts() == [1000] * 1000

    assert f"does not use the cache folder {fresh_cache / 'vote-kernel'}: {fresh_cache} {reason}" in caplog.text
    assert list(fresh_cache.iterdir()) == []  # nothing written into it, not even the subfolder


@needs_compiler
@pytest.mark.parametrize("who", ["folder-and-library-of-another-user", "library-of-another-user", "library-others-can-write"])
def test_a_library_planted_at_the_cached_path_is_never_loaded(fresh_cache, planted, who):
    library, marker = planted
    path = library_path(find_compiler())
    path.parent.mkdir(parents=True, mode=0o700)
    shutil.copy(library, path)
    if who == "library-others-can-write":
        path.chmod(0o666)
    elif os.getuid() != 0:
        pytest.skip("giving a file to another user needs root")
    else:
        chown_tree(fresh_cache if who == "folder-and-library-of-another-user" else path, ANOTHER_USER)

    assert unanimous_counts() == [1000] * 1000

    assert not marker.exists(), "the planted library's constructor ran"
    if who != "folder-and-library-of-another-user":  # in this user's folder it is replaced by a build
        assert path.read_bytes() != library.read_bytes() and path.stat().st_uid == os.getuid()


@needs_compiler
def test_a_link_at_the_cached_path_is_not_followed(fresh_cache, planted, caplog):
    library, marker = planted  # this user's own file: only the link is wrong
    path = library_path(find_compiler())
    path.parent.mkdir(parents=True, mode=0o700)
    path.symlink_to(library)

    with caplog.at_level(logging.WARNING, logger="dpsign_fl"):
        assert unanimous_counts() == [1000] * 1000

    assert not marker.exists(), "the library behind the link was loaded"
    assert "is a symbolic link" in caplog.text
    assert not path.is_symlink() and path.read_bytes() != library.read_bytes()  # replaced by a build


@needs_compiler
def test_a_cached_library_without_the_kernel_functions_is_compiled_again(fresh_cache, tmp_path, caplog):
    foreign = build_library(tmp_path, "int unrelated(void) { return 1; }\n", "foreign")
    path = library_path(find_compiler())
    path.parent.mkdir(parents=True, mode=0o700)
    shutil.copy(foreign, path)

    with caplog.at_level(logging.WARNING, logger="dpsign_fl"):
        assert unanimous_counts() == [1000] * 1000

    assert "could not load the cached vote kernel" in caplog.text and "dpsign_vote_add" in caplog.text
    assert path.read_bytes() != foreign.read_bytes()


@needs_compiler
def test_a_build_without_the_kernel_functions_is_numpy_in_auto_and_an_error_in_compiled(fresh_cache, monkeypatch, caplog):
    # The compiler renames the function, as a broken toolchain might: the build loads but lacks it.
    monkeypatch.setenv("CC", " ".join(find_compiler()) + " -Ddpsign_vote_add=renamed_vote_add")

    with caplog.at_level(logging.WARNING, logger="dpsign_fl"):
        assert load_kernel("auto") is None
    with pytest.raises(RuntimeError, match=f"{KERNEL_ENV}=compiled, but .* did not load: .*dpsign_vote_add"):
        load_kernel("compiled")

    assert "the vote runs in numpy" in caplog.text
    assert list((fresh_cache / "vote-kernel").iterdir()) == []  # a broken build is never cached


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


def check_and_counts_and_vote(kernel, num_coordinates):
    """The kernel's AND-popcounts and its int8 vote equal those of the unpacked bits."""
    rows = awkward_rows(21, num_coordinates, seed=num_coordinates)
    for row in rows:  # rows arrive with set tail bits; they never count
        row[-1] |= np.uint8(~last_byte_mask(num_coordinates) & 0xFF)
    rng = np.random.default_rng(0)
    masks = [None] + [pack_signs(rng.choice(np.array([-1, 1], dtype=np.int8), num_coordinates)) for _ in range(3)]

    counts = kernel.and_counts([np.ascontiguousarray(r) for r in rows], masks, len(rows[0]), last_byte_mask(num_coordinates))

    bits = [np.unpackbits(r, count=num_coordinates) for r in rows]
    expected = [[int(b.sum()) if m is None else int((b & np.unpackbits(m, count=num_coordinates)).sum()) for m in masks] for b in bits]
    np.testing.assert_array_equal(counts, expected)
    counter = VoteCounter(num_coordinates, kernel="compiled")
    for row in rows[:20]:  # an even count: ties give 0 votes
        counter.add(row)
    np.testing.assert_array_equal(counter.vote(), np.sign(2 * np.sum(bits[:20], axis=0, dtype=np.int64) - 20))


@needs_compiler
@pytest.mark.parametrize("num_coordinates", [1, 9, 77, 64 * 256 * 2 + 61, 64 * 256 * 2 + 64])
def test_and_counts_and_the_int8_vote_equal_those_of_the_unpacked_bits(num_coordinates):
    check_and_counts_and_vote(load_kernel("compiled"), num_coordinates)


@needs_compiler
def test_block_and_counts_equal_an_unpacked_count_for_every_row_mask_and_block():
    block_bytes, num_coordinates = 64, 8 * 64 * 40 + 13
    rows = awkward_rows(7, num_coordinates, seed=3)
    rng = np.random.default_rng(1)
    blocks = np.sort(rng.choice(40, size=9, replace=False))
    masks = [None] + [rng.integers(0, 256, 9 * block_bytes, dtype=np.uint8) for _ in range(2)]

    counts, hashes = load_kernel("compiled").block_and_counts(
        [np.ascontiguousarray(r) for r in rows], masks, blocks * block_bytes, block_bytes
    )
    assert hashes is None

    for r, row in enumerate(rows):
        for b, block in enumerate(blocks):
            bits = np.unpackbits(row[block * block_bytes : (block + 1) * block_bytes])
            for j, mask in enumerate(masks):
                mask_bits = 1 if mask is None else np.unpackbits(mask[b * block_bytes : (b + 1) * block_bytes])
                assert counts[r, j, b] == int((bits & mask_bits).sum())


@needs_compiler
def test_block_and_counts_hashes_the_first_blocks_and_keeps_the_last_ones_from_the_same_pass():
    from dpsign_fl.vote.robust import COPY_BYTES, _hash_runs

    rows = [np.ascontiguousarray(r) for r in awkward_rows(4, 8 * 4096 + 5, seed=6)]
    offsets = np.array([1024, 0, 3072, 512, 2048])  # not sorted: the last two are the blocks kept
    kernel = load_kernel("compiled")
    everything, all_hashes = kernel.block_and_counts(rows, [None], offsets, 512, COPY_BYTES)
    rng = np.random.default_rng(0)
    table = rng.integers(0, 256, (4, 2 * 512), dtype=np.uint8)
    before = [table[0].copy(), None, table[2], table[3]]  # row 2 compared with and written over its own bytes
    after = [table[0], table[1], table[2], np.zeros(1024, dtype=np.uint8)]
    expected_before = [None if b is None else b.copy() for b in before]
    differences = np.full((4, 2), -1, dtype=np.int64)

    counts, hashes = kernel.block_and_counts(rows, [None], offsets, 512, COPY_BYTES, hashed_blocks=3, keep=(before, after, differences))

    np.testing.assert_array_equal(counts, everything)
    np.testing.assert_array_equal(hashes, all_hashes[:, : 3 * 512 // COPY_BYTES])
    np.testing.assert_array_equal(hashes, np.stack([_hash_runs(r, offsets[:3], 512) for r in rows]))
    kept = [np.concatenate([r[512:1024], r[2048:2560]]) for r in rows]
    for r in range(4):
        np.testing.assert_array_equal(after[r], kept[r])
        if expected_before[r] is None:
            assert list(differences[r]) == [0, 0]
        else:
            unpacked = np.unpackbits(kept[r] ^ expected_before[r]).reshape(2, -1)
            np.testing.assert_array_equal(differences[r], unpacked.sum(axis=1))
    with pytest.raises(ValueError, match="keep must be"):
        kernel.block_and_counts(rows, [None], offsets, 512, keep=(before, after, np.zeros((4, 6), dtype=np.int64)))
    with pytest.raises(ValueError, match="hashed_blocks"):
        kernel.block_and_counts(rows, [None], offsets, 512, COPY_BYTES, hashed_blocks=6)


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
    for num_coordinates in (77, 64 * 256 * 2 + 61):  # the portable loops, which machines without AVX-512 run
        check_and_counts_and_vote(kernel, num_coordinates)
    vote_kernel._build.cache_clear()  # a later process finds the baseline build without compiling
    with mock.patch.object(subprocess, "run", side_effect=AssertionError("compiled again")):
        assert load_kernel("compiled").path == kernel.path


@needs_compiler
def test_run_hashes_equal_the_numpy_hashes_and_equal_runs_hash_equal():
    from dpsign_fl.vote.robust import COPY_BYTES, _hash_runs

    rows = awkward_rows(5, 8 * 2048 + 3, seed=9)
    rows[3][128:192] = rows[1][128:192]
    offsets = np.array([0, 512, 1536])
    _, hashes = load_kernel("compiled").block_and_counts([np.ascontiguousarray(r) for r in rows], [None], offsets, 512, COPY_BYTES)

    np.testing.assert_array_equal(hashes, np.stack([_hash_runs(r, offsets, 512) for r in rows]))
    assert hashes[3, 2] == hashes[1, 2] and len(set(hashes[:, 0].tolist())) == 5


@needs_compiler
@pytest.mark.parametrize("run_bytes", [8, 128, 512])  # 64 runs a block (8 chains at a time), 4 and 1 (one at a time)
def test_run_hashes_of_any_run_length_equal_a_word_by_word_reference(run_bytes):
    rows = [np.ascontiguousarray(r) for r in awkward_rows(3, 8 * 2048 + 3, seed=10)]
    offsets = np.array([512, 0])
    _, hashes = load_kernel("compiled").block_and_counts(rows, [None], offsets, 512, run_bytes)

    def reference(row):
        out = []
        for offset in offsets:
            for start in range(offset, offset + 512, run_bytes):
                h = 0x9E3779B97F4A7C15
                for word in row[start : start + run_bytes].view("<u8").tolist():
                    h = ((h ^ word) * 0xFF51AFD7ED558CCD) % 2**64
                    h ^= h >> 33
                out.append(h)
        return out

    assert [list(map(int, h)) for h in hashes] == [reference(r) for r in rows]
