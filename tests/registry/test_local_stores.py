"""What the conformance kit cannot check generically: compaction of the event log, and that
an acknowledged registration survives kill -9 of the process that made it (SQLite)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from poise.errors import Compacted
from poise.registry import Instance, MemoryStore, SQLiteStore
from poise.testing import FakeClock


async def test_a_watcher_behind_the_kept_history_is_told_to_relist() -> None:
    store = MemoryStore(clock=FakeClock(), history=3)
    for n in range(5):
        await store.register(Instance("users", f"i{n}", "127.0.0.1", 8000 + n))
    assert await store.revision() == 5
    events = store.watch(2)  # events 3, 4, 5 are kept
    assert [(await anext(events)).revision for _ in range(3)] == [3, 4, 5]
    await events.aclose()
    with pytest.raises(Compacted) as e:
        await anext(store.watch(1))  # event 2 is gone
    assert (e.value.after, e.value.oldest) == (1, 2)


async def test_sqlite_gives_a_fresh_ttl_after_restart(tmp_path: Path) -> None:
    clock = FakeClock(1000.0)
    store = SQLiteStore(tmp_path / "r.db", clock=clock)
    await store.register(Instance("users", "a", "127.0.0.1", 8001, ttl=10.0))
    await store.close()
    clock.advance(60)  # poise was down for a minute: longer than the TTL
    store = SQLiteStore(tmp_path / "r.db", clock=clock)
    assert await store.expire() == 0  # the instance gets its TTL from the restart on
    assert len((await store.instances("users"))[0]) == 1
    clock.advance(10.5)
    assert await store.expire() == 1
    await store.close()


@pytest.mark.timeout(60)
def test_acknowledged_registrations_survive_kill_9(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    script = textwrap.dedent(
        f"""
        import asyncio, os, sys
        from poise.registry import Instance, SQLiteStore

        async def main():
            store = SQLiteStore({str(db)!r})
            for n in range(50):
                await store.register(Instance("users", f"i{{n}}", "127.0.0.1", 9000 + n))
            await store.deregister("users", "i0")
            print("acked", flush=True)
            sys.stdin.read()  # wait here until killed

        asyncio.run(main())
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[2] / "src"), env.get("PYTHONPATH")])
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"acked\n"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    async def check() -> None:
        store = SQLiteStore(db)
        listed, rev = await store.instances("users")
        assert [i.id for i in listed] == sorted(f"i{n}" for n in range(1, 50))
        assert rev == 51
        await store.close()

    asyncio.run(check())
