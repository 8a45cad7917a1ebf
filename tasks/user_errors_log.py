"""Log a user-fixable error once, as its message, not as three tracebacks.

Prefect logs a failing task's exception with its traceback, then the flow's,
then the caller prints it again. For a `UserError` the traceback says nothing
the message does not, so this filter drops it from Prefect's run loggers (the
message stays, in the terminal and in the UI's run log); unexpected errors keep
their tracebacks.
"""

from __future__ import annotations

import logging

from storage.errors import UserError

RUN_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")


class UserErrorWithoutTraceback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_user_error_tracebacks() -> None:
    """Install the filter on Prefect's run loggers (idempotent)."""
    for name in RUN_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, UserErrorWithoutTraceback) for f in logger.filters):
            logger.addFilter(UserErrorWithoutTraceback())
