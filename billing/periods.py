"""Billing periods in a tenant's timezone: the day or calendar month that holds a moment
(budgets) and the ``YYYY-MM`` months of invoices. One place, so budgets, invoices and usage
agree on where a period starts and ends."""

from __future__ import annotations

import datetime as dt
import re
from zoneinfo import ZoneInfo

from config.errors import ValidationFailed

_MONTH_RE = re.compile(r"^(\d{4})-(0[1-9]|1[0-2])$")


def period_bounds(period: str, moment: dt.datetime, time_zone: str) -> tuple[dt.datetime, dt.datetime]:
    """The ``[start, end)`` of the ``day`` or calendar ``month`` (``period``) holding ``moment`` in
    ``time_zone`` (an IANA name; empty is UTC), as aware datetimes; the end is the next period's
    start (wall-clock midnight, so a day across a DST change is 23 or 25 hours)."""
    tz = ZoneInfo(time_zone or "UTC")
    local = moment.astimezone(tz)
    if period == "day":
        start_date = local.date()
        end_date = start_date + dt.timedelta(days=1)
    else:
        start_date = local.date().replace(day=1)
        end_date = (start_date + dt.timedelta(days=32)).replace(day=1)
    start = dt.datetime(start_date.year, start_date.month, start_date.day, tzinfo=tz)
    end = dt.datetime(end_date.year, end_date.month, end_date.day, tzinfo=tz)
    return start, end


def month_parse(month: str) -> tuple[int, int]:
    """``(year, month)`` of a ``YYYY-MM`` month; ``ValidationFailed`` (``invalid_period``) else."""
    match = _MONTH_RE.match(month or "")
    if not match:
        raise ValidationFailed(
            "period must be a month written YYYY-MM, e.g. 2026-11.", code="invalid_period", details={"field": "period"}
        )
    return int(match.group(1)), int(match.group(2))


def month_bounds(month: str, time_zone: str) -> tuple[dt.datetime, dt.datetime]:
    """``(start, end)`` of ``month`` (``YYYY-MM``) in ``time_zone``: aware datetimes at local
    midnight of the month's 1st and of the next month's 1st. Raises ``ValidationFailed``."""
    year, number = month_parse(month)
    return period_bounds("month", dt.datetime(year, number, 15, 12, tzinfo=ZoneInfo(time_zone or "UTC")), time_zone)


def month_of(moment: dt.datetime, time_zone: str) -> str:
    """The ``YYYY-MM`` month that holds ``moment`` in ``time_zone``."""
    return f"{moment.astimezone(ZoneInfo(time_zone or 'UTC')):%Y-%m}"


def month_before(moment: dt.datetime, time_zone: str) -> str:
    """The ``YYYY-MM`` month before the one that holds ``moment`` in ``time_zone``."""
    start, _ = period_bounds("month", moment, time_zone)
    return month_of(start - dt.timedelta(days=1), time_zone)
