"""The checks on an async job's arguments, shared by the Python API and a ticket's ``reserve_for``."""

from __future__ import annotations

import math

from .models import is_storable_text

#: Column width of a job id.
JOB_ID_MAX = 255


def check_job(job_id: object) -> None:
    if not isinstance(job_id, str) or not job_id or len(job_id) > JOB_ID_MAX or not is_storable_text(job_id):
        raise ValueError(f"job_id must be 1 to {JOB_ID_MAX} characters of text, got {job_id!r:.80}")


def check_ttl(ttl: object) -> None:
    if not isinstance(ttl, int | float) or isinstance(ttl, bool) or not 0 < ttl <= 366 * 86400 or math.isnan(ttl):
        raise ValueError(f"ttl must be a number of seconds from 0 to a year, got {ttl!r:.40}")
