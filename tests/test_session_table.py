"""The session table as plain bookkeeping, with no network and a fake clock: unguessable ids, admission against
the KV byte budget and the session limit, memory back the moment a session closes, lookups, and idle expiry."""

from __future__ import annotations

import base64
import re
import string

import pytest
import torch

from layerline.errors import NotFoundError, PermissionDeniedError, ResourceExhaustedError
from layerline.kv_cache import KVCache
from layerline.stage_server.sessions import SessionTable, new_session_id

URLSAFE = set(string.ascii_letters + string.digits + "-_")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CacheFactory:
    """make_cache for the table: a tiny real KVCache, counting the calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> KVCache:
        self.calls += 1
        return KVCache(num_layers=1, rows=1, num_kv_heads=1, head_dim=2, max_len=4)


def open_session(
    table: SessionTable, kv_bytes: int, make_cache=None, rows: int = 1, max_length: int = 4, owner: str = ""
):
    return table.open(
        rows=rows,
        max_length=max_length,
        kv_bytes=kv_bytes,
        make_cache=make_cache or CacheFactory(),
        owner=owner,
        next_address="",
        next_session_id="",
        wire_dtype=torch.float32,
    )


def test_new_session_id_has_128_random_bits():
    ids = [new_session_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for sid in ids[:100]:
        assert len(sid) >= 22 and set(sid) <= URLSAFE
        assert len(base64.urlsafe_b64decode(sid + "=" * (-len(sid) % 4))) >= 16
    # every position varies: nothing fixed (a prefix, a counter) stands in for randomness
    assert all(len({sid[i] for sid in ids}) > 16 for i in range(21))


def test_table_ids_are_unique_and_findable():
    table = SessionTable(budget_bytes=10**6, ttl=60, max_sessions=1000)
    sessions = [open_session(table, 10) for _ in range(200)]
    assert len({s.id for s in sessions}) == 200
    assert all(table.get(s.id) is s for s in sessions)
    assert len(table) == 200 and {s.id for s in table.all()} == {s.id for s in sessions}


def test_admits_until_the_budget_is_used():
    table = SessionTable(budget_bytes=1000, ttl=60, max_sessions=100)
    a = open_session(table, 400)
    b = open_session(table, 300)
    assert (table.used_bytes, table.free_bytes, len(table)) == (700, 300, 2)
    with pytest.raises(ResourceExhaustedError) as e:
        open_session(table, 301, rows=3, max_length=77)
    numbers = set(re.findall(r"\d+", str(e.value)))
    assert {"301", "300", "1000"} <= numbers  # asked, free, total
    assert (table.used_bytes, len(table)) == (700, 2)
    c = open_session(table, 300)  # exactly what is left fits
    assert table.free_bytes == 0
    with pytest.raises(ResourceExhaustedError):
        open_session(table, 1)
    assert [s.id for s in table.all()] == [a.id, b.id, c.id]


def test_a_session_bigger_than_the_whole_budget():
    table = SessionTable(budget_bytes=1000, ttl=60, max_sessions=100)
    with pytest.raises(ResourceExhaustedError) as e:
        open_session(table, 5000)
    assert {"5000", "1000"} <= set(re.findall(r"\d+", str(e.value)))
    assert len(table) == 0 and table.used_bytes == 0


def test_close_frees_the_bytes_at_once():
    table = SessionTable(budget_bytes=1000, ttl=60, max_sessions=100)
    a = open_session(table, 600)
    with pytest.raises(ResourceExhaustedError):
        open_session(table, 600)
    closed = table.close(a.id, "client asked")
    assert closed is a
    assert closed.closed and closed.close_reason == "client asked"
    assert closed.cache is None  # the table holds the cache no longer
    assert (table.used_bytes, table.free_bytes, len(table)) == (0, 1000, 0)
    b = open_session(table, 600)
    assert table.used_bytes == 600 and b.id != a.id


def test_close_unknown_or_twice_returns_none():
    table = SessionTable(budget_bytes=1000, ttl=60, max_sessions=100)
    assert table.close("no-such-session") is None
    a = open_session(table, 100)
    open_session(table, 200)
    assert table.close(a.id) is a
    assert table.close(a.id) is None
    assert table.used_bytes == 200  # not freed twice
    with pytest.raises(NotFoundError):
        table.get(a.id)


def test_get_unknown_names_the_id():
    table = SessionTable(budget_bytes=1000, ttl=60, max_sessions=100)
    open_session(table, 10)
    with pytest.raises(NotFoundError) as e:
        table.get("abc123")
    assert "abc123" in str(e.value)


def test_get_unknown_shortens_a_long_id():
    table = SessionTable(budget_bytes=1000, ttl=60, max_sessions=100)
    long_id = "x" * 40 + "TAIL" * 2500
    with pytest.raises(NotFoundError) as e:
        table.get(long_id)
    text = str(e.value)
    assert "x" * 40 in text and "TAIL" not in text
    assert len(text) < 200


def test_get_touches_last_used():
    clock = FakeClock(50.0)
    table = SessionTable(budget_bytes=1000, ttl=60, max_sessions=100, clock=clock)
    a = open_session(table, 10)
    assert a.last_used == 50.0
    clock.now = 80.0
    assert table.get(a.id).last_used == 80.0


def test_expired_lists_exactly_the_idle_sessions():
    clock = FakeClock(0.0)
    table = SessionTable(budget_bytes=1000, ttl=10, max_sessions=100, clock=clock)
    a = open_session(table, 10)
    clock.now = 5.0
    b = open_session(table, 10)
    clock.now = 9.0
    assert table.expired() == []
    clock.now = 12.0
    assert table.expired() == [a.id]
    table.get(a.id)  # used again: idle no more
    assert table.expired() == []
    clock.now = 16.0
    assert table.expired() == [b.id]
    clock.now = 30.0
    assert set(table.expired()) == {a.id, b.id}
    assert len(table) == 2  # naming them closes nothing: that is the caller's move
    table.close(a.id)
    assert table.expired() == [b.id]


def test_find_uses_the_predicate():
    table = SessionTable(budget_bytes=1000, ttl=60, max_sessions=100)
    a = open_session(table, 10)
    b = table.open(1, 4, 10, CacheFactory(), next_address="n:1", next_session_id="down", wire_dtype=torch.float16)
    assert table.find(lambda s: s.next_session_id == "down") is b
    assert table.find(lambda s: s.next_address == "") is a
    assert table.find(lambda s: False) is None


def test_max_sessions():
    table = SessionTable(budget_bytes=10**6, ttl=60, max_sessions=3)
    sessions = [open_session(table, 1) for _ in range(3)]
    with pytest.raises(ResourceExhaustedError) as e:
        open_session(table, 1)
    assert "3" in str(e.value)
    assert len(table) == 3 and table.used_bytes == 3
    table.close(sessions[1].id)
    open_session(table, 1)
    assert len(table) == 3


def test_make_cache_is_called_once_per_admitted_session_only():
    make = CacheFactory()
    table = SessionTable(budget_bytes=100, ttl=60, max_sessions=2)
    a = open_session(table, 60, make)
    assert make.calls == 1 and isinstance(a.cache, KVCache)
    with pytest.raises(ResourceExhaustedError):
        open_session(table, 60, make)  # over the budget
    b = open_session(table, 40, make)
    with pytest.raises(ResourceExhaustedError):
        open_session(table, 0, make)  # over the session limit
    assert make.calls == 2
    assert a.cache is not b.cache


def test_a_failing_make_cache_admits_nothing():
    def make() -> KVCache:
        raise RuntimeError("out of memory")

    table = SessionTable(budget_bytes=100, ttl=60, max_sessions=2)
    with pytest.raises(RuntimeError):
        open_session(table, 60, make)
    assert (len(table), table.used_bytes) == (0, 0)


def test_a_session_answers_only_to_the_key_it_was_opened_with():
    table = SessionTable(budget_bytes=1000, ttl=60, max_sessions=100)
    mine = open_session(table, 10, owner="alice-key-0123456789")
    theirs = open_session(table, 10, owner="bob-key-0123456789")
    assert table.get(mine.id, "alice-key-0123456789") is mine
    for wrong in ("bob-key-0123456789", "", "alice-key-012345678", "alice-key-0123456789x"):
        with pytest.raises(PermissionDeniedError) as e:
            table.get(mine.id, wrong)
        assert "another client" in str(e.value)
        assert "key-0123" not in str(e.value)  # no key is ever shown
    assert table.get(theirs.id, "bob-key-0123456789") is theirs
    with pytest.raises(NotFoundError):  # an unknown id is NOT_FOUND whatever the key
        table.get("no-such-session", "alice-key-0123456789")


def test_sessions_per_client_are_limited_and_counted_back_on_close():
    table = SessionTable(budget_bytes=1000, ttl=60, max_sessions=100, max_per_owner=2)
    a = [open_session(table, 1, owner="a" * 16) for _ in range(2)]
    with pytest.raises(ResourceExhaustedError) as e:
        open_session(table, 1, owner="a" * 16)
    assert "--max-sessions-per-client" in str(e.value) and "2" in str(e.value)
    b = open_session(table, 1, owner="b" * 16)  # another client is not held back
    assert (table.owned_by("a" * 16), table.owned_by("b" * 16), len(table)) == (2, 1, 3)
    table.close(a[0].id)
    table.close(a[0].id)  # twice: counted once
    assert table.owned_by("a" * 16) == 1
    open_session(table, 1, owner="a" * 16)
    table.close(b.id)
    assert table.owned_by("b" * 16) == 0
