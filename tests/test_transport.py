"""Big buffers out of band: shared-memory arenas and inline buffers, on real workers.

The codec is checked with hypothesis over real memfd arenas; the path through workers with
every kind of buffer, at and around the size where buffers leave the pickle, pipelined,
mutated after the call, kept by what they rebuild, failing to load, and too big.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

import tasks
from conftest import release, requires_interpreters
from offload import NotSerializable, PayloadTooLarge, WorkerManager
from offload._offload_worker import arena as _arena
from offload._offload_worker import codec as _codec

# The codec and arenas as one namespace, as the tests below use them.
wire = SimpleNamespace(
    SHARED_MIN=_codec.SHARED_MIN,
    encode=_codec.encode,
    decode_body=_codec.decode_body,
    release=_codec.release,
    Payload=_codec.Payload,
    Arena=_arena.Arena,
)

MIN = wire.SHARED_MIN
KINDS = ["process", pytest.param("interpreter", marks=requires_interpreters)]


# -- the codec -----------------------------------------------------------------------------


def through(obj: Any, arena: Any) -> Any:
    """``obj`` encoded, laid out (in ``arena`` or inline), decoded and loaded, as a worker does."""
    payload = wire.encode(obj)
    if isinstance(payload, bytes):
        return pickle.loads(payload)
    body = memoryview(b"".join(payload.parts(arena, 0)))
    data, buffers, held = wire.decode_body(body, [arena] if arena is not None else [])
    try:
        return pickle.loads(data, buffers=buffers)
    finally:
        assert wire.release(buffers, held)  # nothing kept a view of the arena


buffers = st.sampled_from([bytes, bytearray, memoryview]).flatmap(
    lambda kind: st.integers(0, 3 * MIN).map(lambda n: kind(os.urandom(n)))
)
values = st.recursive(
    buffers | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, memoryview):  # rebuilt as a read-only view of bytes, as in band
        return isinstance(b, memoryview) and b.readonly and a.tobytes() == b.tobytes()
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


@settings(max_examples=60, deadline=None)
@given(value=values, shared=st.booleans())
def test_codec_round_trips_every_shape(value: Any, shared: bool) -> None:
    fd = wire.Arena.create()
    assert fd is not None
    arena = wire.Arena(fd) if shared else None
    try:
        assert same(value, through(value, arena))
    finally:
        if arena is not None:
            arena.close()
        else:
            os.close(fd)


def test_only_big_buffers_leave_the_pickle() -> None:
    assert isinstance(wire.encode(b"x" * (MIN - 1)), bytes)
    payload = wire.encode((b"x" * MIN, [bytearray(MIN)], {"k": memoryview(b"y" * MIN)}))
    assert isinstance(payload, wire.Payload)
    assert [b.nbytes for b in payload.buffers] == [MIN] * 3
    assert len(payload) == len(payload.data) + 3 * MIN
    assert isinstance(wire.encode(b"x" * MIN, out_of_band=False), bytes)


def test_arena_grows_and_keeps_serving() -> None:
    fd = wire.Arena.create()
    assert fd is not None
    arena = wire.Arena(fd)
    try:
        for size in (MIN, 5 * MIN, MIN, 40 * MIN):
            data = os.urandom(size)
            assert through(data, arena) == data
    finally:
        arena.close()


# -- through workers -----------------------------------------------------------------------


@pytest_asyncio.fixture(params=KINDS)
async def wm(request: pytest.FixtureRequest) -> AsyncIterator[WorkerManager]:
    async with WorkerManager(workers=2, kind=request.param, shutdown_grace=10) as manager:
        yield manager


@pytest.mark.parametrize("size", [MIN - 1, MIN, 3 * MIN + 7, 8 << 20])
@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
@pytest.mark.asyncio
async def test_buffers_come_back_as_they_went(wm: WorkerManager, size: int, kind: type) -> None:
    value = kind(os.urandom(size))
    back = await wm.run(tasks.echo, value)
    assert same(value, back)
    nested = await wm.run(tasks.echo, ([value], {"k": value}, value))
    assert same(([value], {"k": value}, value), nested)
    assert await wm.run(tasks.checksum, value) == tasks.checksum(value)


@pytest.mark.asyncio
async def test_pipelined_big_calls_keep_their_own_data(wm: WorkerManager) -> None:
    # More calls than arenas: some buffers go inline, each call still gets its own bytes.
    sizes = [MIN, 2 << 20, 3 * MIN, 1 << 20] * 8
    values = [bytes([i]) * size for i, size in enumerate(sizes)]
    results = await asyncio.gather(*(wm.run(tasks.echo, v) for v in values))
    assert results == values


async def checksum_sent_while_waiting(
    wm: WorkerManager, tmp_path: Path, arg: Any, change: Callable[[], None]
) -> Any:
    """``checksum(arg)``, accepted behind a blocked task on each worker; ``change()`` runs while
    it waits, then the blockers are let go."""
    gates = [tmp_path / "gate1", tmp_path / "gate2"]
    for gate in gates:
        os.mkfifo(gate)
    blockers = [asyncio.create_task(wm.run(tasks.wait_for_fifo, str(g))) for g in gates]
    call = asyncio.create_task(wm.run(tasks.checksum, arg))
    await asyncio.sleep(0)  # accepted: waiting behind the blockers
    change()
    await asyncio.gather(*(asyncio.to_thread(release, gate) for gate in gates))
    await asyncio.gather(*blockers)
    return await call


@pytest.mark.asyncio
async def test_a_buffer_changed_after_the_call_is_sent_as_it_was(
    wm: WorkerManager, tmp_path: Path
) -> None:
    data = bytearray(b"a" * (2 * MIN))

    def change() -> None:
        data[:] = b"b" * len(data)
        data.extend(b"more")  # the manager holds no view of it: it can still grow

    sent = await checksum_sent_while_waiting(wm, tmp_path, data, change)
    assert sent == tasks.checksum(bytearray(b"a" * (2 * MIN)))


@pytest.mark.asyncio
async def test_what_keeps_its_buffer_gets_a_private_copy(wm: WorkerManager) -> None:
    first = await wm.run(tasks.kept, 4 * MIN, 1)
    for fill in (2, 3):  # the arena that carried `first` carries others now
        assert await wm.run(tasks.kept, 4 * MIN, fill) == tasks.kept(4 * MIN, fill)
    assert first == tasks.kept(4 * MIN, 1)
    sent = tasks.kept(4 * MIN, 9)
    assert await wm.run(tasks.echo, sent) == sent


@pytest.mark.asyncio
async def test_a_buffer_that_cannot_load_fails_only_its_task(wm: WorkerManager) -> None:
    with pytest.raises(ValueError, match="cannot rebuild"):  # raised loading it in the worker
        await wm.run(tasks.echo, tasks.Explodes(2 * MIN))
    with pytest.raises(NotSerializable, match="cannot rebuild"):
        await wm.run(tasks.explodes, 2 * MIN)  # the result fails to load here
    data = os.urandom(2 * MIN)
    assert await wm.run(tasks.echo, data) == data
    assert wm.stats().worker_restarts == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.asyncio
async def test_out_of_band_bytes_count_towards_max_payload(kind: str) -> None:
    async with WorkerManager(workers=1, kind=kind, max_payload=4 * MIN) as wm:
        with pytest.raises(PayloadTooLarge, match="arguments"):
            await wm.run(tasks.echo, b"x" * (5 * MIN))
        with pytest.raises(PayloadTooLarge, match="result"):
            await wm.run(tasks.big, 5 * MIN)
        assert await wm.run(tasks.big, 2 * MIN) == b"x" * (2 * MIN)


@pytest.mark.asyncio
async def test_a_worker_lost_with_buffers_in_its_arenas() -> None:
    async with WorkerManager(workers=1, shutdown_grace=10) as wm:
        crash = asyncio.create_task(wm.run(tasks.exit_now))
        behind = asyncio.create_task(wm.run(tasks.checksum, b"z" * (3 * MIN)))
        with pytest.raises(Exception, match="exit code 3"):
            await crash
        assert await behind == tasks.checksum(b"z" * (3 * MIN))
        data = os.urandom(8 << 20)
        assert hashlib.sha256(await wm.run(tasks.echo, data)).digest() == (
            hashlib.sha256(data).digest()
        )


@pytest.mark.asyncio
async def test_a_result_too_big_to_map_goes_inline() -> None:
    # Under a 400 MiB address-space cap, a 250 MiB result fits, but mapping an arena of the same
    # size next to it does not: the answer comes through the pipe instead.
    size = 250 * 2**20
    async with WorkerManager(workers=1, worker_memory_limit=400 * 2**20, spare_workers=0) as wm:
        (pid,) = wm.worker_pids()
        result = await wm.run(tasks.big, size)
        assert len(result) == size
        assert result[:1] == result[-1:] == b"x"
        del result
        assert wm.worker_pids() == [pid]  # the same worker, still serving
        assert await wm.run(tasks.big, 2 * MIN) == b"x" * (2 * MIN)


# -- found in review -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_small_views_beside_big_buffers_keep_their_places(wm: WorkerManager) -> None:
    # A small memoryview stays in the pickle (it needs the slower pickler): the big buffers
    # around it must still line up with their places.
    a, b, c = (bytes([n]) * (MIN + n) for n in (1, 2, 3))
    back = await wm.run(tasks.echo, (a, b, memoryview(b"small"), c, bytearray(a)))
    assert (back[0], back[1], bytes(back[2]), back[3], back[4]) == (a, b, b"small", c, a)


@pytest.mark.asyncio
async def test_one_buffer_in_many_places_travels_once(wm: WorkerManager) -> None:
    chunk = os.urandom(2**20)
    assert len(wire.encode(([chunk] * 300,), depth=3)) < 2 * len(chunk)
    assert await wm.run(len, [chunk] * 300) == 300  # 300 MiB if each were sent: over max_payload
    data = bytearray(2 * MIN)
    first, second = await wm.run(tasks.echo, (data, data))
    assert first is second  # still one object, as pickle shares it
    assert first == data


@pytest.mark.asyncio
async def test_a_read_only_view_of_changing_memory_is_sent_as_it_was(
    wm: WorkerManager, tmp_path: Path
) -> None:
    data = bytearray(b"a" * (2 * MIN))

    def change() -> None:  # (the view itself, an argument, pins its size till the end)
        data[:] = b"b" * len(data)

    view = memoryview(data).toreadonly()
    sent = await checksum_sent_while_waiting(wm, tmp_path, view, change)
    assert sent == tasks.checksum(memoryview(b"a" * (2 * MIN)))


@pytest.mark.asyncio
async def test_containers_shared_or_holding_themselves_keep_their_shape(
    wm: WorkerManager,
) -> None:
    inner = [os.urandom(2 * MIN)]
    first, second = await wm.run(tasks.echo, (inner, inner))
    assert first is second  # one list, as pickle shares it
    assert first == inner
    loop: list[Any] = [os.urandom(2 * MIN)]
    loop.append(loop)
    back = await wm.run(tasks.echo, loop)
    assert back[1] is back  # the cycle survives (its buffer then stays in the pickle)
    assert back[0] == loop[0]
