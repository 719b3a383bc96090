"""A transformer registered in the test suite's own module (not imported by any task)."""

from __future__ import annotations

from typing import Any

from offload.tasks import json_transformer


@json_transformer("test:shout")
def shout(doc: Any) -> Any:
    return {key.upper(): value for key, value in doc.items()}
