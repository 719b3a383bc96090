"""The floor's child process: echo length-prefixed frames from stdin to stdout.

Run as a script (``python -I -S _floor_child.py``), standard library only, no imports of
the benchmarks package. A frame is a 4-byte little-endian length and that many bytes;
every complete frame read is written back verbatim, in order, batched per read.
"""

import contextlib
import os


def main() -> None:
    rfd, wfd = 0, 1
    buf = bytearray()
    while True:
        try:
            data = os.read(rfd, 1 << 20)
        except InterruptedError:
            continue
        if not data:
            return
        buf += data
        end = 0
        size = len(buf)
        while size - end >= 4:
            n = int.from_bytes(buf[end : end + 4], "little")
            if size - end - 4 < n:
                break
            end += 4 + n
        if not end:
            continue
        with memoryview(buf) as view:
            out = view[:end]
            while out:
                out = out[os.write(wfd, out) :]
            out.release()
        del buf[:end]


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        main()
