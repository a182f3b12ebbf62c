"""Waiting for something to happen, and retrying what may fail: the one way the project does either.

- :func:`poll`: call ``check`` until it returns a value other than None/False, or give up after
  ``timeout_s`` with the exception ``on_timeout`` makes (which says what was awaited).
- :func:`retry`: run ``action`` up to ``attempts`` times with exponential backoff (tenacity), logging
  each failure; the last error is raised.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

T = TypeVar("T")
log = logging.getLogger(__name__)


def poll(check: Callable[[], T | bool | None], *, timeout_s: float, interval_s: float = 0.5,
         on_timeout: Callable[[], Exception] | None = None, what: str = "the condition") -> T:
    """``check()``'s first value that is not None or False; ``on_timeout()`` (or TimeoutError) after ``timeout_s``.

    ``check`` runs at least once, even with a zero timeout, and then every ``interval_s``.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value is not None and value is not False:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise on_timeout() if on_timeout else TimeoutError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(interval_s)


def retry(action: Callable[[], T], *, attempts: int, what: str, max_wait_s: float = 10.0, min_wait_s: float = 2.0,
          when: Callable[[BaseException], bool] | None = None) -> T:
    """``action()``, tried up to ``attempts`` times, waiting 2, 4, 8 ... (at most ``max_wait_s``) seconds between;
    with ``when``, only the errors it accepts are retried (any other is raised at once)."""
    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=1, min=min_wait_s, max=max_wait_s),
        retry=tenacity.retry_if_exception(when) if when else tenacity.retry_if_exception_type(),
        reraise=True,
        before_sleep=lambda state: log.warning("%s failed (attempt %d of %d): %s", what, state.attempt_number,
                                               attempts, state.outcome.exception()),
    )
    return retrying(action)
