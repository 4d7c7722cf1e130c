"""Schemathesis hooks for `cargo xtask test`: the api's rules that JSON Schema cannot state.

The OpenAPI document describes them in its `info.description`; the api answers 400
`VALIDATION_ERROR` to a request that breaks one. These hooks drop generated requests that
break one, so that "schema-valid request rejected" means what it says. Every other rule is
in the document itself.

One rule depends on earlier requests: an `Idempotency-Key` sent again with another body is
422 `IDEMPOTENCY_KEY_REUSED`. The generator repeats header values across cases, so
`map_headers` gives every valid key a value of its own (invalid ones are kept: the api must
reject them). The coverage phase still sends one value with several bodies (it does not go
through `map_headers`), so `schemathesis.toml` lets `POST .../metrics` and `POST .../exports`
answer a schema-valid request with 422, and the check `only_idempotency_key_reuse_is_422`
narrows that to the one 422 the api answers by state: any other 422 (`INVALID_BODY`) on a
schema-valid request fails the run. Replays are tested in apps/api (`idempotency::tests`).
"""

import itertools
import json
import re
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


_EPOCH = datetime(2000, 1, 1, tzinfo=timezone.utc)


def _keys_unique(rows, field):
    """No two rows with one `field` and one `recorded_at` to the microsecond (as PostgreSQL
    stores it). Neighbouring microseconds count as one too: the api truncates toward the
    year 2000, Python toward the past, so they may round apart by one."""
    seen = set()
    for row in rows:
        if not isinstance(row, dict):
            continue
        name, at = row.get(field), row.get("recorded_at")
        if not isinstance(name, str) or at is None:
            continue
        micros = (_timestamp(at) - _EPOCH) // timedelta(microseconds=1)
        if any((name, micros + d) in seen for d in (-1, 0, 1)):
            return False
        seen.add((name, micros))
    return True


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
            if not (_years_ok(keywords, "recorded_at") and _years_ok(content, "recorded_at")):
                return False
            return _keys_unique(keywords, "keyword") and _keys_unique(content, "content_id")
    except (ValueError, TypeError, AttributeError, OverflowError):
        # Not a value of the documented type: a negative case, the api must reject it.
        return True
    return True


# The api's Idempotency-Key: 1 to 255 visible ASCII characters.
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_fresh_keys = itertools.count()


@schemathesis.hook
def map_headers(ctx, headers):
    if not headers:
        return headers
    for name, value in list(headers.items()):
        if name.lower() == "idempotency-key" and isinstance(value, str) and _IDEMPOTENCY_KEY.fullmatch(value):
            headers[name] = f"fuzz-{next(_fresh_keys)}"
    return headers


@schemathesis.check
def only_idempotency_key_reuse_is_422(ctx, response, case):
    """A schema-valid request answered 422 must be a reused `Idempotency-Key`, nothing else.

    Runs on every operation. Stricter than the built-in `positive_data_acceptance` on purpose:
    a case without generation metadata counts as schema-valid here (the built-in check skips
    it), so an `INVALID_BODY` 422 cannot hide there. It does not check that the key really was
    reused with another body (`idempotency::tests` does).
    """
    if response.status_code != 422:
        return None
    meta = getattr(case, "meta", None)
    generation = getattr(meta, "generation", None)
    mode = getattr(generation, "mode", None)
    if mode is not None and not mode.is_positive:
        return None
    try:
        code = json.loads(response.content).get("code")
    except (ValueError, AttributeError):
        code = None
    if code != "IDEMPOTENCY_KEY_REUSED":
        raise AssertionError(
            f"a schema-valid request was rejected with 422 {code}: only IDEMPOTENCY_KEY_REUSED may be"
        )
    return None
