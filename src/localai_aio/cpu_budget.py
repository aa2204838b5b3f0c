"""One CPU budget for every engine in the process, and conversations first.

llama.cpp decodes with a team of threads that meet at a barrier after every layer; ONNX Runtime runs each op
on a pool of threads. Each is sized to every core, so two engines busy at once put twice as many threads on
the cores as there are cores, and a thread of llama.cpp's team that loses its core holds the whole team at
the next barrier: a chat decoded at a seventh of its speed beside a transcription, and a third of the CPU
went to threads waiting for each other. Here every engine draws its threads from one budget instead:

- Engines run their compute in pieces (one ``llama_decode``, one ONNX Runtime run: a Whisper window, a
  decoder step, a sentence of speech, a micro-batch of embeddings). A piece takes as many cores from the
  budget as it runs threads, and waits while they are not free, so the cores hold no more busy threads
  than they have.
- llama.cpp can change its thread count between two decodes, so its pieces ask for every core but start
  with as few as one (``least``): a chat step beside a one-thread Whisper decoder step runs on the other
  core instead of waiting for it or crowding it.
- Interactive pieces (a conversation waiting for its next token, speech a client is playing) go before bulk
  ones (a long transcription, a large embeddings batch, an image), and never wait for them: a bulk piece
  already running when a conversation arrives keeps its cores until it ends (pieces are short), and the
  conversation takes what is free, or shares a core for that one piece. Bulk pieces start freely once no
  interactive piece has run for ``linger`` seconds. While conversations keep the cores busy, bulk work still
  gets ``bulk_share`` of the core time (over the last ``SHARE_WINDOW`` seconds): it then takes a turn, a
  piece that conversations wait for, so a server busy with chats still finishes its transcriptions.
- Between engines of one priority the cores go to whoever has used the least core time so far (each
  engine's virtual time, as Linux's CFS does for threads), so a 12 ms decode step and a 300 ms sentence of
  speech each get half the machine, not one turn each.

``policy`` ``"fair"`` drops the priorities (every piece waits for free cores) and ``"off"`` drops the budget
(every engine runs its threads whenever it likes, as before). Engine code does not see the budget: the
engine's thread binds its ``Account`` (``bind``), and ``piece`` looks it up; with none bound (an engine
used outside the server) a piece runs at once.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path


class Priority(enum.StrEnum):
    INTERACTIVE = "interactive"
    BULK = "bulk"


POLICIES = ("interactive-first", "fair", "off")
#: Seconds without a piece after which an engine counts as idle (see ``CpuBudget._level``).
IDLE = 0.5
#: Seconds a piece waits for an engine of its priority that has used less core time and has just finished a
#: piece: it is between two steps (sampling a token, which may first wait for the GIL) and about to ask again.
#: Pieces cannot be preempted, so without this the one that happens to wait when the cores free up would
#: always win.
GRACE = 0.1
#: Seconds over which ``Account.share`` is measured.
SHARE_WINDOW = 10.0


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers,
    Kubernetes limits), not ``os.cpu_count()``, which counts the machine's."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def cgroup_quota(root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), the
    smallest along its path; None when there is none."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    quotas: list[float] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            for folder in _up_from(root, path):
                with contextlib.suppress(OSError, ValueError):
                    limit, period = (folder / "cpu.max").read_text().split()
                    if limit != "max":
                        quotas.append(int(limit) / int(period))
        elif "cpu" in controllers.split(","):
            base = root / controllers  # /sys/fs/cgroup/cpu or /sys/fs/cgroup/cpu,cpuacct
            for folder in _up_from(base if base.is_dir() else root / "cpu", path):
                with contextlib.suppress(OSError, ValueError):
                    limit = int((folder / "cpu.cfs_quota_us").read_text())
                    period = int((folder / "cpu.cfs_period_us").read_text())
                    if limit > 0 and period > 0:
                        quotas.append(limit / period)
    return min(quotas) if quotas else None


def _up_from(base: Path, path: str) -> Iterator[Path]:
    """``base/path`` and each of its parents up to ``base`` (the ones that exist here)."""
    parts = [p for p in path.strip("/").split("/") if p]
    for n in range(len(parts), -1, -1):
        folder = base.joinpath(*parts[:n])
        if folder.is_dir():
            yield folder


@dataclass(eq=False)
class Account:
    """One engine's use of the budget (all instances of one model share it)."""

    budget: CpuBudget
    name: str
    priority: Priority
    busy: float = 0.0  # core-seconds of pieces run
    waited: float = 0.0  # seconds pieces waited for cores
    pieces: int = 0
    delayed: int = 0  # pieces that had to wait
    vtime: float = 0.0  # core-seconds, for the fair choice between engines of one priority
    running: int = 0  # its pieces running now
    last_active: float = -math.inf  # when its last piece ended
    recent: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)

    @contextlib.contextmanager
    def piece(self, threads: int, least: int | None = None) -> Iterator[int]:
        with self.budget.piece(self, threads, least) as granted:
            yield granted

    def share(self, now: float | None = None) -> float:
        """This engine's part of the core time every engine used over the last ``SHARE_WINDOW`` seconds."""
        return self.budget.share(self, now)


@dataclass(eq=False)
class _Waiter:
    account: Account
    cores: int  # wanted
    least: int  # enough to start with (an engine that can change its thread count per piece asks for fewer)
    seq: int


class CpuBudget:
    """The process's cores, lent to engines a piece of work at a time (see the module docstring)."""

    def __init__(self, cores: int, policy: str = "interactive-first", *, bulk_share: float = 0.2,
                 linger: float = 0.05, clock: Callable[[], float] = time.monotonic) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown CPU policy {policy!r} (one of {', '.join(POLICIES)})")
        self.cores = max(1, cores)
        self.policy = policy
        self.bulk_share = bulk_share
        self.linger = linger
        self._turns = 0  # bulk pieces running as a turn (interactive pieces wait for them)
        self._recent: collections.deque[tuple[float, Priority, float]] = collections.deque()
        self._recent_sum = {Priority.INTERACTIVE: 0.0, Priority.BULK: 0.0}
        self._clock = clock
        self._cond = threading.Condition()
        self._held = {Priority.INTERACTIVE: 0, Priority.BULK: 0}
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()
        self._interactive_until = -math.inf  # bulk waits until then (the last interactive piece + linger)
        self._accounts: dict[str, Account] = {}
        #: Per priority, the least virtual time of its busy engines, never going back (CFS's min_vruntime).
        self._floor = {Priority.INTERACTIVE: 0.0, Priority.BULK: 0.0}

    def account(self, name: str, priority: Priority) -> Account:
        with self._cond:
            account = self._accounts.get(name)
            if account is None or account.priority is not priority:
                account = self._accounts[name] = Account(self, name, priority)
            return account

    def accounts(self) -> list[Account]:
        with self._cond:
            return list(self._accounts.values())

    @contextlib.contextmanager
    def piece(self, account: Account, threads: int, least: int | None = None) -> Iterator[int]:
        """Hold cores for one piece of ``account``'s work: ``threads`` of them, or as few as ``least`` when no
        more are free. Yields the number granted, which the engine runs its threads at."""
        wanted = max(1, min(threads, self.cores))
        if self.policy == "off":
            start = self._clock()
            try:
                yield wanted
            finally:
                with self._cond:
                    self._done(account, wanted, start, 0.0)
            return
        asked = self._clock()
        with self._cond:
            waiter = _Waiter(account, wanted, min(wanted, max(1, least or wanted)), next(self._seq))
            self._level(account, asked)
            self._waiting.append(waiter)
            try:
                granted = self._grant(waiter)
                if not granted:
                    account.delayed += 1
                    while not granted:
                        self._cond.wait(self._until_bulk_may_start(waiter))
                        granted = self._grant(waiter)
            finally:
                self._waiting.remove(waiter)
            turn = account.priority is Priority.BULK and not self._interactive_quiet()
            self._turns += turn
            self._held[account.priority] += granted
            account.running += 1
            self._raise_floor(self._class(account))
            start = self._clock()
        try:
            yield granted
        finally:
            with self._cond:
                self._turns -= turn
                self._held[account.priority] -= granted
                account.running -= 1
                account.last_active = self._clock()
                if account.priority is Priority.INTERACTIVE:
                    self._interactive_until = self._clock() + self.linger
                self._done(account, granted, start, start - asked)
                self._cond.notify_all()

    def _level(self, account: Account, now: float) -> None:
        """Place an engine that asks for cores against the others of its priority, as CFS places a task that
        wakes: back from idling it starts at their floor (the core time it did not use while idle is not owed
        to it, and what it used long ago is not held against it); otherwise never below the floor, so an
        engine that paused between two requests cannot take the cores for as long as it was behind."""
        floor = self._floor[self._class(account)]
        idle = not account.running and now - account.last_active >= IDLE
        account.vtime = floor if idle else max(account.vtime, floor)

    def _class(self, account: Account) -> Priority:
        return account.priority if self.policy == "interactive-first" else Priority.INTERACTIVE

    def _raise_floor(self, priority: Priority) -> None:
        busy = [a.vtime for a in self._accounts.values() if a.running and self._class(a) is priority] + \
               [w.account.vtime for w in self._waiting if self._class(w.account) is priority]
        if busy:
            self._floor[priority] = max(self._floor[priority], min(busy))

    def _grant(self, waiter: _Waiter) -> int:
        """The cores ``waiter`` may start with now, 0 while it must wait."""
        priority = waiter.account.priority
        free = self.cores - self._held[Priority.INTERACTIVE] - self._held[Priority.BULK]
        if self.policy != "interactive-first":  # fair: one queue, by time used
            return self._fits(waiter, free) if self._first(waiter, self._waiting) and not self._owed(waiter) else 0
        if not self._first(waiter, [w for w in self._waiting if w.account.priority is priority]):
            return 0
        if self._owed(waiter):
            return 0
        if priority is Priority.INTERACTIVE:
            if self._turn_due():
                return 0
            if self._turns:  # a bulk turn keeps its cores; a step that fits in the others may run beside it
                return self._fits(waiter, free) if free > 0 else 0
            if not self._fits(waiter, self.cores - self._held[Priority.INTERACTIVE]):
                return 0
            # A bulk piece still running keeps its cores until it ends; a conversation takes what is free,
            # and never waits for bulk work: at worst it shares a core with it for one piece.
            return max(waiter.least, min(waiter.cores, free))
        if not (self._interactive_quiet() or self._bulk_share() < self.bulk_share):
            return 0
        return self._fits(waiter, free)

    def _owed(self, waiter: _Waiter) -> bool:
        """Another engine of the same priority (any, under ``fair``) has used less core time, runs nothing now
        and finished a piece within the ``GRACE``: the cores are kept for its next step."""
        now = self._clock()
        same = self.policy != "interactive-first" or None
        return any(a is not waiter.account and not a.running and now - a.last_active < GRACE
                   and a.vtime < waiter.account.vtime and (same or a.priority is waiter.account.priority)
                   for a in self._accounts.values())

    def _fits(self, waiter: _Waiter, free: int) -> int:
        """As many of the cores it wants as are ``free``, if that is at least its ``least``; all it wants when
        nothing else runs."""
        if free >= self.cores:
            return waiter.cores
        return min(waiter.cores, free) if free >= waiter.least else 0

    def _turn_due(self) -> bool:
        """Bulk work waits, none runs, and it has had less than its share: interactive pieces stop starting
        until it ran."""
        return (self.bulk_share > 0 and not self._held[Priority.BULK]
                and any(w.account.priority is Priority.BULK for w in self._waiting)
                and self._bulk_share() < self.bulk_share)

    def _first(self, waiter: _Waiter, waiters: list[_Waiter]) -> bool:
        return min(waiters, key=lambda w: (w.account.vtime, w.seq)) is waiter

    def _interactive_quiet(self) -> bool:
        """No interactive piece runs, waits or ran within the linger."""
        return (not self._held[Priority.INTERACTIVE] and self._clock() >= self._interactive_until
                and not any(w.account.priority is Priority.INTERACTIVE for w in self._waiting))

    def _bulk_share(self) -> float:
        """Bulk work's part of the core time used over the last ``SHARE_WINDOW`` seconds."""
        self._forget(self._clock())
        total = self._recent_sum[Priority.INTERACTIVE] + self._recent_sum[Priority.BULK]
        return self._recent_sum[Priority.BULK] / total if total else 0.0

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - SHARE_WINDOW:
            _, priority, used = self._recent.popleft()
            self._recent_sum[priority] -= used

    def _until_bulk_may_start(self, waiter: _Waiter) -> float | None:
        """How long a bulk waiter may sleep: until the linger after the last interactive piece runs out, and
        never long, since its share of recent core time changes with the clock alone."""
        if waiter.account.priority is Priority.BULK and self.policy == "interactive-first":
            return min(0.1, max(0.001, self._interactive_until - self._clock()))
        return GRACE

    def _done(self, account: Account, cores: int, start: float, waited: float) -> None:
        now = self._clock()
        used = (now - start) * cores
        account.busy += used
        account.vtime += used
        account.waited += waited
        account.pieces += 1
        account.recent.append((now, used))
        while account.recent and account.recent[0][0] < now - SHARE_WINDOW:
            account.recent.popleft()
        self._recent.append((now, account.priority, used))
        self._recent_sum[account.priority] += used
        self._forget(now)

    def share(self, account: Account, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        with self._cond:
            used = {a.name: sum(u for t, u in a.recent if t >= now - SHARE_WINDOW) for a in self._accounts.values()}
        total = sum(used.values())
        return used.get(account.name, 0.0) / total if total else 0.0

    def report(self) -> dict[str, dict[str, float]]:
        """Per engine: core-seconds busy, seconds waited for cores, pieces run and its recent share."""
        now = self._clock()
        return {a.name: {"cpu_busy_seconds": a.busy, "cpu_wait_seconds": a.waited, "cpu_pieces": float(a.pieces),
                         "cpu_share": a.share(now)} for a in self.accounts()}


_bound = threading.local()


def bind(account: Account | None) -> None:
    """Make ``account`` the one the calling thread's pieces are charged to (an engine's own thread)."""
    _bound.account = account


def bound() -> Account | None:
    return getattr(_bound, "account", None)


@contextlib.contextmanager
def piece(threads: int, least: int | None = None) -> Iterator[int]:
    """A piece of compute on ``threads`` threads (or as few as ``least``), run when the calling engine's account
    may, at once when the thread has none. Yields the threads to run it at."""
    account = bound()
    if account is None:
        yield threads
        return
    with account.piece(threads, least) as granted:
        yield granted
