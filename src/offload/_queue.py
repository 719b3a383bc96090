"""The ready queue: strict priority, and within one priority either FIFO or a fair share
between flows.

* ``"fifo"``: high before normal before low; within one priority, arrival order.
* ``"fair"``: high before normal before low; within one priority, flows (functions or task
  types) take turns by deficit round robin weighted by estimated cost, so each flow with work
  waiting gets about the same worker time. Within one flow, arrival order. A burst of 0.6 s
  password hashes then holds each worker for one hash at a time while cheap tasks of another
  flow keep starting between them.

A job keeps its arrival number (``seq``): one that comes back unstarted goes back in its old
place. Removal is lazy: a job that leaves the queue (its caller left, its deadline passed) is
skipped when it surfaces.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Final, Protocol

__all__ = ("QueueItem", "ReadyQueue")

#: Worker time (seconds) a flow earns per turn in fair mode.
QUANTUM: Final = 0.005
#: The cost counted for a job of unknown run time (fair share and work ahead).
UNKNOWN_COST: Final = 0.001


class QueueItem(Protocol):
    seq: int
    priority: int
    flow: object
    cost: float | None
    queued: bool  # still in the queue (lazy removal: False means skip it)


class _Flow:
    __slots__ = ("deficit", "heap", "work")

    def __init__(self) -> None:
        self.heap: list[tuple[int, QueueItem]] = []  # (seq, item): FIFO, old places kept
        self.deficit = 0.0
        self.work = 0.0  # estimated seconds queued


class ReadyQueue:
    """Jobs waiting for a worker, in the order they should start."""

    def __init__(self, fair: bool) -> None:
        self.fair = fair
        self.size = 0
        self.counts = [0, 0, 0]  # per priority
        self.work = [0.0, 0.0, 0.0]  # estimated seconds queued, per priority
        self._fifo: list[list[tuple[int, QueueItem]]] = [[], [], []]
        self._flows: list[dict[object, _Flow]] = [{}, {}, {}]
        self._turns: list[deque[object]] = [deque(), deque(), deque()]

    def __len__(self) -> int:
        return self.size

    @staticmethod
    def cost(item: QueueItem) -> float:
        return UNKNOWN_COST if item.cost is None else item.cost

    def push(self, item: QueueItem, returned: bool = False) -> None:
        """Add ``item`` in its place (by ``seq``: a returned job goes back where it was, and
        its flow gets back the turn it spent on it)."""
        item.queued = True
        p = item.priority
        self.size += 1
        self.counts[p] += 1
        cost = self.cost(item)
        self.work[p] += cost
        if not self.fair:
            heapq.heappush(self._fifo[p], (item.seq, item))
            return
        flows = self._flows[p]
        flow = flows.get(item.flow)
        if flow is None:
            flow = flows[item.flow] = _Flow()
            self._turns[p].append(item.flow)
        heapq.heappush(flow.heap, (item.seq, item))
        flow.work += cost
        if returned:
            flow.deficit += cost

    def discard(self, item: QueueItem) -> None:
        """Take ``item`` out (it stays in its heap until it surfaces)."""
        if not item.queued:
            return
        item.queued = False
        self._forget(item)

    def _forget(self, item: QueueItem) -> None:
        p = item.priority
        self.size -= 1
        self.counts[p] -= 1
        cost = self.cost(item)
        self.work[p] = max(0.0, self.work[p] - cost)
        if self.fair:
            flow = self._flows[p].get(item.flow)
            if flow is not None:
                flow.work = max(0.0, flow.work - cost)

    def peek(self) -> QueueItem | None:
        """The job that should start next (``take`` it once it is sent)."""
        for p in range(3):
            if self.counts[p]:
                return self._peek_fifo(p) if not self.fair else self._peek_fair(p)
        return None

    def _peek_fifo(self, p: int) -> QueueItem | None:
        heap = self._fifo[p]
        while heap:
            item = heap[0][1]
            if item.queued:
                return item
            heapq.heappop(heap)
        return None

    def _head(self, p: int, key: object) -> QueueItem | None:
        flow = self._flows[p][key]
        heap = flow.heap
        while heap:
            item = heap[0][1]
            if item.queued:
                return item
            heapq.heappop(heap)
        return None

    def _peek_fair(self, p: int) -> QueueItem | None:
        turns = self._turns[p]
        flows = self._flows[p]
        while turns:
            # Drop flows with nothing left; find one whose deficit covers its head.
            shortfall = float("inf")
            for _ in range(len(turns)):
                key = turns[0]
                head = self._head(p, key)
                if head is None:
                    turns.popleft()
                    del flows[key]
                    continue
                flow = flows[key]
                need = self.cost(head) - flow.deficit
                if need <= 0:
                    return head
                shortfall = min(shortfall, need)
                turns.rotate(-1)
            if not turns:
                return None
            # Nobody can go yet: every flow earns enough turns at once for the nearest one.
            rounds = max(1, -int(-shortfall // QUANTUM))
            for key in turns:
                flows[key].deficit += rounds * QUANTUM
        return None

    def take(self, item: QueueItem) -> None:
        """``item`` (the one ``peek`` gave) leaves the queue to start."""
        if not item.queued:
            return
        item.queued = False
        self._forget(item)
        p = item.priority
        if not self.fair:
            heap = self._fifo[p]
            if heap and heap[0][1] is item:
                heapq.heappop(heap)
            return
        flow = self._flows[p].get(item.flow)
        if flow is None:
            return
        if flow.heap and flow.heap[0][1] is item:
            heapq.heappop(flow.heap)
        flow.deficit -= self.cost(item)
        if self._head(p, item.flow) is None:
            flow.deficit = 0.0  # a flow that empties loses its credit, as in DRR

    def work_ahead(self, priority: int, flow: object, cost: float) -> float:
        """Estimated seconds of queued work that would start before a new job
        (``priority``, ``flow``, ``cost``)."""
        ahead = sum(self.work[:priority])
        if not self.fair:
            return ahead + self.work[priority]
        flows = self._flows[priority]
        own = flows[flow].work if flow in flows else 0.0
        limit = own + cost  # each other flow is served about as much as this one
        for key, other in flows.items():
            ahead += own if key == flow else min(other.work, limit)
        return ahead

    def waiting(self) -> list[QueueItem]:
        """Every queued job, in no particular order."""
        items: list[QueueItem] = []
        for p in range(3):
            if self.fair:
                for flow in self._flows[p].values():
                    items.extend(entry[1] for entry in flow.heap if entry[1].queued)
            else:
                items.extend(entry[1] for entry in self._fifo[p] if entry[1].queued)
        return items
