"""Two real server processes on one PostgreSQL database and one blob directory, behind a real HAProxy
with deploy/haproxy/haproxy.cfg: any replica answers for anything stored, nothing acknowledged is lost
when a replica is killed, draining finishes streams while the balancer moves on, background responses
are leased, and a database outage is a 503 with Retry-After that heals by itself."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path

import openai
import pytest

from conftest import ServerProcess, free_port, write_model_yaml
from pg_server import PostgresServer, postgres_server

HAPROXY_CFG = Path(__file__).parent.parent / "deploy" / "haproxy" / "haproxy.cfg"
LEASE = 1.5  # seconds: short, so that a dead replica's background response fails quickly here

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None,
                                reason="HAProxy is not installed (apt-get install haproxy)")


def call(url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None,
         timeout: float = 30) -> tuple[int, dict, Message]:
    """(status, JSON body, headers) of one request; HTTP errors are answers too. Header names are matched
    without case: HAProxy forwards them in lower case."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return resp.status, _json(resp.read()), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, _json(err.read()), err.headers


def _json(data: bytes) -> dict:
    """HAProxy's own answers (a 502 while a replica dies) are HTML."""
    try:
        return json.loads(data or b"null")
    except ValueError:
        return {"not_json": data.decode("utf-8", "replace")}


@dataclass
class Cluster:
    db: PostgresServer
    replicas: list[ServerProcess]
    lb: str
    haproxy: subprocess.Popen
    started: list[ServerProcess] = field(default_factory=list)

    def requests_on(self, replica: ServerProcess, route: str) -> float:
        """How many requests ``replica`` has answered on ``route`` (its Prometheus counter)."""
        with urllib.request.urlopen(replica.url + "/metrics", timeout=10) as resp:
            text = resp.read().decode()
        pattern = rf'^localai_http_requests_total\{{[^}}]*route="{re.escape(route)}"[^}}]*\}} (\S+)$'
        return sum(float(m) for m in re.findall(pattern, text, re.M))


@pytest.fixture(scope="module")
def db() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this module's own: one test stops it for a while."""
    with postgres_server(free_port()) as server:
        yield server


@pytest.fixture
def cluster(db: PostgresServer, tmp_path: Path, tiny_gguf: Path) -> Iterator[Cluster]:
    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "tiny", context_size=2048, parameters={"model": "tiny.gguf"})
    write_model_yaml(models, "long", context_size=16384, parameters={"model": "tiny.gguf"})
    url = db.create_database(f"c_{tmp_path.name[-20:].lower().replace('-', '_')}_{os.getpid()}")
    blobs = tmp_path / "blobs"
    replicas = []
    for i in (1, 2):
        replica = ServerProcess(["--models-path", str(models), "--config-dir", str(tmp_path / f"data{i}"),
                                 "--threads", "1", "--database-url", url, "--blob-url", f"file://{blobs}",
                                 "--background-lease", str(LEASE), "--shutdown-grace", "60"], cwd=tmp_path)
        replicas.append(replica.start(tmp_path / f"replica{i}.log"))
    lb_port = free_port()
    env = {**os.environ, "LB_BIND": f"127.0.0.1:{lb_port}", "REPLICA1_ADDR": f"127.0.0.1:{replicas[0].port}",
           "REPLICA2_ADDR": f"127.0.0.1:{replicas[1].port}", "LB_STATS_BIND": f"127.0.0.1:{free_port()}",
           "LB_LOG": f"127.0.0.1:{free_port()}"}
    with (tmp_path / "haproxy.log").open("wb") as log:
        haproxy = subprocess.Popen(["haproxy", "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    made = Cluster(db, replicas, f"http://127.0.0.1:{lb_port}", haproxy)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if call(made.lb + "/readyz", timeout=2)[0] == 200:
                    break
            assert haproxy.poll() is None and time.monotonic() < deadline, (tmp_path / "haproxy.log").read_text()
            time.sleep(0.1)
        yield made
    finally:
        haproxy.terminate()
        haproxy.wait(10)
        for replica in replicas:
            replica.stop()


def upload(url: str, data: bytes) -> dict:
    boundary = "----localai-test"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nassistants\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"n.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url + "/v1/files", data=body, method="POST",
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read())


def test_what_one_replica_stores_the_other_reads_lists_and_deletes(cluster: Cluster) -> None:
    one, two = cluster.replicas
    made_file = upload(one.url, b"shared bytes")
    status, assistant, _ = call(one.url + "/v1/assistants", "POST",
                                {"model": "tiny", "name": "shared", "file_ids": [made_file["id"]]})
    assert status == 200
    status, response, headers = call(one.url + "/v1/responses", "POST",
                                     {"model": "tiny", "input": "Hello", "max_output_tokens": 4})
    assert status == 200 and headers["X-Response-Id"] == response["id"]

    assert call(two.url + f"/v1/assistants/{assistant['id']}")[1] == assistant
    assert assistant["id"] in {a["id"] for a in call(two.url + "/v1/assistants")[1]["data"]}
    assert call(two.url + f"/v1/files/{made_file['id']}")[1] == made_file
    with urllib.request.urlopen(two.url + f"/v1/files/{made_file['id']}/content", timeout=10) as resp:
        assert resp.read() == b"shared bytes"
    assert call(two.url + f"/v1/responses/{response['id']}")[1]["output"] == response["output"]
    items = call(two.url + f"/v1/responses/{response['id']}/input_items")[1]
    assert items["data"][0]["content"][0]["text"] == "Hello"
    # a turn that continues the conversation on the other replica
    status, follow, _ = call(two.url + "/v1/responses", "POST", {"model": "tiny", "input": "More",
                                                                  "previous_response_id": response["id"],
                                                                  "max_output_tokens": 4})
    assert status == 200 and follow["previous_response_id"] == response["id"]

    for path in (f"/v1/assistants/{assistant['id']}", f"/v1/files/{made_file['id']}",
                 f"/v1/responses/{response['id']}"):
        assert call(two.url + path, "DELETE")[1]["deleted"] is True
        assert call(one.url + path)[0] == 404


def test_concurrent_creates_through_the_balancer(cluster: Cluster) -> None:
    def create(i: int) -> str:
        status, body, _ = call(cluster.lb + "/v1/assistants", "POST", {"model": "tiny", "name": f"c{i}"})
        assert status == 200, body
        return body["id"]

    with ThreadPoolExecutor(8) as pool:
        made = list(pool.map(create, range(120)))
    for replica in cluster.replicas:  # both served some, and both see all
        assert cluster.requests_on(replica, "/v1/assistants") > 0
        listed = call(replica.url + "/v1/assistants?limit=100&order=asc")[1]
        ids = [a["id"] for a in listed["data"]]
        ids += [a["id"] for a in call(replica.url + f"/v1/assistants?limit=100&order=asc&after={ids[-1]}")[1]["data"]]
        assert sorted(ids) == sorted(made) and len(set(ids)) == 120


def test_kill_9_during_a_burst_loses_nothing_acknowledged(cluster: Cluster) -> None:
    victim, survivor = cluster.replicas
    acknowledged: list[str] = []
    after_kill: list[int] = []
    killed = threading.Event()
    stop = threading.Event()

    def writer(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            late = killed.is_set() and time.monotonic() > killed_at + 0.5  # past what was in flight
            try:
                status, body, _ = call(cluster.lb + "/v1/assistants", "POST", {"model": "tiny", "name": f"w{n}-{i}"},
                                       timeout=10)
            except OSError:
                status = 0
            if status == 200:
                acknowledged.append(body["id"])
            if late:
                after_kill.append(status)

    killed_at = 0.0
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    assert cluster.requests_on(victim, "/v1/assistants") > 0  # it took part in the burst
    victim.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    killed.set()
    time.sleep(3)
    stop.set()
    for thread in threads:
        thread.join(30)
    assert len(after_kill) > 10 and set(after_kill) == {200}, after_kill  # the balancer moved on
    stored: set[str] = set()
    after = ""
    while True:
        page = call(survivor.url + f"/v1/assistants?limit=100&order=asc{after}")[1]
        stored |= {a["id"] for a in page["data"]}
        if not page["has_more"]:
            break
        after = f"&after={page['last_id']}"
    assert set(acknowledged) <= stored and len(acknowledged) > 20


def test_sigterm_while_streaming_finishes_the_stream_and_moves_new_requests(cluster: Cluster) -> None:
    client = openai.OpenAI(base_url=cluster.lb + "/v1", api_key="x", max_retries=0)
    chunks: list = []

    def stream() -> None:
        for chunk in client.chat.completions.create(model="long", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=1500, temperature=0, stream=True):
            chunks.append(chunk)

    worker = threading.Thread(target=stream)
    worker.start()
    while len(chunks) < 5:
        time.sleep(0.01)
    busy, other = sorted(cluster.replicas, key=_busy_slots, reverse=True)
    assert (_busy_slots(busy), _busy_slots(other)) == (1, 0)
    busy.proc.send_signal(signal.SIGTERM)
    time.sleep(2.5)  # the balancer's checks see /readyz fail (or the connection refused)
    before = cluster.requests_on(other, "/v1/chat/completions")
    for _ in range(6):
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=2)
        assert answer.choices[0].finish_reason == "length"
    assert cluster.requests_on(other, "/v1/chat/completions") == before + 6
    worker.join(120)
    client.close()
    assert busy.proc.wait(60) == 0
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 100  # the stream ran to its end


def _busy_slots(replica: ServerProcess) -> float:
    with urllib.request.urlopen(replica.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return sum(float(v) for v in re.findall(r'^localai_model_slots_busy\{[^}]*\} (\S+)$', text, re.M))


def test_a_dead_replicas_background_response_fails_and_cancels_cross_replicas(cluster: Cluster) -> None:
    one, two = cluster.replicas
    long_run = {"model": "long", "input": "Go on and on", "background": True, "max_output_tokens": 16000,
                "temperature": 1}
    # a cancel asked on the other replica reaches the one running it through the database
    status, started, _ = call(one.url + "/v1/responses", "POST", long_run)
    assert status == 200 and started["status"] in ("queued", "in_progress")
    status, cancelled, _ = call(two.url + f"/v1/responses/{started['id']}/cancel", "POST")
    assert (status, cancelled["status"]) == (200, "cancelled")
    # the replica running one dies: once its lease runs out, the survivor marks it failed
    status, started, _ = call(one.url + "/v1/responses", "POST", long_run)
    time.sleep(0.5)
    assert call(two.url + f"/v1/responses/{started['id']}")[1]["status"] in ("queued", "in_progress")
    one.proc.send_signal(signal.SIGKILL)
    one.proc.wait()
    deadline = time.monotonic() + LEASE * 6
    while (polled := call(two.url + f"/v1/responses/{started['id']}")[1])["status"] in ("queued", "in_progress"):
        assert time.monotonic() < deadline, polled
        time.sleep(0.2)
    assert polled["status"] == "failed" and "stopped before it finished" in polled["error"]["message"]


def test_a_database_outage_is_503_for_storage_only_and_heals(cluster: Cluster) -> None:
    status, made, _ = call(cluster.lb + "/v1/assistants", "POST", {"model": "tiny"})
    assert status == 200
    cluster.db.stop("immediate")
    try:
        for method, path, body in (("POST", "/v1/assistants", {"model": "tiny"}),
                                   ("GET", f"/v1/assistants/{made['id']}", None), ("GET", "/v1/files", None)):
            status, answer, headers = call(cluster.lb + path, method, body)
            assert status == 503, (path, answer)
            assert answer["error"]["code"] == "storage_unavailable", (path, answer, headers)
            assert int(headers["Retry-After"]) > 0
        status, chat, _ = call(cluster.lb + "/v1/chat/completions", "POST",
                               {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})
        assert status == 200 and chat["choices"][0]["finish_reason"] == "length"  # inference goes on
        assert all(call(r.url + "/readyz")[0] == 200 for r in cluster.replicas)  # nobody is taken out
    finally:
        cluster.db.start()
    deadline = time.monotonic() + 30
    for replica in cluster.replicas:  # both recover without a restart
        while (status := call(replica.url + f"/v1/assistants/{made['id']}")[0]) != 200:
            assert status == 503 and time.monotonic() < deadline
            time.sleep(0.5)


def test_conversations_stick_to_the_replica_that_holds_them(cluster: Cluster) -> None:
    """Each later turn (previous_response_id) is routed to the replica that created the previous one."""
    counts = lambda: [cluster.requests_on(r, "/v1/responses") for r in cluster.replicas]  # noqa: E731
    for conversation in range(4):
        previous, served = None, set()
        for turn in range(3):
            before = counts()
            body = {"model": "tiny", "input": f"conversation {conversation} turn {turn}", "max_output_tokens": 2}
            status, answer, _ = call(cluster.lb + "/v1/responses", "POST",
                                     body | ({"previous_response_id": previous} if previous else {}))
            assert status == 200, answer
            previous = answer["id"]
            served |= {i for i, (a, b) in enumerate(zip(before, counts(), strict=True)) if b > a}
        assert len(served) == 1, (conversation, served)
    # the first turns were spread by leastconn, not pinned to one replica
    assert all(c > 0 for c in counts())
