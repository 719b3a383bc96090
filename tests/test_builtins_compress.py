"""compress:* / decompress:* directly: round trips, interop, bombs, corrupt input."""

from __future__ import annotations

import gzip
import subprocess
import sys
import textwrap
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import offload.tasks as t
from offload import InvalidInput, OutputTooLarge
from offload._registry import registered

MiB = 1 << 20
GiB = 1 << 30
ZEROS = bytes(MiB)

Decompress = Callable[..., bytes]
CODECS: list[tuple[str, Callable[..., bytes], Decompress]] = [
    ("zstd", t.compress_zstd, t.decompress_zstd),
    ("gzip", t.compress_gzip, t.decompress_gzip),
]
codecs = pytest.mark.parametrize(("name", "compress", "decompress"), CODECS, ids=["zstd", "gzip"])


@pytest.fixture(scope="module")
def zstd_bomb() -> bytes:
    """1 GiB of zeros in one zstd frame (about 32 KiB), made by streaming: no 1 GiB buffer."""
    compressor = zstandard.ZstdCompressor(level=3).compressobj()
    parts = [compressor.compress(ZEROS) for _ in range(GiB // MiB)]
    parts.append(compressor.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def gzip_bomb() -> bytes:
    """256 MiB of zeros in one gzip member (about 1 MiB), streamed at level 1 for speed."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)
    parts = [compressor.compress(ZEROS) for _ in range(256)]
    parts.append(compressor.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def gzip_member_bomb() -> bytes:
    """1 GiB of zeros as 1024 concatenated gzip members of 1 MiB each (about 1 MiB)."""
    return gzip.compress(ZEROS, compresslevel=9, mtime=0) * (GiB // MiB)


# --- round trips and interop --------------------------------------------------------------


@codecs
def test_round_trip_and_str_input(
    name: str, compress: Callable[..., bytes], decompress: Decompress
) -> None:
    data = b"offload " * 1000
    frame = compress(data)
    assert len(frame) < len(data) // 10
    assert decompress(frame) == data
    assert decompress(compress("h\u00e9llo")) == "h\u00e9llo".encode()
    assert decompress(compress(b"")) == b""
    assert (
        registered(f"decompress:{name}").fn(
            {"data": registered(f"compress:{name}").fn({"data": data, "level": 1})}
        )
        == data
    )


def test_interop_with_the_reference_libraries() -> None:
    data = bytes(range(256)) * 100
    assert zstandard.ZstdDecompressor().decompress(t.compress_zstd(data)) == data
    assert t.decompress_zstd(zstandard.ZstdCompressor(level=19).compress(data)) == data
    assert gzip.decompress(t.compress_gzip(data)) == data
    assert t.decompress_gzip(gzip.compress(data)) == data
    # Output is deterministic (gzip mtime is 0).
    assert t.compress_gzip(data) == t.compress_gzip(data)


@codecs
def test_concatenated_frames(
    name: str, compress: Callable[..., bytes], decompress: Decompress
) -> None:
    assert decompress(compress(b"hello ") + compress(b"") + compress(b"world")) == b"hello world"


def test_zstd_skippable_frames_and_streamed_frames() -> None:
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    assert t.decompress_zstd(skippable + t.compress_zstd(b"x") + skippable) == b"x"
    compressor = zstandard.ZstdCompressor().compressobj()  # no content size in the header
    streamed = compressor.compress(b"y" * 5000) + compressor.flush()
    assert t.decompress_zstd(streamed) == b"y" * 5000


def test_zstd_levels_and_dictionary() -> None:
    samples = [b'{"user": %d, "name": "name-%d", "active": true}' % (i, i) for i in range(200)]
    buffers: list[bytes | bytearray | memoryview] = list(samples)
    trained = zstandard.train_dictionary(2048, buffers).as_bytes()
    for dictionary in (trained, b'{"user": , "name": "name-", "active": true}'):
        frame = t.compress_zstd(samples[7], level=19, dictionary=dictionary)
        assert t.decompress_zstd(frame, dictionary=dictionary) == samples[7]
        task = registered("decompress:zstd").fn
        assert task({"data": frame, "dictionary": dictionary}) == samples[7]
    frame = t.compress_zstd(samples[7], dictionary=trained)
    assert len(frame) < len(t.compress_zstd(samples[7]))
    with pytest.raises(InvalidInput):
        t.decompress_zstd(frame)  # the dictionary is needed
    for level in (-7, 1, 22):
        assert t.decompress_zstd(t.compress_zstd(b"abc" * 50, level=level)) == b"abc" * 50


@pytest.mark.parametrize(
    ("fn", "kwargs"),
    [
        (t.compress_zstd, {"level": 23}),
        (t.compress_zstd, {"level": "3"}),
        (t.compress_zstd, {"dictionary": b""}),
        (t.compress_gzip, {"level": 10}),
        (t.compress_gzip, {"level": True}),
        (t.decompress_zstd, {"max_output_size": -1}),
        (t.decompress_gzip, {"max_output_size": 1.5}),
    ],
)
def test_bad_options(fn: Callable[..., bytes], kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInput):
        fn(t.compress_gzip(b"x") if fn is t.decompress_gzip else b"x", **kwargs)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=4096) | st.binary(max_size=8).map(lambda b: b * 500))
def test_round_trip_property(data: bytes) -> None:
    for _, compress, decompress in CODECS:
        frame = compress(data)
        assert decompress(frame) == data
        assert decompress(frame, max_output_size=len(data)) == data
        if data:
            with pytest.raises(OutputTooLarge):
                decompress(frame, max_output_size=len(data) - 1)


# --- limits and bombs ---------------------------------------------------------------------


@codecs
def test_output_exactly_at_the_limit_passes(
    name: str, compress: Callable[..., bytes], decompress: Decompress
) -> None:
    frame = compress(bytes(100_000))
    assert decompress(frame, max_output_size=100_000) == bytes(100_000)
    with pytest.raises(OutputTooLarge) as info:
        decompress(frame, max_output_size=99_999)
    assert info.value.code == "OUTPUT_TOO_LARGE"
    with pytest.raises(OutputTooLarge):
        decompress(frame, max_output_size=0)


def test_zstd_bomb_stops_quickly(zstd_bomb: bytes) -> None:
    assert len(zstd_bomb) < 64 * 1024
    for limit in (None, 64 * MiB, 1 * MiB, 10):
        started = time.perf_counter()
        options: dict[str, Any] = {} if limit is None else {"max_output_size": limit}
        with pytest.raises(OutputTooLarge):
            t.decompress_zstd(zstd_bomb, **options)
        assert time.perf_counter() - started < 5.0
    with pytest.raises(OutputTooLarge):
        registered("decompress:zstd").fn({"data": zstd_bomb})


@pytest.mark.parametrize("bomb_name", ["gzip_bomb", "gzip_member_bomb"])
def test_gzip_bombs_stop_quickly(bomb_name: str, request: pytest.FixtureRequest) -> None:
    bomb: bytes = request.getfixturevalue(bomb_name)
    assert len(bomb) < 2 * MiB
    for limit in (None, 1 * MiB, 10):
        started = time.perf_counter()
        options: dict[str, Any] = {} if limit is None else {"max_output_size": limit}
        with pytest.raises(OutputTooLarge):
            t.decompress_gzip(bomb, **options)
        assert time.perf_counter() - started < 5.0


@pytest.mark.parametrize(
    ("codec", "bomb_name", "limit", "max_growth"),
    [
        ("zstd", "zstd_bomb", None, 64 * MiB + 40 * MiB),
        ("zstd", "zstd_bomb", MiB, 24 * MiB),
        ("gzip", "gzip_bomb", None, 64 * MiB + 40 * MiB),
        ("gzip", "gzip_member_bomb", MiB, 24 * MiB),
    ],
)
def test_bomb_memory_stays_bounded(
    codec: str,
    bomb_name: str,
    limit: int | None,
    max_growth: int,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """In a fresh process, the peak RSS grows by about the limit, not by the bomb's size."""
    path = tmp_path / "bomb"
    path.write_bytes(request.getfixturevalue(bomb_name))
    option = "" if limit is None else f", max_output_size={limit}"
    code = textwrap.dedent(
        f"""
        import resource, sys
        import zstandard
        import offload.tasks as t
        from offload import OutputTooLarge
        data = open({str(path)!r}, "rb").read()
        t.decompress_{codec}(t.compress_{codec}(b"warm up"))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            t.decompress_{codec}(data{option})
        except OutputTooLarge:
            pass
        else:
            sys.exit("no OutputTooLarge")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    growth = int(done.stdout.strip())
    print(f"{codec} {bomb_name} limit={limit}: peak RSS +{growth / MiB:.1f} MiB")
    assert growth < max_growth, f"peak RSS grew by {growth / MiB:.1f} MiB"


# --- corrupt input ------------------------------------------------------------------------


@codecs
def test_corrupt_input_is_invalid_input(
    name: str, compress: Callable[..., bytes], decompress: Decompress
) -> None:
    frame = compress(bytes(range(256)) * 64)
    flipped = bytearray(frame)
    flipped[len(frame) // 2] ^= 0xFF
    cases = {
        "empty": b"",
        "garbage": b"this is not compressed at all",
        "flipped": bytes(flipped),
        "truncated": frame[:-5],
        "header only": frame[:6],
        "trailing garbage": frame + b"garbage!",
        "other codec": CODECS[1][1](b"x") if name == "zstd" else CODECS[0][1](b"x"),
    }
    for label, data in cases.items():
        with pytest.raises(InvalidInput) as info:
            decompress(data)
        assert info.value.code == "INVALID_INPUT", label


@codecs
def test_decompress_rejects_non_bytes(
    name: str, compress: Callable[..., bytes], decompress: Decompress
) -> None:
    with pytest.raises(InvalidInput, match="bytes"):
        decompress("H4sIAAAAAAAA")
    with pytest.raises(InvalidInput, match="data"):
        registered(f"decompress:{name}").fn({"data": None})
    with pytest.raises(InvalidInput, match="unknown data keys"):
        registered(f"decompress:{name}").fn({"data": b"", "limit": 5})
