"""The process's CPU budget (cpu_budget): its size follows the cores the process may use, pieces of work
never hold more cores than there are, interactive work goes before bulk work, and engines of one priority
share the cores by the time they used."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import write_model_yaml
from localai_aio import cpu_budget
from localai_aio.config import ServerSettings
from localai_aio.cpu_budget import CpuBudget, Priority, cgroup_quota
from localai_aio.server import keys

SRC = str(Path(__file__).resolve().parent.parent / "src")


def _in_affinity(cpus: set[int], code: str) -> str:
    """``code``'s output in a fresh interpreter restricted to ``cpus`` before anything is imported."""
    script = f"import os; os.sched_setaffinity(0, {cpus!r})\n{code}"
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop("LOCALAI_THREADS", None)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env,
                          timeout=120).stdout.strip()


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two CPUs")
@pytest.mark.parametrize("cpus", [{0}, {0, 1}])
def test_budget_follows_the_cpus_the_process_may_use(cpus: set[int]) -> None:
    code = ("from localai_aio.cpu_budget import usable_cores\n"
            "from localai_aio.config import load_settings\n"
            "from localai_aio.registry import ModelRegistry\n"
            "settings = load_settings({})\n"
            "print(usable_cores(), settings.threads, ModelRegistry({}, settings, backends={}).budget.cores)")
    quota = cgroup_quota()
    expected = len(cpus) if quota is None else min(len(cpus), max(1, int(-(-quota // 1))))
    assert _in_affinity(cpus, code) == f"{expected} {expected} {expected}"


def test_cgroup_v2_quota_is_the_smallest_on_the_path(tmp_path: Path) -> None:
    (tmp_path / "kubepods" / "pod1").mkdir(parents=True)
    (tmp_path / "kubepods" / "cpu.max").write_text("300000 100000\n")
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/kubepods/pod1\n")
    assert cgroup_quota(tmp_path, proc) == 1.5
    (tmp_path / "kubepods" / "pod1" / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path, proc) == 3.0


def test_cgroup_v1_quota_and_no_quota(tmp_path: Path) -> None:
    folder = tmp_path / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("200000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n")
    assert cgroup_quota(tmp_path, proc) == 2.0
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_quota(tmp_path, proc) is None


class Piece:
    """A piece of work on a thread, started on request; records when it began and holds until released."""

    def __init__(self, account: cpu_budget.Account, threads: int, log: list[str], name: str) -> None:
        self.release = threading.Event()
        self.began = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(account, threads, log, name), daemon=True)
        self.thread.start()

    def _run(self, account: cpu_budget.Account, threads: int, log: list[str], name: str) -> None:
        with account.piece(threads):
            log.append(name)
            self.began.set()
            self.release.wait(10)

    def finish(self) -> None:
        self.release.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def _waiting(budget: CpuBudget, n: int) -> None:
    """Until ``n`` pieces are waiting for cores (the budget's own count)."""
    deadline = time.monotonic() + 10
    while len(budget._waiting) != n:  # noqa: SLF001 - the test watches the queue it drives
        assert time.monotonic() < deadline, f"{len(budget._waiting)} waiting, expected {n}"  # noqa: SLF001
        time.sleep(0.005)


def test_interactive_work_goes_before_queued_bulk_work() -> None:
    budget = CpuBudget(2, bulk_share=0.0, linger=0.05)
    chat = budget.account("chat", Priority.INTERACTIVE)
    whisper = budget.account("whisper", Priority.BULK)
    embed = budget.account("embed", Priority.BULK)
    log: list[str] = []
    window = Piece(whisper, 2, log, "whisper window")  # bulk holds every core
    assert window.began.wait(5)
    queued = Piece(embed, 2, log, "embeddings batch")  # more bulk work queues behind it
    _waiting(budget, 1)
    step = Piece(chat, 2, log, "chat step")  # a conversation does not wait for bulk work
    assert step.began.wait(5)
    assert log == ["whisper window", "chat step"]
    window.finish()
    time.sleep(0.1)
    assert log == ["whisper window", "chat step"], "bulk started while a conversation was running"
    step.finish()
    queued.finish()  # starts once the conversation has been quiet for the linger
    assert log == ["whisper window", "chat step", "embeddings batch"]
    assert chat.delayed == 0 and embed.delayed == 1


def test_bulk_waits_for_interactive_work_that_is_waiting() -> None:
    budget = CpuBudget(2, bulk_share=0.0, linger=0.0)
    chat, speech = budget.account("chat", Priority.INTERACTIVE), budget.account("speech", Priority.INTERACTIVE)
    whisper = budget.account("whisper", Priority.BULK)
    log: list[str] = []
    first = Piece(chat, 2, log, "chat")
    assert first.began.wait(5)
    bulk = Piece(whisper, 1, log, "whisper")
    _waiting(budget, 1)
    sentence = Piece(speech, 2, log, "speech")
    _waiting(budget, 2)
    first.finish()
    assert sentence.began.wait(5)
    time.sleep(0.05)
    assert log == ["chat", "speech"], "bulk work went before a waiting conversation"
    sentence.finish()
    bulk.finish()
    assert log == ["chat", "speech", "whisper"]


def test_pieces_never_hold_more_cores_than_there_are() -> None:
    budget = CpuBudget(2)
    a, b = budget.account("a", Priority.BULK), budget.account("b", Priority.BULK)
    log: list[str] = []
    one = Piece(a, 1, log, "a1")
    two = Piece(b, 1, log, "b1")  # two one-thread pieces share two cores
    assert one.began.wait(5) and two.began.wait(5)
    wide = Piece(a, 2, log, "a2")
    _waiting(budget, 1)
    one.finish()
    time.sleep(0.05)
    assert "a2" not in log, "a two-thread piece started with one core free"
    two.finish()
    assert wide.began.wait(5)
    wide.finish()
    huge = Piece(b, 64, log, "b64")  # more threads than cores: it takes them all, and runs
    assert huge.began.wait(5)
    huge.finish()


def test_bulk_work_gets_its_share_while_conversations_keep_the_cores_busy() -> None:
    budget = CpuBudget(2, bulk_share=0.2, linger=0.05)
    chat, whisper = budget.account("chat", Priority.INTERACTIVE), budget.account("whisper", Priority.BULK)
    stop = threading.Event()
    inside_bulk = threading.Event()
    overlapped: list[str] = []

    def stream() -> None:  # back-to-back decode steps, never quiet for the linger
        while not stop.is_set():
            with chat.piece(2):
                if inside_bulk.is_set():
                    overlapped.append("a chat step ran during a bulk turn")
                time.sleep(0.005)

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        time.sleep(0.2)
        done = []
        for _ in range(3):  # three windows of a transcription
            with whisper.piece(2):
                inside_bulk.set()
                time.sleep(0.02)
                inside_bulk.clear()
            done.append(time.monotonic())
    finally:
        stop.set()
        streamer.join(10)
    assert len(done) == 3 and not overlapped
    assert chat.delayed >= 1 and whisper.delayed >= 1
    assert budget._turns == 0  # noqa: SLF001


def test_an_engine_that_can_change_its_threads_takes_the_free_cores() -> None:
    budget = CpuBudget(2, bulk_share=0.0)
    chat, speech = budget.account("chat", Priority.INTERACTIVE), budget.account("speech", Priority.INTERACTIVE)
    whisper = budget.account("whisper", Priority.BULK)
    log: list[str] = []
    decoder_step = Piece(whisper, 1, log, "whisper decoder step")  # one thread, while nothing else runs
    assert decoder_step.began.wait(5)
    with chat.piece(2, least=1) as threads:  # llama.cpp: runs this step on the free core
        assert threads == 1
    with speech.piece(2) as threads:  # ONNX Runtime cannot change its pool: it never waits for bulk work
        assert threads == 2
    decoder_step.finish()
    time.sleep(2 * cpu_budget.GRACE)  # (the speech engine, behind on core time, is no longer owed the next turn)
    with chat.piece(2, least=1) as threads:
        assert threads == 2
    assert chat.delayed == speech.delayed == 0


def test_a_step_that_fits_beside_a_bulk_turn_runs_beside_it() -> None:
    budget = CpuBudget(2, bulk_share=1.0, linger=10.0)
    chat, speech = budget.account("chat", Priority.INTERACTIVE), budget.account("speech", Priority.INTERACTIVE)
    with chat.piece(2, least=1):  # a conversation is under way: bulk work runs only as a turn
        pass
    log: list[str] = []
    decoder_step = Piece(budget.account("whisper", Priority.BULK), 1, log, "whisper turn")
    assert decoder_step.began.wait(5)
    with chat.piece(2, least=1) as threads:  # the free core
        assert threads == 1
    sentence = Piece(speech, 2, log, "sentence")  # two threads do not fit beside the turn: it waits
    _waiting(budget, 1)
    decoder_step.finish()
    assert sentence.began.wait(5)
    sentence.finish()
    assert log == ["whisper turn", "sentence"]


def test_engines_of_one_priority_share_by_time_used() -> None:
    budget = CpuBudget(1, linger=0.0)
    long_account = budget.account("speech", Priority.INTERACTIVE)
    short_account = budget.account("chat", Priority.INTERACTIVE)
    long_account.vtime = short_account.vtime = 0.0
    long_account.vtime += 0.3  # one 300 ms sentence just ran
    long_account.last_active = time.monotonic()
    log: list[str] = []
    holder = Piece(short_account, 1, log, "hold")
    assert holder.began.wait(5)
    sentence = Piece(long_account, 1, log, "sentence")
    _waiting(budget, 1)
    step = Piece(short_account, 1, log, "step")
    _waiting(budget, 2)
    holder.finish()
    # the chat has used less core time, so its step goes first although the sentence asked earlier
    assert step.began.wait(5)
    step.finish()
    sentence.finish()
    assert log == ["hold", "step", "sentence"]


def test_an_engine_between_two_steps_keeps_its_turn() -> None:
    """Pieces cannot be preempted: a chat whose 8 ms steps leave a gap of a millisecond between them still
    gets its half of the cores beside 100 ms sentences of speech."""
    budget = CpuBudget(2)
    chat, speech = budget.account("chat", Priority.INTERACTIVE), budget.account("speech", Priority.INTERACTIVE)
    chat.vtime = 100.0  # the chat ran alone for a long time before: not held against it
    stop = time.monotonic() + 2.0

    def steps(account: cpu_budget.Account, seconds: float) -> None:
        while time.monotonic() < stop:
            with account.piece(2, least=1):
                time.sleep(seconds)
            time.sleep(0.0005)

    threads = [threading.Thread(target=steps, args=(chat, 0.008)), threading.Thread(target=steps, args=(speech, 0.1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0.35 < chat.busy / (chat.busy + speech.busy) < 0.65, (chat.busy, speech.busy)


def test_fair_policy_has_no_priorities_and_off_has_no_budget() -> None:
    fair = CpuBudget(2, policy="fair", linger=0.0)
    log: list[str] = []
    bulk = Piece(fair.account("whisper", Priority.BULK), 2, log, "whisper")
    assert bulk.began.wait(5)
    chat = Piece(fair.account("chat", Priority.INTERACTIVE), 2, log, "chat")
    _waiting(fair, 1)  # under "fair" a conversation waits for the cores like anyone
    bulk.finish()
    chat.finish()
    assert log == ["whisper", "chat"]
    off = CpuBudget(2, policy="off")
    pieces = [Piece(off.account(f"m{i}", Priority.BULK), 2, log, f"m{i}") for i in range(3)]
    assert all(p.began.wait(5) for p in pieces)  # all at once
    for p in pieces:
        p.finish()
    assert off.account("m0", Priority.BULK).pieces == 1
    with pytest.raises(ValueError, match="unknown CPU policy"):
        CpuBudget(2, policy="sometimes")


def test_pieces_are_charged_to_the_thread_bound_account() -> None:
    budget = CpuBudget(2)
    account = budget.account("embed", Priority.BULK)
    with cpu_budget.piece(2):  # no account bound: runs at once, charged to nobody
        pass
    assert account.pieces == 0

    def engine_thread() -> None:
        cpu_budget.bind(account)
        with cpu_budget.piece(2):
            time.sleep(0.02)

    t = threading.Thread(target=engine_thread)
    t.start()
    t.join()
    report = budget.report()["embed"]
    assert report["cpu_pieces"] == 1.0
    assert 0.04 <= report["cpu_busy_seconds"] < 1.0  # 20 ms on 2 cores
    assert report["cpu_share"] == 1.0
    assert report["cpu_wait_seconds"] >= 0.0


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiny_models import export_tiny_whisper

    return export_tiny_whisper(tmp_path_factory.mktemp("whisper"))


needs_engines = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("optimum", "transformers", "llama_cpp", "soundfile")),
    reason="needs llama-cpp-python and the export tool chain")


@needs_engines
async def test_real_engines_chat_goes_first_and_the_metrics_move(make_client, tmp_path: Path, tiny_gguf: Path,
                                                                  tiny_whisper: Path) -> None:
    """A transcription beside chat streams: the chat's pieces never wait, the transcription's wait for it,
    and /metrics shows each model's core time, waiting time and share."""
    from test_transcription import form, tone, wav_bytes

    models = tmp_path / "models"
    shutil.copytree(tiny_whisper, models / "tiny-whisper")
    (models / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    write_model_yaml(models, "chat", backend="llama-cpp", context_size=256, parameters={"model": "tiny.gguf"})
    write_model_yaml(models, "whisper", backend="onnx-whisper", parameters={"model": "tiny-whisper"})
    # no share kept for bulk work: with one, the chats would (rightly) pause for the transcription's turns
    client = await make_client(ServerSettings(models_path=str(models), config_dir=str(tmp_path / "d"), threads=2,
                                              cpu_bulk_share=0.0))
    registry = client.app[keys.REGISTRY]
    await registry.load("chat")
    await registry.load("whisper")
    budget = registry.budget
    assert {a.name: a.priority for a in budget.accounts()} == {"chat": Priority.INTERACTIVE,
                                                                "whisper": Priority.BULK}
    audio = wav_bytes(tone(45.0))

    whisper = budget.account("whisper", Priority.BULK)

    async def chats() -> list[int]:
        while whisper.pieces == 0:  # the transcription is under way
            await asyncio.sleep(0.001)
        statuses = []
        for _ in range(6):
            resp = await client.post("/v1/chat/completions", json={
                "model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 150, "stream": True,
                "temperature": 1.0})
            await resp.read()
            statuses.append(resp.status)
        return statuses

    async def transcription() -> dict:
        resp = await client.post("/v1/audio/transcriptions", data=form(audio, model="whisper"))
        assert resp.status == 200, await resp.text()
        return await resp.json()

    statuses, result = await asyncio.gather(chats(), transcription())
    assert statuses == [200] * 6
    assert set(result) >= {"text"}
    chat = budget.account("chat", Priority.INTERACTIVE)
    assert chat.pieces > 0 and whisper.pieces > 0
    assert chat.delayed == 0, "a conversation waited for bulk work"
    assert whisper.delayed >= 1, "the transcription never gave way to the chats"

    text = await (await client.get("/metrics")).text()
    values = {}
    for line in text.splitlines():
        for name in ("localai_model_cpu_busy_seconds_total", "localai_model_cpu_wait_seconds_total",
                     "localai_model_cpu_share"):
            for model in ("chat", "whisper"):
                if line.startswith(f'{name}{{model="{model}"}} '):
                    values[name, model] = float(line.split()[-1])
    assert len(values) == 6, text
    assert values["localai_model_cpu_busy_seconds_total", "chat"] > 0
    assert values["localai_model_cpu_busy_seconds_total", "whisper"] > 0
    assert values["localai_model_cpu_wait_seconds_total", "whisper"] > 0
    share = values["localai_model_cpu_share", "chat"] + values["localai_model_cpu_share", "whisper"]
    assert share == pytest.approx(1.0)


@pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime")),
                    reason="needs onnx and onnxruntime")
@pytest.mark.parametrize(("policy", "yaml", "spins"), [("interactive-first", None, "0"), ("off", None, "1"),
                                                       ("interactive-first", True, "1")])
def test_onnx_pools_spin_only_when_an_engine_has_the_cores_to_itself(tmp_path: Path, policy: str,
                                                                      yaml: bool | None, spins: str) -> None:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from localai_aio.backends.onnx_common import make_session
    from localai_aio.config import ModelConfig

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # one every onnxruntime release here reads
    onnx.save(model, str(path))
    cfg = ModelConfig(name="relu", backend="piper", model_path=path, extra={} if yaml is None else {"spinning": yaml})
    session = make_session(path, cfg, ServerSettings(threads=2, cpu_policy=policy), spinning=True)
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == spins
    budget = CpuBudget(2)
    account = budget.account("relu", Priority.INTERACTIVE)
    cpu_budget.bind(account)
    try:
        assert session.run(None, {"x": np.array([-1.0, 2.0], np.float32)})[0].tolist() == [0.0, 2.0]
    finally:
        cpu_budget.bind(None)
    assert account.pieces == 1  # every run is a piece of work on the budget
