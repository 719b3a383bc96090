"""Built-in compression tasks: zstd (process workers) and gzip (any worker).

Decompression never trusts a frame's declared size: output is produced in bounded steps and
the task stops with ``OutputTooLarge`` as soon as ``max_output_size`` is passed, so a
decompression bomb costs at most about ``max_output_size`` of memory.
"""

from __future__ import annotations

from typing import Any, Final

from .._registry import task
from ..errors import InvalidInput, OutputTooLarge
from ._common import NEEDS_ZSTANDARD, PROCESS_KINDS, as_bytes, check_int, optional_import, unpack

__all__ = (
    "DEFAULT_MAX_OUTPUT_SIZE",
    "compress_gzip",
    "compress_zstd",
    "decompress_gzip",
    "decompress_zstd",
)

#: ``max_output_size`` when none is given: 64 MiB.
DEFAULT_MAX_OUTPUT_SIZE: Final = 64 * 1024 * 1024
_MAX_LIMIT: Final = 1 << 40
_CHUNK: Final = 256 * 1024  # gzip: output bytes per step
# zstd: a block never decodes to more than 128 KiB and needs at least 4 input bytes (an RLE
# block), so one input byte yields at most 32 KiB. Input is fed in steps sized so that one
# step cannot overshoot the remaining budget by more than _ZSTD_MIN_STEP * 32 KiB.
_ZSTD_EXPANSION: Final = 32 * 1024
_ZSTD_MIN_STEP: Final = 32
_ZSTD_MAX_STEP: Final = 1 << 20


def compress_zstd(data: bytes | str, *, level: int = 3, dictionary: bytes | None = None) -> bytes:
    """Zstandard-compress ``data`` (a ``str`` as UTF-8) into one frame with a checksum.

    >>> frame = compress_zstd(b"a" * 1000, level=19)
    >>> len(frame) < 30, decompress_zstd(frame) == b"a" * 1000
    (True, True)

    ``level`` is -7..22 (default 3). ``dictionary`` (raw content or a trained dictionary)
    must be given again to :func:`decompress_zstd`.
    """
    payload = as_bytes(data, "data")
    level = check_int(level, "level", -7, 22)
    with optional_import("zstandard", "zstd", NEEDS_ZSTANDARD):
        import zstandard
    dict_data = _zstd_dict(zstandard, dictionary)
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

    More output than ``max_output_size`` (default 64 MiB) is ``OutputTooLarge``; a corrupt,
    truncated or non-zstd input is ``InvalidInput``.
    """
    payload = as_bytes(data, "data", allow_str=False)
    limit = _limit(max_output_size)
    if not payload:
        raise InvalidInput("data is empty, not a zstd frame")
    with optional_import("zstandard", "zstd", NEEDS_ZSTANDARD):
        import zstandard
    decompressor = zstandard.ZstdDecompressor(dict_data=_zstd_dict(zstandard, dictionary))
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
            failed = False
            try:
                chunk = obj.decompress(piece)
            except zstandard.ZstdError:
                failed = True
            if failed:
                raise InvalidInput("data is not a valid zstd stream (corrupt or wrong dictionary)")
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


def _zstd_dict(zstandard: Any, dictionary: object) -> Any:
    if dictionary is None:
        return None
    raw = as_bytes(dictionary, "dictionary", allow_str=False)
    if not raw:
        raise InvalidInput("dictionary must not be empty")
    return zstandard.ZstdCompressionDict(raw)


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

    More output than ``max_output_size`` (default 64 MiB) is ``OutputTooLarge``; a corrupt,
    truncated or non-gzip input is ``InvalidInput``.
    """
    import zlib

    payload = as_bytes(data, "data", allow_str=False)
    limit = _limit(max_output_size)
    if not payload:
        raise InvalidInput("data is empty, not a gzip stream")
    out: list[bytes] = []
    total = 0
    pending = payload
    while pending:
        obj = zlib.decompressobj(wbits=31)  # gzip header and trailer (CRC-32, size) checked
        while True:
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
            if obj.eof:
                pending = obj.unused_data
                break
            pending = obj.unconsumed_tail
            if not pending and not chunk:
                raise InvalidInput("data is a truncated gzip stream")
    return b"".join(out)


def _limit(value: object) -> int:
    if value is None:
        return DEFAULT_MAX_OUTPUT_SIZE
    return check_int(value, "max_output_size", 0, _MAX_LIMIT)


@task("compress:zstd", kinds=PROCESS_KINDS, why_not=NEEDS_ZSTANDARD)
def _compress_zstd_task(data: Any) -> bytes:
    args = unpack(data, "compress:zstd", ("data",), ("level", "dictionary"))
    return compress_zstd(
        args["data"], level=args.get("level", 3), dictionary=args.get("dictionary")
    )


@task("decompress:zstd", kinds=PROCESS_KINDS, why_not=NEEDS_ZSTANDARD)
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
