"""Schemathesis hooks for `cargo xtask test`: the api's rules that JSON Schema cannot state.

The OpenAPI document describes them in its `info.description`; the api answers 400
`VALIDATION_ERROR` to a request that breaks one. These hooks drop generated requests that
break one, so that "schema-valid request rejected" means what it says. Every other rule is
in the document itself.
"""

from datetime import date, datetime, timedelta, timezone

import schemathesis

# The api's analytics::MAX_RANGE_DAYS and ingest::MAX_ROWS (a test in apps/api compares them).
MAX_RANGE_DAYS = 366
MAX_ROWS = 5000


def _instant(raw, end_of_day):
    """An RFC 3339 timestamp or a YYYY-MM-DD date as the api reads it, in UTC."""
    if not isinstance(raw, str):
        raise ValueError(raw)
    if len(raw) == 10:
        day = date.fromisoformat(raw)
        start = datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        return start + timedelta(days=1) if end_of_day else start
    return _timestamp(raw)


def _timestamp(raw):
    if not isinstance(raw, str):
        raise ValueError(raw)
    at = datetime.fromisoformat(raw.replace("z", "Z"))
    if at.tzinfo is None:
        raise ValueError(raw)
    return at.astimezone(timezone.utc)


def _in_years(at):
    return 1 <= at.year <= 9999


def _range_ok(raw_from, raw_to, analytics):
    to = _instant(raw_to, True) if raw_to is not None else None
    start = _instant(raw_from, False) if raw_from is not None else None
    for at in (start, to):
        if at is not None and not _in_years(at):
            return False
    if analytics:
        defaulted_to = to is None
        if defaulted_to:
            to = datetime.now(timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
        if start is None:
            start = to - timedelta(days=30)
            if not _in_years(start):
                return False
        limit = timedelta(days=MAX_RANGE_DAYS)
        # The api takes its own "now" for a missing `to`: midnight UTC may pass in between, so
        # a range within a day of the limit could go either way there. Drop it.
        if defaulted_to and abs((to - start) - limit) <= timedelta(days=1):
            return False
        if to - start > limit:
            return False
    return start is None or to is None or start <= to


def _years_ok(rows, field):
    return all(row.get(field) is None or _in_years(_timestamp(row[field])) for row in rows)


@schemathesis.hook
def filter_case(ctx, case):
    try:
        path, method = case.operation.path, case.method.upper()
        body = case.body if isinstance(case.body, dict) else {}
        query = case.query or {}
        if path == "/v1/domains/{id}/analytics" and method == "GET":
            return _range_ok(query.get("from"), query.get("to"), analytics=True)
        if path == "/v1/domains/{id}/exports" and method == "POST":
            return _range_ok(body.get("from"), body.get("to"), analytics=False)
        if path == "/v1/domains/{id}/content" and method == "POST":
            scheduled = body.get("status") == "scheduled"
            if scheduled != (body.get("publish_at") is not None):
                return False
            return _years_ok([body], "publish_at") and _years_ok([body], "published_at")
        if path == "/v1/domains/{id}/metrics" and method == "POST":
            keywords, content = body.get("keywords") or [], body.get("content") or []
            if len(keywords) + len(content) > MAX_ROWS:
                return False
            return _years_ok(keywords, "recorded_at") and _years_ok(content, "recorded_at")
    except (ValueError, TypeError, AttributeError, OverflowError):
        # Not a value of the documented type: a negative case, the api must reject it.
        return True
    return True
