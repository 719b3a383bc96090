"""What runs inside every worker: process workers, interpreter workers, Dask's isolated children.

This package imports only the standard library, never the rest of ``offload``: a worker starts
without paying for the parent's imports, and the same code runs in a process, in an isolated
subinterpreter and in a child of a Dask worker. The parent imports only ``protocol``, ``codec``,
``arena`` and ``ring`` from here.

How a worker talks to its parent (see ``protocol`` for the constants)::

    parent                                             worker
      │── task pipe: INIT, RUN / RUN_STREAM, QUIT ─────►│ main thread: runs tasks in arrival order
      │── control pipe: STOP, TAKE_BACK, PING, CREDIT, ►│ watcher thread: decides at once, under a
      │   CLOSE, WAKE (16-byte words, heard mid-task)   │ lock shared with the main thread
      │◄── answer pipe: READY, RING (doorbell), PONG, ──│
      │    REVOKED, RUNNING, big or overflow answers    │
      │◄── answer ring (shared memory): answers, ───────│ answers survive the worker's death
      │    progress, stream items                       │
      │◄─► arenas (shared memory): big buffers ────────►│

Modules: ``protocol`` (tags, headers, frames), ``codec`` (pickling, out-of-band buffers),
``arena`` (growable shared memory), ``ring`` (the answer ring and its control block),
``channel`` (blocking frame IO), ``watcher`` (the control thread), ``mainmod`` (the caller's
``__main__``), ``serve`` (the loop), ``boot`` (entry points and how a process ended).
"""
