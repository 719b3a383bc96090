"""decompress:gzip / decompress:zstd against the reference decoders.

What the standard library and the reference tools (``gzip -d``, ``zstd -d``) decode, offload
decodes, to the same bytes, and what they refuse, offload refuses; output stays bounded by
``max_output_size`` all the while. Streams are built from real members and frames plus the
things found after them on disk and tape: NUL padding, more members, skippable frames,
garbage, truncation.
"""

from __future__ import annotations

import gzip
import shutil
import struct
import subprocess
import zlib
from dataclasses import dataclass

import pytest
import zstandard
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import offload.tasks as t
from offload import InvalidInput, OutputTooLarge

GZIP = shutil.which("gzip")
ZSTD = shutil.which("zstd")
needs_gzip = pytest.mark.skipif(GZIP is None, reason="no gzip binary")
needs_zstd = pytest.mark.skipif(ZSTD is None, reason="no zstd binary")
# A few examples each: every one runs real decoder processes.
reference = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Verdict:
    """What one decoder made of a stream: its output, or None if it refused it."""

    output: bytes | None

    @property
    def ok(self) -> bool:
        return self.output is not None


def cli(tool: str, data: bytes) -> Verdict:
    """``tool -dc`` on ``data``: success only with exit status 0 (2 is gzip's "warning")."""
    done = subprocess.run([tool, "-dcq"], input=data, capture_output=True, timeout=60, check=False)
    return Verdict(done.stdout if done.returncode == 0 else None)


def ours(decompress: object, data: bytes) -> Verdict:
    assert callable(decompress)
    try:
        return Verdict(decompress(data))
    except InvalidInput as exc:
        code = exc.code
    assert code == "INVALID_INPUT"
    return Verdict(None)


def check_limits(decompress: object, data: bytes, expected: bytes) -> None:
    """The bomb limit still holds on every accepted stream: exactly enough passes."""
    assert callable(decompress)
    assert decompress(data, max_output_size=len(expected)) == expected
    if expected:
        with pytest.raises(OutputTooLarge):
            decompress(data, max_output_size=len(expected) - 1)


# --- gzip ------------------------------------------------------------------------------------

FTEXT, FHCRC, FEXTRA, FNAME, FCOMMENT = 1, 2, 4, 8, 16


@st.composite
def gzip_members(draw: st.DrawFn) -> bytes:
    """One gzip member as real producers write it: gzip.compress, or a header with the
    optional fields (name, comment, extra, a correct header CRC) around a raw deflate body."""
    content = draw(
        st.binary(max_size=3000) | st.binary(min_size=1, max_size=4).map(lambda b: b * 700)
    )
    level = draw(st.integers(0, 9))
    if draw(st.booleans()):
        return gzip.compress(content, compresslevel=level, mtime=draw(st.integers(0, 2**32 - 1)))
    flags = draw(st.integers(0, 31))
    header = struct.pack(
        "<BBBBIBB",
        0x1F,
        0x8B,
        8,
        flags,
        draw(st.integers(0, 2**32 - 1)),
        0,
        draw(st.integers(0, 255)),
    )
    if flags & FEXTRA:
        extra = draw(st.binary(max_size=40))
        header += struct.pack("<H", len(extra)) + extra
    if flags & FNAME:
        header += draw(st.binary(max_size=20)).replace(b"\0", b"_") + b"\0"
    if flags & FCOMMENT:
        header += draw(st.binary(max_size=20)).replace(b"\0", b"_") + b"\0"
    if flags & FHCRC:
        header += struct.pack("<H", zlib.crc32(header) & 0xFFFF)
    deflate = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(content) + deflate.flush()
    return header + body + struct.pack("<II", zlib.crc32(content), len(content) & 0xFFFFFFFF)


padding = st.integers(0, 3000).flatmap(
    lambda n: st.sampled_from([0, 1, 7, 512, n])
)  # mostly none or block-sized, sometimes anything
junk = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=20)


@st.composite
def gzip_streams(draw: st.DrawFn) -> bytes:
    members = draw(st.lists(gzip_members(), min_size=1, max_size=4))
    stream = b"".join(member + bytes(draw(padding)) for member in members)
    tail = draw(st.sampled_from(["none", "none", "garbage", "truncated", "lone NUL", "magic only"]))
    if tail == "garbage":
        stream += draw(junk).encode()
    elif tail == "truncated":
        stream = stream[: draw(st.integers(1, len(stream) - 1))]
    elif tail == "lone NUL":
        stream = b"\0" + stream
    elif tail == "magic only":
        stream += b"\x1f\x8b"
    return stream


def stdlib_gzip(data: bytes) -> Verdict:
    try:
        return Verdict(gzip.decompress(data))
    except (OSError, EOFError, zlib.error):  # BadGzipFile is an OSError
        return Verdict(None)


def test_gzip_member_then_nul_padding() -> None:
    """The reported case, simplest form: one member, then the NULs a tape drive adds."""
    stream = gzip.compress(b"hello\n", mtime=0) + bytes(10)
    assert gzip.decompress(stream) == b"hello\n"
    assert t.decompress_gzip(stream) == b"hello\n"


@pytest.mark.parametrize("pad", [1, 2, 7, 8, 9, 511, 512, 10240, 65536 * 3 + 1])
@pytest.mark.parametrize("members", [1, 2, 3])
def test_gzip_padding_of_any_length_after_any_member(members: int, pad: int) -> None:
    parts = [gzip.compress(b"part %d " % i * 50, mtime=0) for i in range(members)]
    padded_end = b"".join(parts) + bytes(pad)
    between = bytes(pad).join(parts) + bytes(pad)  # the stdlib also skips NULs between members
    expected = b"".join(b"part %d " % i * 50 for i in range(members))
    for stream in (padded_end, between):
        assert gzip.decompress(stream) == expected
        assert t.decompress_gzip(stream) == expected
        check_limits(t.decompress_gzip, stream, expected)


@needs_gzip
def test_gzip_padding_matches_zcat() -> None:
    stream = gzip.compress(b"block device\n", mtime=0) * 2 + bytes(4096)
    assert cli("gzip", stream).output == b"block device\n" * 2
    assert t.decompress_gzip(stream) == b"block device\n" * 2


@pytest.mark.parametrize(
    "tail",
    [b"garbage", b"\0\0garbage", b"\0" * 600 + b"x", b"\x1f", b"\x1f\x8b", b"\0\x1f\x8b\x08"],
)
def test_gzip_anything_but_nul_or_a_member_after_a_member_is_refused(tail: bytes) -> None:
    stream = gzip.compress(b"data", mtime=0) + tail
    with pytest.raises((OSError, EOFError)):
        gzip.decompress(stream)
    with pytest.raises(InvalidInput):
        t.decompress_gzip(stream)


def test_gzip_nul_padding_is_not_a_way_around_the_limit() -> None:
    bomb = gzip.compress(bytes(1 << 20), compresslevel=9, mtime=0)
    stream = (bomb + bytes(100)) * 64  # 64 MiB of output, NULs between the members
    with pytest.raises(OutputTooLarge):
        t.decompress_gzip(stream, max_output_size=3 << 20)


def test_gzip_nuls_before_the_first_member_are_refused() -> None:
    stream = bytes(4) + gzip.compress(b"x", mtime=0)
    with pytest.raises(OSError):
        gzip.decompress(stream)
    with pytest.raises(InvalidInput):
        t.decompress_gzip(stream)


def test_gzip_headers_are_checked_like_zlib_and_gzip_do() -> None:
    """A wrong header CRC or reserved flag bits: zlib and gzip(1) refuse, and so does offload
    (the stdlib alone skips both)."""
    content = b"hello\n"
    deflate = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = deflate.compress(content) + deflate.flush()
    trailer = struct.pack("<II", zlib.crc32(content), len(content))
    head = b"\x1f\x8b\x08" + bytes([FHCRC]) + bytes(4) + b"\x00\x03"
    good_crc = head + struct.pack("<H", zlib.crc32(head) & 0xFFFF) + body + trailer
    bad_crc = head + struct.pack("<H", ~zlib.crc32(head) & 0xFFFF) + body + trailer
    reserved = b"\x1f\x8b\x08\x20" + bytes(4) + b"\x00\x03" + body + trailer
    assert t.decompress_gzip(good_crc) == content
    for stream in (bad_crc, reserved):
        with pytest.raises(zlib.error):
            zlib.decompress(stream, wbits=31)
        if GZIP is not None:
            assert not cli("gzip", stream).ok
        with pytest.raises(InvalidInput):
            t.decompress_gzip(stream)


@reference
@given(stream=gzip_streams())
@example(stream=gzip.compress(b"hello\n", mtime=0) + bytes(10))
@example(stream=gzip.compress(b"a", mtime=0) + bytes(3) + gzip.compress(b"b", mtime=0))
def test_gzip_agrees_with_the_stdlib(stream: bytes) -> None:
    """Exactly ``gzip.decompress``: same bytes out, or both refuse (headers aside, above)."""
    expected = stdlib_gzip(stream)
    got = ours(t.decompress_gzip, stream)
    assert got == expected
    if expected.output is not None:
        check_limits(t.decompress_gzip, stream, expected.output)


@needs_gzip
@reference
@given(stream=gzip_streams())
@example(stream=gzip.compress(b"hello\n", mtime=0) + bytes(10))
def test_gzip_decodes_whatever_gzip_and_the_stdlib_both_decode(stream: bytes) -> None:
    tool = cli("gzip", stream)
    stdlib = stdlib_gzip(stream)
    got = ours(t.decompress_gzip, stream)
    if tool.ok and stdlib.ok:
        assert tool.output == stdlib.output
        assert got == tool
    if not stdlib.ok:
        assert not got.ok
    if not tool.ok and stdlib.ok:
        # gzip stops at NULs followed by another member ("trailing garbage", status 2); the
        # stdlib, and offload with it, decode the member after the NULs.
        assert got == stdlib


# --- zstd ------------------------------------------------------------------------------------

SKIPPABLE_MAGIC = 0x184D2A50  # ... to 0x184D2A5F


@st.composite
def zstd_frames(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """(frame, what it decodes to): real frames of every shape, or a skippable frame."""
    kind = draw(st.sampled_from(["one-shot", "streamed", "skippable", "empty"]))
    if kind == "skippable":
        nibble = draw(st.integers(0, 15))
        user = draw(st.binary(max_size=64))
        return struct.pack("<II", SKIPPABLE_MAGIC + nibble, len(user)) + user, b""
    content = (
        b""
        if kind == "empty"
        else draw(
            st.binary(max_size=3000) | st.binary(min_size=1, max_size=4).map(lambda b: b * 900)
        )
    )
    compressor = zstandard.ZstdCompressor(
        level=draw(st.integers(-7, 19)),
        write_checksum=draw(st.booleans()),
        write_content_size=draw(st.booleans()),
    )
    if kind == "streamed":  # no content size in the header, several blocks
        obj = compressor.compressobj()
        frame = obj.compress(content) + obj.flush()
    else:
        frame = compressor.compress(content)
    return frame, content


@st.composite
def zstd_streams(draw: st.DrawFn) -> bytes:
    frames = draw(st.lists(zstd_frames(), min_size=1, max_size=4))
    stream = b"".join(frame for frame, _ in frames)
    tail = draw(st.sampled_from(["none", "none", "NULs", "garbage", "truncated"]))
    if tail == "NULs":
        stream += bytes(draw(st.integers(1, 600)))
    elif tail == "garbage":
        stream += draw(junk).encode()
    elif tail == "truncated":
        stream = stream[: draw(st.integers(1, len(stream) - 1))] if len(stream) > 1 else b""
    return stream


def zstandard_reference(data: bytes) -> Verdict:
    """zstandard across frames (it cannot tell a truncated last frame: see the CLI test)."""
    try:
        return Verdict(
            zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(data)
        )
    except zstandard.ZstdError:
        return Verdict(None)


def test_zstd_frames_then_nul_padding_are_refused_like_zstd_does() -> None:
    frame = zstandard.ZstdCompressor().compress(b"hello\n")
    for tail in (b"\0", bytes(8), bytes(512)):
        with pytest.raises(zstandard.ZstdError):
            zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(
                frame + tail
            )
        if ZSTD is not None:
            assert not cli("zstd", frame + tail).ok
        with pytest.raises(InvalidInput):
            t.decompress_zstd(frame + tail)


def test_zstd_skippable_frames_of_every_magic() -> None:
    frame = zstandard.ZstdCompressor().compress(b"payload")
    for nibble in range(16):
        skippable = struct.pack("<II", SKIPPABLE_MAGIC + nibble, 5) + b"user!"
        stream = skippable + frame + skippable + frame + skippable
        assert t.decompress_zstd(stream) == b"payload" * 2
        assert t.decompress_zstd(skippable) == b""


@reference
@given(stream=zstd_streams())
def test_zstd_agrees_with_zstandard(stream: bytes) -> None:
    if not stream:
        return
    expected = zstandard_reference(stream)
    got = ours(t.decompress_zstd, stream)
    if not expected.ok:
        assert not got.ok
    if got.ok:
        assert got == expected
        assert got.output is not None
        check_limits(t.decompress_zstd, stream, got.output)


@needs_zstd
@reference
@given(stream=zstd_streams())
def test_zstd_agrees_with_the_zstd_tool(stream: bytes) -> None:
    """``zstd -d`` is strict (a truncated frame, NULs or garbage at the end: status 1), and
    offload agrees with it on every stream, accepted or not."""
    tool = cli("zstd", stream)
    got = ours(t.decompress_zstd, stream) if stream else Verdict(None)
    assert got == tool


def test_zstd_agrees_with_the_stdlib_when_it_has_one() -> None:
    if not t.STDLIB_ZSTD:
        pytest.skip("compression.zstd is Python 3.14+")
    from compression import zstd  # type: ignore[import-not-found,unused-ignore]

    frame = zstandard.ZstdCompressor().compress(b"x" * 100)
    skippable = struct.pack("<II", SKIPPABLE_MAGIC, 2) + b"ok"
    for stream in (frame, frame + skippable + frame, skippable):
        assert t.decompress_zstd(stream) == zstd.decompress(stream)
    for bad in (frame + bytes(4), frame + b"junk", frame[:-1]):
        with pytest.raises(zstd.ZstdError):
            zstd.decompress(bad)
        with pytest.raises(InvalidInput):
            t.decompress_zstd(bad)


# --- zstd: frames cross between the libraries -----------------------------------------------

SAMPLES = [b'{"user": %d, "name": "name-%d", "active": true}' % (i, i) for i in range(300)]
TRAINED = zstandard.train_dictionary(1024, list(SAMPLES)).as_bytes()
RAW_DICT = b'{"user": , "name": "name-", "active": true}'


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=5000) | st.sampled_from(SAMPLES),
    level=st.integers(-7, 22),
    dictionary=st.sampled_from([None, TRAINED, RAW_DICT]),
)
@example(data=b"", level=3, dictionary=None)
def test_zstd_frames_cross_between_libraries(
    data: bytes, level: int, dictionary: bytes | None
) -> None:
    """offload's frames decode with zstandard (and with compression.zstd where it exists),
    and theirs with offload, dictionaries included: whichever library offload uses here."""
    zdict = None if dictionary is None else zstandard.ZstdCompressionDict(dictionary)
    ours_frame = t.compress_zstd(data, level=level, dictionary=dictionary)
    assert zstandard.ZstdDecompressor(dict_data=zdict).decompress(ours_frame) == data
    params = zstandard.get_frame_parameters(ours_frame)
    assert params.content_size == len(data)  # one-shot decoders need it
    assert params.has_checksum
    theirs = zstandard.ZstdCompressor(level=level, dict_data=zdict).compress(data)
    assert t.decompress_zstd(theirs, dictionary=dictionary) == data
    if t.STDLIB_ZSTD:
        from compression import zstd  # type: ignore[import-not-found,unused-ignore]

        sdict = None
        if dictionary is not None:
            sdict = zstd.ZstdDict(dictionary, is_raw=dictionary is RAW_DICT)
        assert zstd.decompress(ours_frame, zstd_dict=sdict) == data
        stdlib_frame = zstd.compress(data, level=level, zstd_dict=sdict)
        assert t.decompress_zstd(stdlib_frame, dictionary=dictionary) == data


def test_zstd_dictionaries_are_checked_alike_everywhere() -> None:
    for bad in (b"", b"seven b", b"\x37\xa4\x30\xec" + bytes(60)):  # short; corrupt trained
        with pytest.raises(InvalidInput, match="dictionary"):
            t.compress_zstd(b"x", dictionary=bad)
        with pytest.raises(InvalidInput, match="dictionary"):
            t.decompress_zstd(t.compress_zstd(b"x"), dictionary=bad)
    frame = t.compress_zstd(b"x" * 100, dictionary=TRAINED)
    with pytest.raises(InvalidInput):
        t.decompress_zstd(frame)  # the dictionary is needed
    with pytest.raises(InvalidInput):
        t.decompress_zstd(frame, dictionary=RAW_DICT)  # and it must be the right one
