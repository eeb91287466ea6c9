"""A compiled inner loop for :class:`dpsign_fl.vote.counter.VoteCounter`, built on first use.

The counter adds payloads into bit-planes with full adders (see
:mod:`dpsign_fl.vote.counter`). In numpy every adder gate is one call over a slice of
the planes, so the vote moves each plane through the cache several times per
payload: about 0.3x the speed of copying the payloads. The C loop below does
the same arithmetic with the planes of a 2 KiB block held in registers and L1
cache across a batch of payloads (Harley-Seal carry-save tree over 16
payloads, Mula, Kurz and Lemire 2018, arXiv:1611.07612): faster than copying.
A second function counts, for the robust vote's filters, the bits each payload
shares with a few bitmaps, reading each payload once for all of them.

It is compiled here, with the machine's C compiler, the first time a counter
needs it, and kept in :func:`dpsign_fl.cache.trusted_cache_dir` under a name
derived from the source and the compiler command, so later processes load it
in milliseconds. A library is code run by whoever counts the votes: only one
that this user or root owns and nobody else can write, in a folder nobody
else can change, is loaded, never through a link (:mod:`dpsign_fl.cache`),
and the bytes checked are the bytes loaded (copied into a private temporary
folder and loaded from there). One that does not load or lacks the kernel's
functions is compiled again; where the cache folder is refused, every process
compiles its own (under a second).

Compiling at run time, not at install time, keeps the source in a ``.py``
file: Flower's app bundle (``flwr run``) carries only Python and text files,
and the ServerApp imports this package from the bundle. On x86-64 with
GCC, AVX-512 / AVX2 / baseline versions are compiled side by side and the
loader picks the one the CPU runs (``target_clones``), so a cache folder shared
between machines stays valid; the bit counts of the filters and the int8 vote
also have AVX-512 loops (VPOPCNTQ, AVX-512BW), taken where the CPU has those
instructions (here, at d = 1e7, M = 100, the C pass of the robust vote with a memory: 4.2 -> 2.2 ms; the
int8 vote 5.5 -> 3.8 ms). Where that build fails (a toolchain without
``target_clones``), the baseline version alone is built instead
(``-DDPSIGN_NO_MULTIVERSION``).

``$DPSIGN_FL_VOTE_KERNEL`` chooses: ``auto`` (default: compiled when a
compiler works, else numpy with one warning), ``compiled`` (an error if it
cannot be built) or ``numpy``. ``$CC`` names the compiler (default: ``cc``,
then ``gcc``, then ``clang``). Both kernels give the same counts, bit for bit
(tests/test_vote.py and tests/test_robust_vote.py run on both).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..atomic_file import write_atomic
from ..cache import cache_dir, open_cached_file, trusted_cache_dir

log = logging.getLogger("dpsign_fl")

KERNEL_ENV = "DPSIGN_FL_VOTE_KERNEL"
"""Environment variable choosing the vote kernel: one of :data:`KERNEL_CHOICES`."""
KERNEL_CHOICES = ("auto", "compiled", "numpy")

_COMPILE_FLAGS = ("-O3", "-shared", "-fPIC")
_COMPILE_TIMEOUT_SECONDS = 120
_CACHE_FOLDER = "vote-kernel"
_LIBRARY_SUFFIX = ".dll" if sys.platform == "win32" else ".so"

_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) \
    && !defined(DPSIGN_NO_MULTIVERSION)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
/* Two loops the compiler does not vectorise by itself get AVX-512 versions, taken when the CPU has the
   instructions (checked once, at the first call): counting set bits (VPOPCNTQ) and spreading a bitmap
   over bytes (AVX-512BW). Same results as the portable loops (tests compare them with numpy). */
#define DPSIGN_AVX512_PATHS 1
#include <immintrin.h>
#else
#define MULTIVERSION
#endif

/* 256 words: 2 KiB of each of the 5 planes a batch updates most, in L1 cache. */
#define BLOCK_WORDS 256
/* Carry-save adder: h:l = a + b + c, bitwise. */
#define CSA(h, l, a, b, c) \
    do { uint64_t u_ = (a) ^ (b); h = ((a) & (b)) | (u_ & (c)); l = u_ ^ (c); } while (0)

/* Payloads come from the network: any alignment. */
static inline uint64_t load(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* ones, twos, fours += rows x[b] .. x[b + 7] at word i; their weight-8 carry goes to e. */
#define ADD8(e, b) do { \
    CSA(twosA, ones, ones, load(x[(b)] + 8 * i), load(x[(b) + 1] + 8 * i)); \
    CSA(twosB, ones, ones, load(x[(b) + 2] + 8 * i), load(x[(b) + 3] + 8 * i)); \
    CSA(foursA, twos, twos, twosA, twosB); \
    CSA(twosA, ones, ones, load(x[(b) + 4] + 8 * i), load(x[(b) + 5] + 8 * i)); \
    CSA(twosB, ones, ones, load(x[(b) + 6] + 8 * i), load(x[(b) + 7] + 8 * i)); \
    CSA(foursB, twos, twos, twosA, twosB); \
    CSA(e, fours, fours, foursA, foursB); \
} while (0)

/* Add 16 rows into planes 0-3 of a block (low); their weight-16 carries go to carry. */
MULTIVERSION
static void add16(const uint8_t *const *x, size_t count, uint64_t (*restrict low)[BLOCK_WORDS],
                  uint64_t *restrict carry) {
    for (size_t i = 0; i < count; i++) {
        uint64_t ones = low[0][i], twos = low[1][i], fours = low[2][i], eights = low[3][i];
        uint64_t twosA, twosB, foursA, foursB, eightsA, eightsB, sixteens;
        ADD8(eightsA, 0);
        ADD8(eightsB, 8);
        CSA(sixteens, eights, eights, eightsA, eightsB);
        low[0][i] = ones; low[1][i] = twos; low[2][i] = fours; low[3][i] = eights;
        carry[i] = sixteens;
    }
}

/* plane += carry (half adders); carry becomes the next weight's. */
MULTIVERSION
static void ripple(uint64_t *restrict plane, uint64_t *restrict carry, size_t count) {
    for (size_t i = 0; i < count; i++) {
        uint64_t t = plane[i] & carry[i];
        plane[i] ^= carry[i];
        carry[i] = t;
    }
}

/* plane 0 += one row; carry receives its carries. */
MULTIVERSION
static void ripple_row(uint64_t *restrict plane, uint64_t *restrict carry, const uint8_t *row,
                       size_t count) {
    for (size_t i = 0; i < count; i++) {
        uint64_t c = load(row + 8 * i);
        carry[i] = plane[i] & c;
        plane[i] ^= c;
    }
}

/* Words [first, first + count) of the planes += bytes [offset, offset + 8 count) of the rows. */
static void add_block(const uint8_t *const *rows, size_t num_rows, size_t offset,
                      uint64_t *const *planes, size_t num_planes, size_t first, size_t count) {
    uint64_t low[4][BLOCK_WORDS];
    uint64_t carry[BLOCK_WORDS];
    size_t r = 0;
    if (num_rows >= 16) {
        for (size_t k = 0; k < 4; k++) memcpy(low[k], planes[k] + first, 8 * count);
        for (; r + 16 <= num_rows; r += 16) {
            const uint8_t *x[16];
            for (int j = 0; j < 16; j++) x[j] = rows[r + j] + offset;
            add16(x, count, low, carry);
            for (size_t k = 4; k < num_planes; k++) ripple(planes[k] + first, carry, count);
        }
        for (size_t k = 0; k < 4; k++) memcpy(planes[k] + first, low[k], 8 * count);
    }
    for (; r < num_rows; r++) {
        ripple_row(planes[0] + first, carry, rows[r] + offset, count);
        for (size_t k = 1; k < num_planes; k++) ripple(planes[k] + first, carry, count);
    }
}

/* Add num_rows payloads of num_bytes bytes to the bit-sliced counts.

   planes[k] holds bit k of every count: ceil(num_bytes / 8) words, zero past
   num_bytes; counts must stay below 2**num_planes (the top carry is dropped).
   The last byte of every row is ANDed with tail_mask. Returns 0, or -1 when
   num_rows >= 16 and num_planes < 5 (the 16-row tree needs planes 0-4). */
int dpsign_vote_add(const uint8_t *const *rows, size_t num_rows, size_t num_bytes,
                    uint8_t tail_mask, uint64_t *const *planes, size_t num_planes) {
    if (num_rows >= 16 && num_planes < 5) return -1;
    if (num_rows == 0 || num_bytes == 0) return 0;
    size_t words = (tail_mask == 0xFF ? num_bytes : num_bytes - 1) / 8;
    for (size_t first = 0; first < words; first += BLOCK_WORDS) {
        size_t count = words - first < BLOCK_WORDS ? words - first : BLOCK_WORDS;
        add_block(rows, num_rows, 8 * first, planes, num_planes, first, count);
    }
    size_t rest = num_bytes - 8 * words; /* 0-8 bytes, the masked last byte among them */
    if (rest) {
        uint8_t tails[16][8];
        const uint8_t *tail_rows[16];
        for (size_t r = 0; r < num_rows; r += 16) {
            size_t n = num_rows - r < 16 ? num_rows - r : 16;
            for (size_t j = 0; j < n; j++) {
                memset(tails[j], 0, 8);
                memcpy(tails[j], rows[r + j] + 8 * words, rest);
                tails[j][rest - 1] &= tail_mask;
                tail_rows[j] = tails[j];
            }
            add_block(tail_rows, n, 0, planes, num_planes, words, 1);
        }
    }
    return 0;
}

/* counts[r * num_masks + j] += set bits of rows[r] & masks[j] over words [first, first + count);
   a NULL mask stands for all ones. Four sums at a time break the chain of additions: 43 ms instead
   of 68 ms for 100 rows and 5 masks at d = 1e7 on the machine measured. */
#define POPCOUNT4(expr) do { \
    for (; i + 4 <= count; i += 4) { \
        size_t k = i; t0 += (uint64_t)__builtin_popcountll(expr); \
        k = i + 1; t1 += (uint64_t)__builtin_popcountll(expr); \
        k = i + 2; t2 += (uint64_t)__builtin_popcountll(expr); \
        k = i + 3; t3 += (uint64_t)__builtin_popcountll(expr); \
    } \
    for (size_t k = i; k < count; k++) t0 += (uint64_t)__builtin_popcountll(expr); \
} while (0)

#ifdef DPSIGN_AVX512_PATHS
static int cpu_has(int feature) {
    static int known[2] = {-1, -1};  /* 0: VPOPCNTQ, 1: AVX-512BW; a race writes the same value */
    if (known[feature] < 0)
        known[feature] = feature == 0 ? __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq")
                                      : __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    return known[feature];
}

__attribute__((target("avx512f,avx512vpopcntdq")))
static void and_counts_vpopcnt(const uint8_t *const *rows, size_t num_rows, const uint8_t *const *masks,
                               size_t num_masks, size_t offset, size_t count, uint64_t *counts) {
    size_t whole = count / 8 * 8;
    for (size_t r = 0; r < num_rows; r++) {
        const uint8_t *row = rows[r] + offset;
        for (size_t j = 0; j < num_masks; j++) {
            const uint8_t *mask = masks[j] == NULL ? NULL : masks[j] + offset;
            __m512i sum = _mm512_setzero_si512();
            size_t i = 0;
            if (mask == NULL)
                for (; i < whole; i += 8) sum = _mm512_add_epi64(sum, _mm512_popcnt_epi64(_mm512_loadu_si512(row + 8 * i)));
            else
                for (; i < whole; i += 8)
                    sum = _mm512_add_epi64(sum, _mm512_popcnt_epi64(
                        _mm512_and_si512(_mm512_loadu_si512(row + 8 * i), _mm512_loadu_si512(mask + 8 * i))));
            uint64_t total = (uint64_t)_mm512_reduce_add_epi64(sum);
            for (; i < count; i++) total += (uint64_t)__builtin_popcountll(load(row + 8 * i) & (mask == NULL ? ~(uint64_t)0 : load(mask + 8 * i)));
            counts[r * num_masks + j] += total;
        }
    }
}
#endif

MULTIVERSION
static void and_counts_block(const uint8_t *const *rows, size_t num_rows, const uint8_t *const *masks,
                             size_t num_masks, size_t offset, size_t count, uint64_t *counts) {
#ifdef DPSIGN_AVX512_PATHS
    if (cpu_has(0)) {
        and_counts_vpopcnt(rows, num_rows, masks, num_masks, offset, count, counts);
        return;
    }
#endif
    for (size_t r = 0; r < num_rows; r++) {
        const uint8_t *row = rows[r] + offset;
        for (size_t j = 0; j < num_masks; j++) {
            uint64_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
            size_t i = 0;
            if (masks[j] == NULL) {
                POPCOUNT4(load(row + 8 * k));
            } else {
                const uint8_t *mask = masks[j] + offset;
                POPCOUNT4(load(row + 8 * k) & load(mask + 8 * k));
            }
            counts[r * num_masks + j] += t0 + t1 + t2 + t3;
        }
    }
}

/* counts[r * num_masks + j] = set bits of rows[r] & masks[j], num_bytes bytes each, the last byte
   of every row ANDed with tail_mask; a NULL mask counts the row's own bits. The masks' block
   (2 KiB each) stays in cache while every row passes, so each row and mask is read once. */
void dpsign_and_counts(const uint8_t *const *rows, size_t num_rows, const uint8_t *const *masks,
                       size_t num_masks, size_t num_bytes, uint8_t tail_mask, uint64_t *counts) {
    memset(counts, 0, 8 * num_rows * num_masks);
    if (num_rows == 0 || num_masks == 0 || num_bytes == 0) return;
    size_t words = (tail_mask == 0xFF ? num_bytes : num_bytes - 1) / 8;
    for (size_t first = 0; first < words; first += BLOCK_WORDS) {
        size_t count = words - first < BLOCK_WORDS ? words - first : BLOCK_WORDS;
        and_counts_block(rows, num_rows, masks, num_masks, 8 * first, count, counts);
    }
    size_t rest = num_bytes - 8 * words;
    if (rest) {
        uint8_t row_tail[8], mask_tails[16][8];
        const uint8_t *tail_masks[16];
        const uint8_t *tail_row[1] = {row_tail};
        for (size_t j0 = 0; j0 < num_masks; j0 += 16) {
            size_t n = num_masks - j0 < 16 ? num_masks - j0 : 16;
            for (size_t j = 0; j < n; j++) {
                tail_masks[j] = NULL;
                if (masks[j0 + j] != NULL) {
                    memset(mask_tails[j], 0, 8);
                    memcpy(mask_tails[j], masks[j0 + j] + 8 * words, rest);
                    tail_masks[j] = mask_tails[j];
                }
            }
            for (size_t r = 0; r < num_rows; r++) {
                uint64_t sums[16] = {0};
                memset(row_tail, 0, 8);
                memcpy(row_tail, rows[r] + 8 * words, rest);
                row_tail[rest - 1] &= tail_mask;
                and_counts_block(tail_row, 1, tail_masks, n, 0, 1, sums);
                for (size_t j = 0; j < n; j++) counts[r * num_masks + j0 + j] += sums[j];
            }
        }
    }
}

/* counts[(r * num_masks + j) * num_blocks + b] = set bits of rows[r][offsets[b] + i] & masks[j][b * block_bytes + i]
   for i < block_bytes: block b of every row, against block b of masks that hold the blocks one after the
   other (a NULL mask: the row's own bits). block_bytes: a multiple of 8; no block reaches a row's last
   byte (its tail bits are never masked here). Each row's blocks are read in the order given (sorted
   offsets read a row front to back, which the prefetcher follows); the masks (a few blocks each) stay in
   cache across the rows. With hashes (else NULL), also hashes[(r * hashed_blocks + b) * runs + j] = a
   64-bit hash of run j (run_bytes bytes, a multiple of 8 dividing block_bytes) of block b < hashed_blocks
   of rows[r]: equal runs hash equal, different ones collide with probability about 2^-64
   (multiply-xorshift per word; the runs of a block are hashed side by side, so their chains overlap).
   With after (else NULL), each row's blocks b >= kept_from are kept, from the same read: with
   k = b - kept_from and K = num_blocks - kept_from, differences[r * K + k] = the bits in which the block
   differs from block k of before[r] (0 where before[r] is NULL), and then the block is copied over
   block k of after[r] (which may be before[r]). */
#define HASH_LANES 8
static inline uint64_t hash_step(uint64_t h, uint64_t word) {
    h = (h ^ word) * 0xFF51AFD7ED558CCDULL;
    return h ^ (h >> 33);
}

static void hash_runs(const uint8_t *block, size_t runs, size_t words, uint64_t *out) {
    size_t j0 = 0;
    for (; j0 + HASH_LANES <= runs; j0 += HASH_LANES) {  /* a fixed number of chains: they stay in registers */
        uint64_t h[HASH_LANES];
        for (size_t j = 0; j < HASH_LANES; j++) h[j] = 0x9E3779B97F4A7C15ULL;
        for (size_t w = 0; w < words; w++)
            for (size_t j = 0; j < HASH_LANES; j++) h[j] = hash_step(h[j], load(block + ((j0 + j) * words + w) * 8));
        for (size_t j = 0; j < HASH_LANES; j++) out[j0 + j] = h[j];
    }
    for (; j0 < runs; j0++) {  /* the runs left over, one chain at a time */
        uint64_t h = 0x9E3779B97F4A7C15ULL;
        for (size_t w = 0; w < words; w++) h = hash_step(h, load(block + (j0 * words + w) * 8));
        out[j0] = h;
    }
}

void dpsign_block_and_counts(const uint8_t *const *rows, size_t num_rows, const uint8_t *const *masks,
                             size_t num_masks, const uint64_t *offsets, size_t num_blocks, size_t block_bytes,
                             uint64_t *counts, size_t run_bytes, uint64_t *hashes, size_t hashed_blocks,
                             const uint8_t *const *before, uint8_t *const *after, uint64_t *differences,
                             size_t kept_from) {
    size_t runs = hashes == NULL ? 0 : block_bytes / run_bytes;
    const uint8_t *block_masks[64];
    uint64_t sums[64];
    size_t words = block_bytes / 8;
    for (size_t r = 0; r < num_rows; r++) {
        for (size_t b = 0; b < num_blocks; b++) {
            const uint8_t *row = rows[r] + offsets[b];
            /* The next block (of this row, else of the next): its lines load while this one is counted. */
            const uint8_t *next = b + 1 < num_blocks ? rows[r] + offsets[b + 1] : r + 1 < num_rows ? rows[r + 1] + offsets[0] : NULL;
            if (next != NULL)
                for (size_t k = 0; k < block_bytes; k += 64) __builtin_prefetch(next + k);
            for (size_t j0 = 0; j0 < num_masks; j0 += 64) {
                size_t n = num_masks - j0 < 64 ? num_masks - j0 : 64;
                for (size_t j = 0; j < n; j++) {
                    block_masks[j] = masks[j0 + j] == NULL ? NULL : masks[j0 + j] + b * block_bytes;
                    sums[j] = 0;
                }
                and_counts_block(&row, 1, block_masks, n, 0, words, sums);
                for (size_t j = 0; j < n; j++) counts[(r * num_masks + j0 + j) * num_blocks + b] = sums[j];
            }
            /* the block is in cache now */
            if (runs && b < hashed_blocks) hash_runs(row, runs, run_bytes / 8, hashes + (r * hashed_blocks + b) * runs);
            if (after != NULL && b >= kept_from) {
                size_t k = b - kept_from, at = k * block_bytes;
                uint64_t d = 0;
                if (before[r] != NULL)
                    for (size_t i = 0; i < words; i++) d += (uint64_t)__builtin_popcountll(load(row + 8 * i) ^ load(before[r] + at + 8 * i));
                differences[r * (num_blocks - kept_from) + k] = d;
                memcpy(after[r] + at, row, block_bytes);
            }
        }
    }
}

/* fewest[p * (num_blocks + 1) + k]: the fewest bits in which block k of sketch row p differs from block k of
   the rows up to reach places ahead of it or behind it on the cycle of the rows (mod num_rows); column
   num_blocks: the same over the whole rows. Rows: num_blocks blocks of block_words words each, one row after
   the other. Each pair is compared once and counts for both rows. */
MULTIVERSION
static uint64_t differences(const uint64_t *a, const uint64_t *b, size_t words) {
    uint64_t t0 = 0, t1 = 0;
    size_t i = 0;
    for (; i + 2 <= words; i += 2) {
        t0 += (uint64_t)__builtin_popcountll(a[i] ^ b[i]);
        t1 += (uint64_t)__builtin_popcountll(a[i + 1] ^ b[i + 1]);
    }
    if (i < words) t0 += (uint64_t)__builtin_popcountll(a[i] ^ b[i]);
    return t0 + t1;
}

void dpsign_cycle_fewest_differences(const uint64_t *sketch, size_t num_rows, size_t num_blocks, size_t block_words,
                                     size_t reach, uint64_t *fewest) {
    size_t columns = num_blocks + 1, row_words = num_blocks * block_words;
    for (size_t i = 0; i < num_rows * columns; i++) fewest[i] = UINT64_MAX;
    for (size_t offset = 1; offset <= reach; offset++) {
        for (size_t p = 0; p < num_rows; p++) {
            size_t q = (p + offset) % num_rows;
            const uint64_t *a = sketch + p * row_words, *b = sketch + q * row_words;
            uint64_t *fp = fewest + p * columns, *fq = fewest + q * columns;
            uint64_t whole = 0;
            for (size_t k = 0; k < num_blocks; k++) {
                uint64_t d = differences(a + k * block_words, b + k * block_words, block_words);
                whole += d;
                if (d < fp[k]) fp[k] = d;
                if (d < fq[k]) fq[k] = d;
            }
            if (whole < fp[num_blocks]) fp[num_blocks] = whole;
            if (whole < fq[num_blocks]) fq[num_blocks] = whole;
        }
    }
}

/* The int8 vote sign(2c - T) of counts c held in bit-planes, for coordinates [0, num_coordinates): +1
   where c >= positive_bound, -1 where c < negative_bound, else 0 (the bounds come from T, see
   dpsign_fl.vote). Per word, c >= bound is compared bit-sliced from the lowest plane up, as
   _write_at_least does in numpy. A table spreads a byte's 8 bits over the 8 bytes of a word (byte k of
   the word, in memory order, holds bit 7 - k: the wire order), so a byte of each bitmap becomes 8 votes
   in one OR, spread(p) | 0xFF * spread(n). The table is built per call (2 KiB, nothing shared between
   threads). Planes: ceil(num_coordinates / 64) words each. */
static uint64_t at_least(const uint64_t *const *planes, size_t num_planes, uint64_t bound, size_t i) {
    if (bound == 0) return ~(uint64_t)0;
    if (num_planes < 64 && bound >> num_planes) return 0;
    uint64_t ge = ~(uint64_t)0;
    for (size_t k = 0; k < num_planes; k++) {
        if ((bound >> k) & 1) ge &= planes[k][i];
        else ge |= planes[k][i];
    }
    return ge;
}

#ifdef DPSIGN_AVX512_PATHS
/* Bit b of byte k of a word moves to bit 7 - b of byte k: a mask register's bit m then stands for coordinate m. */
static uint64_t reverse_bits_in_bytes(uint64_t x) {
    x = ((x >> 1) & 0x5555555555555555ULL) | ((x & 0x5555555555555555ULL) << 1);
    x = ((x >> 2) & 0x3333333333333333ULL) | ((x & 0x3333333333333333ULL) << 2);
    return ((x >> 4) & 0x0F0F0F0F0F0F0F0FULL) | ((x & 0x0F0F0F0F0F0F0F0FULL) << 4);
}

/* Words [0, words) of the vote, 64 int8 votes per store; returns words. */
__attribute__((target("avx512f,avx512bw")))
static size_t vote_words_avx512(const uint64_t *const *planes, size_t num_planes, uint64_t positive_bound,
                                uint64_t negative_bound, size_t words, int8_t *out) {
    const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
    for (size_t i = 0; i < words; i++) {
        __mmask64 positive = reverse_bits_in_bytes(at_least(planes, num_planes, positive_bound, i));
        __mmask64 negative = reverse_bits_in_bytes(~at_least(planes, num_planes, negative_bound, i));
        _mm512_storeu_si512(out + 64 * i, _mm512_mask_mov_epi8(_mm512_maskz_mov_epi8(positive, plus), negative, minus));
    }
    return words;
}
#endif

void dpsign_vote_from_planes(const uint64_t *const *planes, size_t num_planes, uint64_t positive_bound,
                             uint64_t negative_bound, size_t num_coordinates, int8_t *out) {
    uint64_t spread[256];
    for (int b = 0; b < 256; b++) {
        uint8_t bytes[8];
        for (int k = 0; k < 8; k++) bytes[k] = (uint8_t)((b >> (7 - k)) & 1);
        memcpy(&spread[b], bytes, 8);
    }
    size_t num_bytes = (num_coordinates + 7) / 8;
    size_t i = 0;
#ifdef DPSIGN_AVX512_PATHS
    if (cpu_has(1)) i = vote_words_avx512(planes, num_planes, positive_bound, negative_bound, num_coordinates / 64, out);
#endif
    for (; 8 * i < num_bytes; i++) {
        uint64_t positive = at_least(planes, num_planes, positive_bound, i);
        uint64_t negative = ~at_least(planes, num_planes, negative_bound, i);
        uint8_t p[8], n[8];
        memcpy(p, &positive, 8);  /* byte j of the word, in memory order, is byte 8i + j of the bitmap */
        memcpy(n, &negative, 8);
        if (64 * (i + 1) <= num_coordinates) {  /* a whole word of coordinates: fixed-size stores */
            for (size_t j = 0; j < 8; j++) {
                uint64_t v = spread[p[j]] | (0xFF * spread[n[j]]);
                memcpy(out + 64 * i + 8 * j, &v, 8);
            }
            continue;
        }
        for (size_t j = 0; j < 8 && 8 * i + j < num_bytes; j++) {
            size_t first = 8 * (8 * i + j);
            uint64_t v = spread[p[j]] | (0xFF * spread[n[j]]);
            memcpy(out + first, &v, num_coordinates - first < 8 ? num_coordinates - first : 8);
        }
    }
}
"""


class CompiledVoteKernel:
    """The loaded C functions; see the module docstring.

    Attributes:
        path: where the library's bytes are cached, or None where this process keeps its own build.
    """

    def __init__(self, library: bytes, path: Path | None):
        """Load ``library`` (the bytes of a shared library) from a private copy.

        Raises:
            OSError: if it does not load.
            AttributeError: if it lacks the kernel's functions.
        """
        self.path = path
        loaded = _load_private_copy(library)
        self._add = loaded.dpsign_vote_add
        self._add.restype = ctypes.c_int
        self._add.argtypes = (
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_size_t, ctypes.c_uint8,
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
        )
        self._and_counts = loaded.dpsign_and_counts
        self._and_counts.restype = None
        self._and_counts.argtypes = (
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
            ctypes.c_size_t, ctypes.c_uint8, ctypes.c_void_p,
        )
        self._block_and_counts = loaded.dpsign_block_and_counts
        self._block_and_counts.restype = None
        self._block_and_counts.argtypes = (
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p,
            ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p, ctypes.c_size_t,
        )
        self._cycle_fewest_differences = loaded.dpsign_cycle_fewest_differences
        self._cycle_fewest_differences.restype = None
        self._cycle_fewest_differences.argtypes = (
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p,
        )
        self._vote_from_planes = loaded.dpsign_vote_from_planes
        self._vote_from_planes.restype = None
        self._vote_from_planes.argtypes = (
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p,
        )

    def and_counts(self, rows: list[np.ndarray], masks: list[np.ndarray | None], num_bytes: int, tail_mask: int) -> np.ndarray:
        """``counts[r, j]`` = set bits of ``rows[r] & masks[j]`` (None: of ``rows[r]``), int64 ``[rows, masks]``.

        Rows and masks: C-contiguous uint8 of ``num_bytes``; every row's last byte is ANDed with ``tail_mask``.
        """
        counts = np.empty((len(rows), len(masks)), dtype=np.int64)  # the C side zeroes and fills it
        row_pointers = (ctypes.c_void_p * len(rows))(*(row.ctypes.data for row in rows))
        mask_pointers = (ctypes.c_void_p * len(masks))(*(None if m is None else m.ctypes.data for m in masks))
        self._and_counts(row_pointers, len(rows), mask_pointers, len(masks), num_bytes, tail_mask, counts.ctypes.data)
        return counts

    def block_and_counts(
        self, rows: list[np.ndarray], masks: list[np.ndarray | None], offsets: np.ndarray, block_bytes: int, run_bytes: int = 0,
        *, hashed_blocks: int | None = None, keep: tuple[list, list, np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """``counts[r, j, b]`` = set bits of block ``b`` of ``rows[r]`` (bytes from ``offsets[b]``) & block ``b`` of ``masks[j]``.

        Masks (None: the row's own bits) hold their ``len(offsets)`` blocks of
        ``block_bytes`` (a multiple of 8) one after the other; rows are
        C-contiguous and no block reaches a row's last byte. Returns
        ``(counts, hashes)``: int64 ``[rows, masks, blocks]``, and with
        ``run_bytes`` (a multiple of 8 dividing ``block_bytes``) uint64
        ``[rows, hashed_blocks * (block_bytes // run_bytes)]``, a hash of each
        run of each of the first ``hashed_blocks`` blocks (None: all; else
        None), from the same pass. ``keep = (before, after, differences)``
        keeps each row's last ``k`` blocks in the same pass: ``after[r]`` (a
        writable C-contiguous uint8 array of ``k * block_bytes``) receives
        them, and int64 ``differences[r, i]`` (``[rows, k]``, written) the
        bits in which block ``i`` of them differs from block ``i`` of
        ``before[r]`` (an array like ``after[r]``, read before it is
        overwritten, or None: 0).
        """
        offsets = np.ascontiguousarray(offsets, dtype=np.uint64)
        hashed_blocks = len(offsets) if hashed_blocks is None else hashed_blocks
        if not 0 <= hashed_blocks <= len(offsets):
            raise ValueError(f"hashed_blocks must be in [0, {len(offsets)}], got {hashed_blocks}")
        kept_from, before_pointers, after_pointers, differences = len(offsets), None, None, None
        if keep is not None:
            before, after, differences = keep
            kept = differences.shape[1] if differences.ndim == 2 else -1
            if (
                differences.dtype != np.int64 or not differences.flags.c_contiguous or differences.shape[0] != len(rows)
                or not 0 <= kept <= len(offsets) or len(before) != len(rows) or len(after) != len(rows)
                or any(a.dtype != np.uint8 or not a.flags.c_contiguous or not a.flags.writeable or a.size != kept * block_bytes for a in after)
                or any(b is not None and (b.dtype != np.uint8 or not b.flags.c_contiguous or b.size != kept * block_bytes) for b in before)
            ):
                raise ValueError(f"keep must be (before, after, differences) for {len(rows)} rows and k <= {len(offsets)} blocks of {block_bytes} bytes")
            kept_from = len(offsets) - kept
            before_pointers = (ctypes.c_void_p * len(rows))(*(None if b is None else b.ctypes.data for b in before))
            after_pointers = (ctypes.c_void_p * len(rows))(*(a.ctypes.data for a in after))
        counts = np.empty((len(rows), len(masks), len(offsets)), dtype=np.int64)
        hashes = np.empty((len(rows), hashed_blocks * (block_bytes // run_bytes)), dtype=np.uint64) if run_bytes else None
        row_pointers = (ctypes.c_void_p * len(rows))(*(row.ctypes.data for row in rows))
        mask_pointers = (ctypes.c_void_p * len(masks))(*(None if m is None else m.ctypes.data for m in masks))
        self._block_and_counts(
            row_pointers, len(rows), mask_pointers, len(masks), offsets.ctypes.data, len(offsets), block_bytes,
            counts.ctypes.data, run_bytes, None if hashes is None else hashes.ctypes.data, hashed_blocks,
            before_pointers, after_pointers, None if differences is None else differences.ctypes.data, kept_from,
        )
        return counts, hashes

    def cycle_fewest_differences(self, sketch: np.ndarray, reach: int) -> np.ndarray:
        """``fewest[p, k]``: fewest differing bits of block ``k`` of row ``p`` with the rows up to ``reach`` places away on the cycle.

        ``sketch``: uint64 ``[rows, blocks, words]``, C-contiguous. Column ``blocks``: the whole rows. int64 ``[rows, blocks + 1]``.
        """
        sketch = np.ascontiguousarray(sketch, dtype=np.uint64)
        rows, blocks, words = sketch.shape
        fewest = np.empty((rows, blocks + 1), dtype=np.uint64)
        self._cycle_fewest_differences(sketch.ctypes.data, rows, blocks, words, reach, fewest.ctypes.data)
        return fewest.astype(np.int64)

    def vote_from_planes(self, planes: list[np.ndarray], positive_bound: int, negative_bound: int, num_coordinates: int) -> np.ndarray:
        """The int8 vote ``[d]``: +1 where the count held in ``planes`` is >= ``positive_bound``, -1 where < ``negative_bound``, else 0.

        Planes: 8-byte aligned, ``ceil(d / 64)`` words each, bit ``k`` of the counts in plane ``k``. Bounds >= 0.
        """
        vote = np.empty(num_coordinates, dtype=np.int8)
        plane_pointers = (ctypes.c_void_p * len(planes))(*(plane.ctypes.data for plane in planes))
        self._vote_from_planes(plane_pointers, len(planes), positive_bound, negative_bound, num_coordinates, vote.ctypes.data)
        return vote

    def add(self, rows: list[np.ndarray], planes: list[np.ndarray], num_bytes: int, tail_mask: int) -> None:
        """Add ``rows`` (C-contiguous uint8, ``num_bytes`` each) to ``planes`` (8-byte aligned, padded to words).

        Raises:
            RuntimeError: if 16 rows or more meet fewer than 5 planes.
        """
        row_pointers = (ctypes.c_void_p * len(rows))(*(row.ctypes.data for row in rows))
        plane_pointers = (ctypes.c_void_p * len(planes))(*(plane.ctypes.data for plane in planes))
        status = self._add(row_pointers, len(rows), num_bytes, tail_mask, plane_pointers, len(planes))
        if status != 0:
            raise RuntimeError(f"the vote kernel needs 5 planes for {len(rows)} rows, got {len(planes)}")


def kernel_choice() -> str:
    """``$DPSIGN_FL_VOTE_KERNEL``, default ``auto``.

    Raises:
        ValueError: naming the variable, if it is not one of :data:`KERNEL_CHOICES`.
    """
    choice = os.environ.get(KERNEL_ENV, "").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"{KERNEL_ENV} must be one of {KERNEL_CHOICES}, got {choice!r}")
    return choice


def load_kernel(choice: str | None = None) -> CompiledVoteKernel | None:
    """The compiled kernel, or None for numpy, as ``choice`` (default :func:`kernel_choice`) asks.

    Raises:
        ValueError: for an unknown choice.
        RuntimeError: for ``"compiled"`` when no compiler works (the reason included).
    """
    choice = _validated(choice)
    if choice == "numpy":
        return None
    kernel, reason = _build()
    if kernel is None and choice == "compiled":
        raise RuntimeError(f"{KERNEL_ENV}=compiled, but the vote kernel could not be built: {reason}")
    if kernel is None:
        _warn_once(reason)
    return kernel


def describe_kernel(choice: str | None = None) -> tuple[str, str]:
    """Which kernel counts the votes, built now if needed: ``(name, why numpy)``, for a run's log.

    Returns:
        ``("compiled", "")``, ``("numpy", "")`` when numpy was chosen, or
        ``("numpy", reason)`` when ``auto`` fell back to it.

    Raises:
        ValueError, RuntimeError: as :func:`load_kernel`.
    """
    choice = _validated(choice)
    if choice == "numpy":
        return "numpy", ""
    if choice == "compiled":
        load_kernel(choice)  # raises if it cannot be built
        return "compiled", ""
    kernel, reason = _build()
    return ("compiled", "") if kernel is not None else ("numpy", _fallback_message(reason))


def _validated(choice: str | None) -> str:
    choice = kernel_choice() if choice is None else choice
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"the vote kernel must be one of {KERNEL_CHOICES}, got {choice!r}")
    return choice


def _fallback_message(reason: str) -> str:
    return (
        f"the vote runs in numpy, 2-3x slower than the compiled kernel: {reason} "
        f"(set CC to a C compiler, or {KERNEL_ENV}=numpy to silence this)"
    )


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    log.warning("%s", _fallback_message(reason))


# Tried in order: the multiversioned build, then the baseline alone, for
# toolchains without target_clones (e.g. musl, which has no ifunc).
_VARIANTS = ((), ("-DDPSIGN_NO_MULTIVERSION",))


@functools.lru_cache(maxsize=None)
def _build() -> tuple[CompiledVoteKernel | None, str]:
    """Load the cached library, compiling it first if needed: ``(kernel, "")`` or ``(None, why not)``.

    Cached per process (``_build.cache_clear()`` to retry, e.g. after changing ``$CC``).
    """
    compiler = find_compiler()
    if compiler is None:
        return None, "no C compiler found ($CC if set, else cc, gcc or clang)"
    folder = trusted_cache_dir(_CACHE_FOLDER)  # None: refused, with a warning naming it
    if folder is not None:
        for variant in _VARIANTS:
            kernel = _load_cached(folder / _library_name(compiler, variant))
            if kernel is not None:
                return kernel, ""
    failures = []
    for variant in _VARIANTS:
        kernel, reason = _compile(compiler, variant, folder)
        if kernel is not None:
            return kernel, ""
        failures.append(reason)
    return None, failures[0] if len(set(failures)) == 1 else " / then ".join(failures)


def _load_cached(path: Path) -> CompiledVoteKernel | None:
    """The kernel cached at ``path``, or None if there is none or it is not to be loaded (then it is built again)."""
    try:
        with open_cached_file(path) as handle:
            library = handle.read()
        return CompiledVoteKernel(library, path)
    except FileNotFoundError:
        return None
    except (OSError, AttributeError) as error:  # another user's, a link, truncated, without the functions
        log.warning("could not load the cached vote kernel %s (%s); compiling it again", path, error)
        return None


def _compile(compiler: list[str], variant: tuple[str, ...], folder: Path | None) -> tuple[CompiledVoteKernel | None, str]:
    """Compile, load, and keep the library in ``folder`` (None: nowhere): ``(kernel, "")`` or ``(None, why not)``."""
    command = [*compiler, *_COMPILE_FLAGS, *variant]
    with tempfile.TemporaryDirectory(prefix="dpsign-vote-", ignore_cleanup_errors=True) as private:
        source, built = Path(private) / "vote.c", Path(private) / f"vote{_LIBRARY_SUFFIX}"
        source.write_text(_SOURCE)
        start = time.perf_counter()
        try:
            result = subprocess.run(
                [*command, "-o", str(built), str(source)],
                capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_SECONDS,
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            return None, f"{shlex.join(compiler)} failed: {error}"
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip()[-500:]
            return None, f"{shlex.join(command)} exited {result.returncode}: {tail}"
        log.info("compiled the vote kernel with %s in %.1f s", shlex.join(command), time.perf_counter() - start)
        library = built.read_bytes()
    path = None if folder is None else folder / _library_name(compiler, variant)
    try:
        kernel = CompiledVoteKernel(library, path)
    except (OSError, AttributeError) as error:  # never cached: a later process tries again
        return None, f"the library built by {shlex.join(command)} did not load: {error}"
    if path is not None:
        try:
            write_atomic(path, library)
        except OSError as error:  # e.g. a full disk or a read-only cache
            log.warning("could not keep the vote kernel in %s (%s); it will be compiled again next time", folder, error)
            kernel.path = None
    return kernel, ""


def _load_private_copy(library: bytes) -> ctypes.CDLL:
    """dlopen exactly these bytes: from a file in a new private folder (0o700), which nobody else can swap.

    The file goes with the folder; the mapping stays (and keeps the inode, so
    a later copy never gets the same inode, which the loader would take for
    this library).
    """
    with tempfile.TemporaryDirectory(prefix="dpsign-vote-", ignore_cleanup_errors=True) as private:
        copy = Path(private) / f"vote{_LIBRARY_SUFFIX}"
        copy.write_bytes(library)
        return ctypes.CDLL(str(copy))


def library_path(compiler: list[str], variant: tuple[str, ...] = ()) -> Path:
    """Where the library built by ``compiler`` (with the ``variant`` flags) is cached, if the cache folder is trusted."""
    return cache_dir() / _CACHE_FOLDER / _library_name(compiler, variant)


def _library_name(compiler: list[str], variant: tuple[str, ...]) -> str:
    """Named after the source, the command and the platform."""
    command = [*compiler, *_COMPILE_FLAGS, *variant]
    key = hashlib.sha256("\0".join([_SOURCE, *command, sys.platform, platform.machine()]).encode()).hexdigest()
    return f"vote-{key[:16]}{_LIBRARY_SUFFIX}"


def find_compiler() -> list[str] | None:
    """``$CC`` (split like a shell would), else the first of cc, gcc, clang on PATH."""
    if os.environ.get("CC", "").strip():
        command = shlex.split(os.environ["CC"])
        return command if shutil.which(command[0]) else None
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return [name]
    return None
