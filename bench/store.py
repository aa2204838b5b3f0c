"""The store that replicas share: assistants created, read and listed per second on SQLite and on PostgreSQL
with one and two replicas, and what sticky routing by conversation buys in time to first token.

    python bench/store.py [--models-path ~/.cache/localai-aio/models] [--model smollm2-135m-instruct]
        [--sections store,sticky] [--threads-clients 8] [--creates 2000] [--gets 4000] [--lists 1000]
        [--conversations 4] [--turns 4] [--history-tokens 1500]

Sections (both run by default):

- store: POST /v1/assistants ``{"model": MODEL, "name": "a<i>"}`` (creates), GET /v1/assistants/{id} of the
  ids created (gets) and GET /v1/assistants?limit=20 (lists), each a fixed number of times after a warm-up of
  a tenth of it, spread over N client threads (one httpx client each, keep-alive). Configurations: SQLite with
  one replica (the baseline: our default), PostgreSQL with one replica, and PostgreSQL with two replicas behind
  deploy/haproxy/haproxy.cfg; SQLite with two replicas is impossible (its file belongs to one process) and
  printed as n/a. Prints ops/s, its ratio to the SQLite baseline of the same run, and p50/p95 latency.
  Expected: PostgreSQL within a small factor of SQLite on one replica (a network round trip per statement
  instead of a file), and two replicas at least as fast as one PostgreSQL replica when the machine has cores to
  spare (on a 2-core machine the replicas, PostgreSQL, HAProxy and the client threads share the same cores).
- sticky: two replicas on one PostgreSQL behind HAProxy, with the config as shipped ("sticky") and with a
  copy without its ``stick`` rules ("non-sticky": every request balanced by leastconn). Several conversations
  through the Responses API (``previous_response_id``, streamed, ``max_output_tokens`` 32, temperature 0),
  the first user message about 1,500 tokens of numbered distinct sentences under a fresh random tag (nothing
  cached from an earlier run), turns interleaved across conversations in a shuffled order (the same in both
  modes, so a strict alternation of the balancer does not pin conversations by accident). TTFT = time to the
  first ``response.output_text.delta`` event. Prints each turn (which replica served it, read from the
  replicas' /metrics), mean and p50 TTFT of turns 2+ per mode and their ratios sticky / non-sticky, and the average
  ``usage.input_tokens_details.cached_tokens`` of turns 2+. Expected: sticky clearly faster (ratio well
  under 1), since the replica that served the previous turn holds the conversation in its prompt cache.

PostgreSQL comes from tests/pg_server.py (Debian's binaries, a throwaway cluster); HAProxy from PATH or
/usr/sbin. Every server is warmed with a few mixed chats (_clients.warm_up) and assistant creates before
anything is timed, and runs at its defaults plus ``--preload-models MODEL`` (and the shared ``--database-url``
and ``--blob-url`` for PostgreSQL). Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from _clients import DEFAULT_MODEL, client, local_model, median, percentile, warm_up
from _server import DEFAULT_MODELS, free_port, server

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"
SQLITE_TWO = "n/a: SQLite is one process's"
FOLLOW_UPS = ["Which of those is the oldest? Answer briefly.", "Say that again in other words.",
              "Now give me one more detail from the notes.", "What is the last thing in my notes?"]
NOUNS = ["lantern", "anchor", "compass", "harbor", "sail", "rope", "gull", "barrel", "orchard", "tractor", "barn",
         "meadow", "beehive", "fence", "well", "mill"]
ADJECTIVES = ["red", "old", "quiet", "salty", "green", "dusty", "warm", "wooden", "sweet", "wide", "golden", "busy"]


def postgres_module():  # noqa: ANN201
    """tests/pg_server.py, or None (with the reason printed) when PostgreSQL or psycopg is missing."""
    sys.path.insert(0, str(ROOT / "tests"))
    import pg_server

    if pg_server._bin("initdb") is None or pg_server._bin("pg_ctl") is None:
        print("PostgreSQL's server binaries are not installed (apt-get install postgresql): PostgreSQL skipped")
        return None
    try:
        import psycopg  # noqa: F401
    except ImportError:
        print("psycopg is not installed (pip install 'localai_aio[postgres]'): PostgreSQL skipped")
        return None
    return pg_server


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)


def non_sticky_config(directory: str) -> Path:
    """A copy of the shipped HAProxy config without its stick-table and stick rules."""
    lines = HAPROXY_CFG.read_text().splitlines(keepends=True)
    path = Path(directory) / "haproxy-non-sticky.cfg"
    path.write_text("".join(line for line in lines if not line.lstrip().startswith("stick")))
    return path


@contextlib.contextmanager
def haproxy(binary: str, cfg: Path, replicas: list[str]) -> Iterator[str]:
    """HAProxy (foreground) with ``cfg`` in front of ``replicas`` (two URLs); yields its URL once /readyz
    answers 200 through it and its stats page shows both replicas UP; stops it at the end."""
    lb, stats = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {**os.environ, "LB_BIND": lb, "LB_STATS_BIND": stats, "LB_LOG": f"127.0.0.1:{free_port()}",
           "REPLICA1_ADDR": replicas[0].removeprefix("http://"), "REPLICA2_ADDR": replicas[1].removeprefix("http://")}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([binary, "-db", "-f", str(cfg)], env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"HAProxy ({cfg.name}) did not get ready (exit {proc.poll()}): "
                                       f"{log.read().decode('utf-8', 'replace')[-2000:]}")
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"http://{lb}/readyz", timeout=2) as resp:
                        ready = resp.status == 200
                    with urllib.request.urlopen(f"http://{stats}/;csv", timeout=2) as resp:
                        csv = resp.read().decode()
                    up = [row for row in csv.splitlines() if re.match(r"localai_replicas,replica\d,", row)
                          and row.split(",")[17] == "UP"]
                    if ready and len(up) == 2:
                        break
                time.sleep(0.2)
            yield f"http://{lb}"
        finally:
            proc.terminate()
            proc.wait(10)


def warm(url: str, model: str, label: str) -> None:
    """A few mixed chats (the shared warm-up, shortened) and some assistant creates, gets and lists."""
    warm_up(url, model, sequential=4, concurrent_groups=1, group_size=2, label=label)
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(20):
            made = c.post("/v1/assistants", json={"model": model, "name": f"warm{i}"}).json()
            c.get(f"/v1/assistants/{made['id']}")
            c.get("/v1/assistants", params={"limit": 20})


# ----------------------------------------------------------------------------------------------------------
# store
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timed:
    count: int
    wall: float
    latencies: list[float]  # seconds, successful operations only
    failed: int
    errors: list[str]
    cpu: float  # this process's CPU seconds (the client threads) during the run

    @property
    def rate(self) -> float:
        return self.count / self.wall


def timed_ops(clients: list[httpx.Client], count: int, op: Callable[[httpx.Client, int], httpx.Response],
              created: list[str] | None = None) -> Timed:
    """``count`` operations ``op(client, i)`` shared by one thread per client; wall time from the moment all
    threads are ready to the last answer. 2xx answers succeed; the ids of created objects go to ``created``."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    barrier = threading.Barrier(len(clients) + 1)

    def work(c: httpx.Client) -> None:
        mine: list[float] = []
        barrier.wait()
        while (i := next(counter)) < count:
            t0 = time.perf_counter()
            try:
                resp = op(c, i)
                ok = 200 <= resp.status_code < 300
                problem = "" if ok else f"HTTP {resp.status_code}: {resp.text[:200]}"
                new_id = resp.json()["id"] if ok and created is not None else None
            except Exception as exc:  # noqa: BLE001 - a benchmark counts failures, it does not stop at the first
                ok, problem, new_id = False, f"{type(exc).__name__}: {exc}", None
            took = time.perf_counter() - t0
            if ok:
                mine.append(took)
            with lock:
                if not ok:
                    errors.append(problem)
                if new_id is not None:
                    created.append(new_id)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=work, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    barrier.wait()
    start, cpu0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.join()
    return Timed(count, time.perf_counter() - start, latencies, len(errors), errors,
                 time.process_time() - cpu0)


def store_run(url: str, args: argparse.Namespace) -> dict[str, Timed]:
    """Creates, then gets of the created ids, then lists against ``url``; each after a warm-up of a tenth."""
    clients = [httpx.Client(base_url=url, timeout=60) for _ in range(args.threads_clients)]
    ids: list[str] = []
    ops: dict[str, Callable[[httpx.Client, int], httpx.Response]] = {
        "creates": lambda c, i: c.post("/v1/assistants", json={"model": args.model, "name": f"a{i}"}),
        "gets": lambda c, i: c.get(f"/v1/assistants/{ids[i * 7919 % len(ids)]}"),
        "lists": lambda c, i: c.get("/v1/assistants", params={"limit": 20}),
    }
    results = {}
    try:
        for name, op in ops.items():
            count = getattr(args, name)
            keep = ids if name == "creates" else None
            timed_ops(clients, max(1, count // 10), op, keep)
            results[name] = timed_ops(clients, count, op, keep)
    finally:
        for c in clients:
            c.close()
    return results


def store(args: argparse.Namespace, pg, lb_binary: str | None) -> None:  # noqa: ANN001
    print(f"\n== store: assistants over HTTP, {args.threads_clients} client threads (httpx, keep-alive); "
          f"{args.creates} creates, {args.gets} gets, {args.lists} lists (limit=20), each after a warm-up of "
          f"a tenth", flush=True)
    preload = ["--preload-models", args.model]
    rows: dict[str, dict[str, Timed] | str] = {}
    base: dict[str, Timed]

    with server(args.models_path, *preload) as (url, _):
        warm(url, args.model, "sqlite, 1 replica")
        rows["sqlite, 1 replica"] = base = store_run(url, args)
    rows["sqlite, 2 replicas"] = SQLITE_TWO

    if pg is None:
        rows["postgres, 1 replica"] = rows["postgres, 2 replicas (HAProxy)"] = "n/a: no PostgreSQL"
    else:
        with pg.postgres_server(free_port()) as db, tempfile.TemporaryDirectory() as blobs:
            shared = ["--blob-url", f"file://{blobs}"]
            with server(args.models_path, *preload, "--database-url", db.create_database("bench_one"),
                        *shared) as (url, _):
                warm(url, args.model, "postgres, 1 replica")
                rows["postgres, 1 replica"] = store_run(url, args)
            if lb_binary is None:
                rows["postgres, 2 replicas (HAProxy)"] = "n/a: HAProxy is not installed"
            else:
                flags = [*preload, "--database-url", db.create_database("bench_two"), *shared]
                with server(args.models_path, *flags) as (r1, _), server(args.models_path, *flags) as (r2, _), \
                        haproxy(lb_binary, HAPROXY_CFG, [r1, r2]) as lb:
                    for name, url in (("replica 1", r1), ("replica 2", r2)):
                        warm(url, args.model, f"postgres, 2 replicas: {name}")
                    rows["postgres, 2 replicas (HAProxy)"] = store_run(lb, args)

    print(f"{'configuration':32} {'op':8} {'ops/s':>9} {'vs sqlite-1':>11} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'failed':>6}  client CPU")
    for config, result in rows.items():
        if isinstance(result, str):
            print(f"{config:32} {result}")
            continue
        for op, t in result.items():
            lat = [x * 1000 for x in t.latencies] or [float("nan")]
            print(f"{config:32} {op:8} {t.rate:9.1f} {t.rate / base[op].rate:10.2f}x {percentile(lat, 50):8.2f} "
                  f"{percentile(lat, 95):8.2f} {t.failed:6d}  {100 * t.cpu / t.wall:.0f}% of a core")
            for line in t.errors[:2]:
                print(f"    failure: {line}")
    print(f"notes: {os.cpu_count()} CPU core(s) on this machine, shared by the replicas, PostgreSQL, HAProxy and "
          "the client threads (one Python process: the client's CPU share is shown); behind HAProxy each request "
          "opens a new connection to a replica (option http-server-close), so the two-replica row includes that "
          "and the proxy hop.")


# ----------------------------------------------------------------------------------------------------------
# sticky
# ----------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Turn:
    conversation: int
    turn: int  # 1-based
    ttft: float | None = None  # seconds
    response_id: str | None = None
    input_tokens: int | None = None
    cached_tokens: int | None = None
    replica: int | None = None  # 1 or 2, from the replicas' request counters
    error: str | None = None


def first_message(tag: str, approx_tokens: int) -> str:
    """About ``approx_tokens`` of numbered distinct sentences (about 17 tokens each with SmolLM2's tokenizer)
    under ``tag``, then a question."""
    rng = random.Random(tag)
    out = []
    for k in range(1, max(1, approx_tokens // 17) + 1):
        a, b = rng.sample(NOUNS, 2)
        out.append(f"{k}. The {rng.choice(ADJECTIVES)} {a} is {rng.randint(2, 99)} steps from the "
                   f"{rng.choice(ADJECTIVES)} {b}.")
    return (f"Notes {tag}, remember them:\n" + " ".join(out)
            + "\nIn two sentences, what is near the first thing in my notes?")


def responses_served(replicas: list[str]) -> list[float]:
    """How many POST /v1/responses each replica has answered (its Prometheus counter)."""
    counts = []
    for url in replicas:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        pattern = r'^localai_http_requests_total\{[^}]*route="/v1/responses"[^}]*\} (\S+)$'
        counts.append(sum(float(m) for m in re.findall(pattern, text, re.M)))
    return counts


def which_replica(replicas: list[str], before: list[float]) -> tuple[int | None, list[float]]:
    """The replica whose counter moved since ``before`` (waiting up to 2 s for a stream's count to land)."""
    deadline = time.monotonic() + 2
    while True:
        now = responses_served(replicas)
        moved = [i + 1 for i, (a, b) in enumerate(zip(before, now, strict=True)) if b > a]
        if len(moved) == 1 or time.monotonic() > deadline:
            return (moved[0] if len(moved) == 1 else None), now
        time.sleep(0.05)


def one_turn(cl, model: str, text: str, previous: str | None, turn: Turn) -> None:  # noqa: ANN001
    extra = {"previous_response_id": previous} if previous else {}
    sent = time.perf_counter()
    try:
        stream = cl.responses.create(model=model, input=text, max_output_tokens=32, temperature=0, stream=True,
                                     **extra)
        for event in stream:
            if event.type == "response.created":
                turn.response_id = event.response.id
            elif event.type == "response.output_text.delta" and event.delta and turn.ttft is None:
                turn.ttft = time.perf_counter() - sent
            elif event.type in ("response.completed", "response.incomplete"):
                turn.response_id = event.response.id
                usage = event.response.usage
                if usage is not None:
                    turn.input_tokens = usage.input_tokens
                    details = getattr(usage, "input_tokens_details", None)
                    turn.cached_tokens = getattr(details, "cached_tokens", None)
            elif event.type in ("response.failed", "error"):
                turn.error = str(event)[:300]
        if turn.ttft is None and turn.error is None:
            turn.error = "no text was streamed"
    except Exception as exc:  # noqa: BLE001 - a benchmark reports failures, it does not stop at the first
        turn.error = f"{type(exc).__name__}: {str(exc)[:300]}"


def conversations(lb: str, replicas: list[str], args: argparse.Namespace, order: list[list[int]],
                  mode: str) -> list[Turn]:
    """``args.conversations`` conversations of ``args.turns`` turns through ``lb``, turn by turn, the
    conversations of each turn in the given order; prints one line per turn."""
    nonce = f"{random.randrange(16**8):08x}"
    cl = client(lb)
    previous: dict[int, str | None] = dict.fromkeys(range(args.conversations))
    turns: list[Turn] = []
    counts = responses_served(replicas)
    for t in range(args.turns):
        for c in order[t]:
            if t > 0 and previous[c] is None:
                continue  # the conversation failed earlier
            turn = Turn(c + 1, t + 1)
            text = first_message(f"{nonce}-c{c + 1}", args.history_tokens) if t == 0 else FOLLOW_UPS[
                (t - 1) % len(FOLLOW_UPS)]
            one_turn(cl, args.model, text, previous[c], turn)
            turn.replica, counts = which_replica(replicas, counts)
            previous[c] = turn.response_id if turn.error is None else None
            turns.append(turn)
            if turn.error:
                print(f"  {mode:10} conv {turn.conversation} turn {turn.turn}: error {turn.error}", flush=True)
                continue
            same = ""
            if t > 0:
                before = next((x.replica for x in turns if x.conversation == turn.conversation and x.turn == t), None)
                same = " (same replica)" if before == turn.replica else " (other replica)"
            print(f"  {mode:10} conv {turn.conversation} turn {turn.turn}: replica {turn.replica}{same}, "
                  f"TTFT {turn.ttft * 1000:7.1f} ms, input_tokens {turn.input_tokens}, "
                  f"cached_tokens {turn.cached_tokens}", flush=True)
    cl.close()
    return turns


def sticky(args: argparse.Namespace, pg, lb_binary: str | None) -> None:  # noqa: ANN001
    print(f"\n== sticky: {args.conversations} conversations x {args.turns} turns through HAProxy, first message "
          f"~{args.history_tokens} tokens, Responses API streamed (previous_response_id, max_output_tokens 32, "
          f"temperature 0)", flush=True)
    if pg is None or lb_binary is None:
        print("  n/a: needs PostgreSQL and HAProxy")
        return
    rng = random.Random(7)
    order = [rng.sample(range(args.conversations), args.conversations) for _ in range(args.turns)]
    print("  order of conversations per turn: " + "; ".join(" ".join(str(c + 1) for c in o) for o in order))
    flags = ["--preload-models", args.model]
    results: dict[str, list[Turn]] = {}
    with pg.postgres_server(free_port()) as db, tempfile.TemporaryDirectory() as tmp:
        flags += ["--database-url", db.create_database("bench_sticky"), "--blob-url", f"file://{tmp}/blobs"]
        with server(args.models_path, *flags) as (r1, _), server(args.models_path, *flags) as (r2, _), \
                haproxy(lb_binary, HAPROXY_CFG, [r1, r2]) as lb_sticky, \
                haproxy(lb_binary, non_sticky_config(tmp), [r1, r2]) as lb_plain:
            for name, url in (("replica 1", r1), ("replica 2", r2)):
                warm(url, args.model, f"sticky cluster: {name}")
            for lb in (lb_sticky, lb_plain):  # a few short responses through each balancer
                cl = client(lb)
                for i in range(4):
                    first = cl.responses.create(model=args.model, input=f"Say hello {i}.", max_output_tokens=8)
                    cl.responses.create(model=args.model, input="Again.", max_output_tokens=8,
                                        previous_response_id=first.id)
                cl.close()
            for mode, lb in (("sticky", lb_sticky), ("non-sticky", lb_plain)):
                results[mode] = conversations(lb, [r1, r2], args, order, mode)

    p50: dict[str, float] = {}
    mean: dict[str, float] = {}
    print("summary (turns 2+):")
    for mode, turns in results.items():
        later = [t for t in turns if t.turn > 1 and t.error is None]
        firsts = [t.ttft * 1000 for t in turns if t.turn == 1 and t.error is None]
        ttfts = [t.ttft * 1000 for t in later]
        cached = [t.cached_tokens for t in later if t.cached_tokens is not None]
        inputs = [t.input_tokens for t in later if t.input_tokens is not None]
        prev = {(t.conversation, t.turn): t.replica for t in turns}
        same = sum(1 for t in later if prev.get((t.conversation, t.turn - 1)) == t.replica)
        failed = sum(1 for t in turns if t.error)
        p50[mode] = median(ttfts)
        mean[mode] = sum(ttfts) / len(ttfts) if ttfts else float("nan")
        p95 = percentile(ttfts, 95) if ttfts else float("nan")
        print(f"  {mode:10}: p50 TTFT {p50[mode]:7.1f} ms, mean {mean[mode]:7.1f} ms (p95 {p95:.1f}, "
              f"n={len(ttfts)}); turn 1 p50 "
              f"{median(firsts):.1f} ms; same replica as the previous turn {same}/{len(later)}; cached_tokens avg "
              f"{sum(cached) / len(cached) if cached else float('nan'):.0f} of input_tokens avg "
              f"{sum(inputs) / len(inputs) if inputs else float('nan'):.0f}; {failed} failed")
    if len(p50) == 2:
        # the mean is the figure that counts: without stickiness about half the later turns miss the cache
        # and cost a whole prompt, and the median falls on the edge between hits and misses
        print(f"  ratio mean TTFT turns 2+ sticky / non-sticky: {mean['sticky'] / mean['non-sticky']:.2f}x, "
              f"p50 {p50['sticky'] / p50['non-sticky']:.2f}x (expected well under 1x)")
    print(f"notes: {os.cpu_count()} CPU core(s): both replicas (each at its default threads) and the client "
          "share them; requests are sent one at a time, so only one replica computes at any moment.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-path", default=DEFAULT_MODELS)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--sections", default="store,sticky", help="comma-separated: store, sticky")
    parser.add_argument("--threads-clients", type=int, default=8, help="client threads of the store section")
    parser.add_argument("--creates", type=int, default=2000)
    parser.add_argument("--gets", type=int, default=4000)
    parser.add_argument("--lists", type=int, default=1000)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--history-tokens", type=int, default=1500, help="size of a first user message, about")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if sections - {"store", "sticky"}:
        parser.error(f"unknown sections: {', '.join(sorted(sections - {'store', 'sticky'}))}")

    if local_model(args.models_path, args.model) is None:
        print(f"{args.model} is not installed in {args.models_path}: python -m localai_aio models install {args.model}")
        return 2
    pg = postgres_module()
    lb_binary = haproxy_binary()
    if lb_binary is None:
        print("HAProxy is not installed (apt-get install haproxy): the two-replica runs are skipped")
    print(f"model {args.model}, {os.cpu_count()} CPU core(s), PostgreSQL {'yes' if pg else 'no'}, "
          f"HAProxy {lb_binary or 'no'}", flush=True)
    if "store" in sections:
        store(args, pg, lb_binary)
    if "sticky" in sections:
        sticky(args, pg, lb_binary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
