"""Worker kinds behind one small protocol: ``Worker`` (start, submit, cancel, stop, close)."""

from ._base import Worker, WorkerEvents
from ._interpreter import InterpreterWorker, interpreters_available
from ._process import ProcessWorker

__all__ = ("InterpreterWorker", "ProcessWorker", "Worker", "WorkerEvents", "interpreters_available")
