"""The public API: every name in ``offload.__all__`` exists, public classes say they are
``offload``'s, and nothing else is public by accident (as httpx's exported-members test)."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys

import offload

EXPECTED = {
    "__version__",
    "builtins",
    "tasks",
    "DecryptFailed",
    "InvalidInput",
    "InvalidTask",
    "MainGuardMissing",
    "ManagerClosed",
    "NoCurrentManager",
    "NotSerializable",
    "NotStarted",
    "OffloadError",
    "OutputTooLarge",
    "PayloadTooLarge",
    "PoisonTask",
    "Priority",
    "Progress",
    "QueueFull",
    "Retry",
    "Stats",
    "Task",
    "TaskFailed",
    "TaskRecord",
    "TaskTimeout",
    "UnknownTask",
    "UnsupportedKind",
    "WorkerCrashed",
    "WorkerInfo",
    "WorkerManager",
    "WorkerStartFailed",
    "WouldTimeOut",
    "current_manager",
    "report_progress",
    "task",
    "use_manager",
}


def test_all_is_what_we_mean_to_publish() -> None:
    assert set(offload.__all__) == EXPECTED
    for name in offload.__all__:
        assert getattr(offload, name) is not None, name


def test_public_classes_belong_to_offload() -> None:
    for name in offload.__all__:
        value = getattr(offload, name)
        if isinstance(value, type):
            assert value.__module__ == "offload", (name, value.__module__)


def test_every_error_is_an_offload_error_with_a_code() -> None:
    errors = [
        getattr(offload, n)
        for n in offload.__all__
        if isinstance(getattr(offload, n), type) and issubclass(getattr(offload, n), BaseException)
    ]
    codes = set()
    for error in errors:
        assert issubclass(error, offload.OffloadError), error
        assert error.code.isupper() and error.code not in codes, error
        codes.add(error.code)
    assert issubclass(offload.NoCurrentManager, LookupError)


def test_version_is_the_installed_distributions() -> None:
    assert offload.__version__ == importlib.metadata.version("offload")


def test_import_offload_stays_light() -> None:
    code = (
        "import sys, offload; print(sorted(m for m in ('asyncio', 'trio', 'anyio', "
        "'offload._manager', 'offload.tasks') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
