"""The Python floor's worker: unpickle ``(fn, args)``, call it, pickle the result back.

Standard library only. A frame is a 4-byte little-endian length and a pickle. Every complete
frame read is answered, in order, with one write per read (answers batched the way the
requests came). ``serve(rfd, wfd)`` runs until ``rfd`` reaches end of file; it is the body
of the spawned child (``python -P _pyfloor_child.py``, on its stdin and stdout) and of the
subinterpreter in the interpreter variant (``benchmarks.systems.PythonFloorInterpreter``).
An exception in ``fn`` comes back as ``(False, repr)``; a result as ``(True, value)``.
"""

import contextlib
import os
import pickle


def serve(rfd: int, wfd: int) -> None:
    buf = bytearray()
    loads, dumps = pickle.loads, pickle.dumps
    while True:
        try:
            data = os.read(rfd, 1 << 20)
        except InterruptedError:
            continue
        if not data:
            return
        buf += data
        pos = 0
        size = len(buf)
        out = []
        with memoryview(buf) as view:
            while size - pos >= 4:
                n = int.from_bytes(view[pos : pos + 4], "little")
                if size - pos - 4 < n:
                    break
                fn, args = loads(view[pos + 4 : pos + 4 + n])
                pos += 4 + n
                try:
                    answer = dumps((True, fn(*args)), 5)
                except Exception as exc:  # a floor still answers
                    answer = dumps((False, repr(exc)), 5)
                out.append(len(answer).to_bytes(4, "little"))
                out.append(answer)
        if pos:
            del buf[:pos]
        if out:
            rest = memoryview(b"".join(out))
            while rest:
                rest = rest[os.write(wfd, rest) :]


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError, KeyboardInterrupt):
        serve(0, 1)
