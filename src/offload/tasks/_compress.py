"""Built-in compression tasks: zstd and gzip, with bounded output.

Decompression never trusts a frame's declared size: output is produced in bounded steps and
the task stops with ``OutputTooLarge`` as soon as ``max_output_size`` is passed, so a
decompression bomb costs at most about ``max_output_size`` of memory.

What the reference decoders accept is accepted:

* gzip: one or more members; NUL bytes after a member (the padding tape and block devices
  add) are skipped, as ``gzip.decompress``/``GzipFile`` do; anything else after a member must
  be another member. Headers are checked as zlib and ``gzip -d`` check them (a wrong header
  CRC or reserved flag bits are refused; the stdlib alone ignores them). Empty input is
  refused, as ``gzip -d`` refuses it.
* zstd: one or more frames, skippable frames (magic ``0x184D2A5?``) anywhere; anything else,
  trailing NUL bytes included, is refused, as ``zstd -d`` refuses it.

zstd comes from the standard library's ``compression.zstd`` on Python 3.14+ (built with
libzstd), in every worker kind: it loads in isolated subinterpreters, so the zstd types run
on interpreter workers there, and one library per Python version means one behaviour
whichever worker runs the task. Before 3.14 (or without ``compression.zstd``) it is the
``zstandard`` package, which only loads in processes. Frames written by either decode with
the other.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import re
import sys
from typing import Any, Final

from .._registry import task
from .._task import KindName
from ..errors import InvalidInput, OutputTooLarge
from ._common import NEEDS_ZSTANDARD, PROCESS_KINDS, as_bytes, check_int, optional_import, unpack

__all__ = (
    "DEFAULT_MAX_OUTPUT_SIZE",
    "STDLIB_ZSTD",
    "compress_gzip",
    "compress_zstd",
    "decompress_gzip",
    "decompress_zstd",
)

#: ``max_output_size`` when none is given: 64 MiB.
DEFAULT_MAX_OUTPUT_SIZE: Final = 64 * 1024 * 1024
#: Whether zstd comes from the standard library (``compression.zstd``, Python 3.14+) here.
STDLIB_ZSTD: Final = sys.version_info >= (3, 14) and importlib.util.find_spec("_zstd") is not None
_MAX_LIMIT: Final = 1 << 40
_CHUNK: Final = 256 * 1024  # output bytes per step
_IN_STEP: Final = 16 * 1024  # input bytes per step: what a decoder keeps is small, never O(input)
_NOT_NUL: Final = re.compile(rb"[^\x00]")
_ZSTD_DICT_MAGIC: Final = b"\x37\xa4\x30\xec"
_ZSTD_MIN_DICT: Final = 8  # libzstd ignores (zstandard) or refuses (compression.zstd) less
# zstandard: a block never decodes to more than 128 KiB and needs at least 4 input bytes (an RLE
# block), so one input byte yields at most 32 KiB. Input is fed in steps sized so that one
# step cannot overshoot the remaining budget by more than _ZSTD_MIN_STEP * 32 KiB.
_ZSTD_EXPANSION: Final = 32 * 1024
_ZSTD_MIN_STEP: Final = 32
_ZSTD_MAX_STEP: Final = 1 << 20
_BAD_ZSTD: Final = "data is not a valid zstd stream (corrupt or wrong dictionary)"
_BAD_DICT: Final = "dictionary is not a usable zstd dictionary"

#: Where the zstd types can run: everywhere with ``compression.zstd``, else processes only.
ZSTD_KINDS: Final[tuple[KindName, ...] | None] = None if STDLIB_ZSTD else PROCESS_KINDS


def compress_zstd(data: bytes | str, *, level: int = 3, dictionary: bytes | None = None) -> bytes:
    """Zstandard-compress ``data`` (a ``str`` as UTF-8) into one frame with a checksum.

    >>> frame = compress_zstd(b"a" * 1000, level=19)
    >>> len(frame) < 30, decompress_zstd(frame) == b"a" * 1000
    (True, True)

    ``level`` is -7..22 (default 3). The frame records its content size and, with a trained
    dictionary, the dictionary's ID. ``dictionary`` (raw content, or a trained dictionary,
    recognised by its magic number; at least 8 bytes) must be given again to
    :func:`decompress_zstd`. Errors: ``InvalidInput`` (``INVALID_INPUT``) for a bad level or
    dictionary.
    """
    payload = as_bytes(data, "data")
    level = check_int(level, "level", -7, 22)
    raw_dict = _zstd_dict_bytes(dictionary)
    if STDLIB_ZSTD:
        zstd = _stdlib_zstd()
        options = {
            zstd.CompressionParameter.compression_level: level,
            zstd.CompressionParameter.checksum_flag: 1,
        }
        zstd_dict = _stdlib_dict(zstd, raw_dict)
        return bytes(zstd.compress(payload, options=options, zstd_dict=zstd_dict))
    zstandard = _zstandard()
    dict_data = _zstandard_dict(zstandard, raw_dict)
    compressor = zstandard.ZstdCompressor(level=level, dict_data=dict_data, write_checksum=True)
    return bytes(compressor.compress(payload))


def decompress_zstd(
    data: bytes,
    *,
    max_output_size: int = DEFAULT_MAX_OUTPUT_SIZE,
    dictionary: bytes | None = None,
) -> bytes:
    """Decompress one or more concatenated zstd frames, at most ``max_output_size`` bytes.

    >>> decompress_zstd(compress_zstd(b"hello"))
    b'hello'

    Skippable frames are skipped. More output than ``max_output_size`` (default 64 MiB) is
    ``OutputTooLarge`` (``OUTPUT_TOO_LARGE``); a corrupt, truncated or non-zstd input, bytes
    after the last frame (NUL padding too, as ``zstd -d`` says) or a wrong dictionary is
    ``InvalidInput`` (``INVALID_INPUT``).
    """
    payload = as_bytes(data, "data", allow_str=False)
    limit = _limit(max_output_size)
    if not payload:
        raise InvalidInput("data is empty, not a zstd frame")
    raw_dict = _zstd_dict_bytes(dictionary)
    if STDLIB_ZSTD:
        return _decompress_stdlib_zstd(payload, limit, raw_dict)
    return _decompress_zstandard(payload, limit, raw_dict)


def _decompress_stdlib_zstd(payload: bytes, limit: int, raw_dict: bytes | None) -> bytes:
    zstd = _stdlib_zstd()
    zstd_dict = _stdlib_dict(zstd, raw_dict)
    out: list[bytes] = []
    total = 0
    view = memoryview(payload)
    pos = 0
    while pos < len(view):
        decompressor = zstd.ZstdDecompressor(zstd_dict=zstd_dict)
        while not decompressor.eof:
            piece: bytes | memoryview = b""
            if decompressor.needs_input:
                if pos >= len(view):
                    raise InvalidInput("data is a truncated zstd frame")
                piece = view[pos : pos + _IN_STEP]
                pos += len(piece)
            failed = False
            try:
                chunk = decompressor.decompress(piece, min(_CHUNK, limit - total + 1))
            except zstd.ZstdError:
                failed = True
            if failed:
                raise InvalidInput(_BAD_ZSTD)
            total += len(chunk)
            if total > limit:
                raise OutputTooLarge(f"decompressed output exceeds max_output_size={limit}")
            out.append(chunk)
        # The frame is complete; what it did not use of the input fed so far starts the next.
        pos -= len(decompressor.unused_data)
    return b"".join(out)


def _decompress_zstandard(payload: bytes, limit: int, raw_dict: bytes | None) -> bytes:
    zstandard = _zstandard()
    decompressor = zstandard.ZstdDecompressor(dict_data=_zstandard_dict(zstandard, raw_dict))
    failed = False
    out: list[bytes] = []
    total = 0
    view = memoryview(payload)
    pos = 0
    while pos < len(view):
        obj = decompressor.decompressobj()
        while True:
            budget = limit - total + 1
            step = max(_ZSTD_MIN_STEP, min(_ZSTD_MAX_STEP, budget // _ZSTD_EXPANSION))
            piece = view[pos : pos + step]
            pos += len(piece)
            try:
                chunk = obj.decompress(piece)
            except zstandard.ZstdError:
                failed = True
            if failed:
                raise InvalidInput(_BAD_ZSTD)
            total += len(chunk)
            if total > limit:
                raise OutputTooLarge(f"decompressed output exceeds max_output_size={limit}")
            out.append(chunk)
            if obj.eof:
                # The frame is complete; the bytes it did not use start the next frame.
                pos -= len(obj.unused_data)
                break
            if pos >= len(view):
                raise InvalidInput("data is a truncated zstd frame")
    return b"".join(out)


def _stdlib_zstd() -> Any:
    return importlib.import_module("compression.zstd")


def _zstandard() -> Any:
    with optional_import("zstandard", "zstd", NEEDS_ZSTANDARD):
        import zstandard
    return zstandard


def _zstd_dict_bytes(dictionary: object) -> bytes | None:
    if dictionary is None:
        return None
    raw = as_bytes(dictionary, "dictionary", allow_str=False)
    if len(raw) < _ZSTD_MIN_DICT:
        raise InvalidInput(f"dictionary must be at least {_ZSTD_MIN_DICT} bytes")
    return raw


def _stdlib_dict(zstd: Any, raw: bytes | None) -> Any:
    """A ``ZstdDict``: trained if ``raw`` starts with the dictionary magic, else raw content
    (libzstd's "auto" type, which ``zstandard`` uses)."""
    if raw is None:
        return None
    with contextlib.suppress(zstd.ZstdError, ValueError):
        return zstd.ZstdDict(raw, is_raw=not raw.startswith(_ZSTD_DICT_MAGIC))
    raise InvalidInput(_BAD_DICT)


def _zstandard_dict(zstandard: Any, raw: bytes | None) -> Any:
    """A ``ZstdCompressionDict`` of libzstd's "auto" type, loaded now so a bad one is told."""
    if raw is None:
        return None
    with contextlib.suppress(zstandard.ZstdError):
        loaded = zstandard.ZstdCompressionDict(raw)
        loaded.precompute_compress(level=3)  # parses it: a corrupt trained one fails here
        return loaded
    raise InvalidInput(_BAD_DICT)


def compress_gzip(data: bytes | str, *, level: int = 6) -> bytes:
    """Gzip-compress ``data`` (a ``str`` as UTF-8); ``level`` 0..9 (default 6), mtime 0.

    >>> decompress_gzip(compress_gzip("hello"))
    b'hello'
    """
    import gzip

    payload = as_bytes(data, "data")
    level = check_int(level, "level", 0, 9)
    return gzip.compress(payload, compresslevel=level, mtime=0)


def decompress_gzip(data: bytes, *, max_output_size: int = DEFAULT_MAX_OUTPUT_SIZE) -> bytes:
    """Decompress one or more concatenated gzip members, at most ``max_output_size`` bytes.

    >>> decompress_gzip(compress_gzip(b"x" * 10), max_output_size=10)
    b'xxxxxxxxxx'
    >>> decompress_gzip(compress_gzip(b"on tape") + bytes(512))  # NUL padding after a member
    b'on tape'

    NUL bytes after a member are skipped (as ``gzip.decompress`` skips them). More output
    than ``max_output_size`` (default 64 MiB) is ``OutputTooLarge`` (``OUTPUT_TOO_LARGE``); a
    corrupt, truncated, empty or non-gzip input, or anything but NULs and members after a
    member, is ``InvalidInput`` (``INVALID_INPUT``).
    """
    import zlib

    payload = as_bytes(data, "data", allow_str=False)
    limit = _limit(max_output_size)
    if not payload:
        raise InvalidInput("data is empty, not a gzip stream")
    out: list[bytes] = []
    total = 0
    view = memoryview(payload)
    pos = 0
    while pos < len(view):
        obj = zlib.decompressobj(wbits=31)  # gzip header and trailer (CRC-32, size) checked
        pending: bytes | memoryview = b""
        while not obj.eof:
            if not pending and pos < len(view):
                pending = view[pos : pos + _IN_STEP]
                pos += len(pending)
            failed = False
            try:
                chunk = obj.decompress(pending, min(_CHUNK, limit - total + 1))
            except zlib.error:
                failed = True
            if failed:
                raise InvalidInput("data is not a valid gzip stream")
            total += len(chunk)
            if total > limit:
                raise OutputTooLarge(f"decompressed output exceeds max_output_size={limit}")
            out.append(chunk)
            pending = obj.unconsumed_tail
            if not obj.eof and not chunk and not pending and pos >= len(view):
                raise InvalidInput("data is a truncated gzip stream")
        # The member is complete: what it did not use of the input fed so far comes next,
        # after any NUL padding.
        pos -= len(obj.unused_data)
        found = _NOT_NUL.search(payload, pos)
        pos = len(view) if found is None else found.start()
    return b"".join(out)


def _limit(value: object) -> int:
    if value is None:
        return DEFAULT_MAX_OUTPUT_SIZE
    return check_int(value, "max_output_size", 0, _MAX_LIMIT)


@task("compress:zstd", kinds=ZSTD_KINDS, why_not="" if STDLIB_ZSTD else NEEDS_ZSTANDARD)
def _compress_zstd_task(data: Any) -> bytes:
    args = unpack(data, "compress:zstd", ("data",), ("level", "dictionary"))
    return compress_zstd(
        args["data"], level=args.get("level", 3), dictionary=args.get("dictionary")
    )


@task("decompress:zstd", kinds=ZSTD_KINDS, why_not="" if STDLIB_ZSTD else NEEDS_ZSTANDARD)
def _decompress_zstd_task(data: Any) -> bytes:
    args = unpack(data, "decompress:zstd", ("data",), ("max_output_size", "dictionary"))
    return decompress_zstd(
        args["data"],
        max_output_size=args.get("max_output_size", DEFAULT_MAX_OUTPUT_SIZE),
        dictionary=args.get("dictionary"),
    )


@task("compress:gzip")
def _compress_gzip_task(data: Any) -> bytes:
    args = unpack(data, "compress:gzip", ("data",), ("level",))
    return compress_gzip(args["data"], level=args.get("level", 6))


@task("decompress:gzip")
def _decompress_gzip_task(data: Any) -> bytes:
    args = unpack(data, "decompress:gzip", ("data",), ("max_output_size",))
    return decompress_gzip(
        args["data"], max_output_size=args.get("max_output_size", DEFAULT_MAX_OUTPUT_SIZE)
    )
