"""The workers the session starts for an engine beside the engine's own deployment, and ends for it:

* **a replacement**, when a known defect measured to break the deployment ran in a call the tests ask for
  on purpose (`KnownIssue.breaks_engine`): it loads beside the broken deployment, which still hands over
  what it computed before the defect (the defect's call is worked ahead last), and takes its place when the
  session settles or asks the engine for anything else;
* **helpers**, more workers of the same deployment that share its calls worked ahead (ahead_share.py); each
  answers the calls of its share and is closed once the session has taken its whole share (on a thread of
  its own, while the session goes on), at the latest when the session settles, before anything is timed.

The session (session.py) owns what is deployed, the cache of results and the time line; this class holds the
extra workers' state and asks the session to load, close and record. Nothing here knows an engine."""
from __future__ import annotations

import threading

from pytest_neoxmii import ahead_share
from pytest_neoxmii import backends as engines
from pytest_neoxmii.backends import Backend
from pytest_neoxmii.deploy.processes import DeploymentError
from pytest_neoxmii.errors import BackendUnavailable
from pytest_neoxmii.injection import InjectionFailed
from pytest_neoxmii.known_issues import KnownIssue

Call = ahead_share.Call


class ExtraWorkers:
    """One per session. `session` is the NeoxSession (session.py, which imports this module)."""

    def __init__(self, session):
        self.session = session
        self.broken: dict[str, KnownIssue] = {}        # deployments a known defect's call broke
        self.replacements: dict[str, Backend] = {}     # their replacements, loading meanwhile
        self.redeployed: list[str] = []                # what was deployed again, for the summary
        self.helpers: dict[str, list[Backend]] = {}    # engine key -> workers sharing its calls ahead
        self.ahead_breaks: dict[str, KnownIssue] = {}  # deployments whose work ahead ends with a breaking call
        self.taken: dict[str, list[Call]] = {}         # helper name -> the calls of its share the session took
        self.closing: dict[str, HelperClose] = {}      # helper name -> its close, running beside the session

    # -- a known defect broke the deployment --------------------------------------------------------------
    def mark_broken(self, key: str, issue: KnownIssue) -> None:
        """A known defect broke the deployment `key`: its replacement starts loading now, unless it already
        does (launch_replacement); the broken one still hands over what it computed before."""
        self.broken[key] = issue
        self.ahead_breaks.pop(key, None)
        self.launch_replacement(key)

    def will_break_ahead(self, key: str, issue: KnownIssue, replace_now: bool) -> None:
        """The deployment `key` works ahead a call that `issue` breaks it with, last (prelaunch): it is broken
        once that work is done, asked for or not (ran_breaking_ahead). replace_now: its replacement loads
        from now on, where the breaking call would otherwise run late (after a kernel build)."""
        self.ahead_breaks[key] = issue
        if replace_now:
            self.launch_replacement(key)

    def launch_replacement(self, key: str) -> None:
        """Load the replacement of the deployment `key` now, beside it, where both fit the GPU with the
        reference and every other worker."""
        s = self.session
        name, dtype = key.split(":", 1)
        on_gpu = [k.split(":", 1)[0] for k in [*s.backends, *s.pending] if not engines.is_reference(k.split(":", 1)[0])]
        on_gpu += [k.split(":", 1)[0] for k, helpers in self.helpers.items() for _ in helpers]   # not closed yet
        if key in self.replacements or not s.fit_at_once([*on_gpu, name], dtype):
            return
        try:
            self.replacements[key] = s.load(name, dtype, wait=False)
        except (BackendUnavailable, DeploymentError, InjectionFailed):
            pass                    # deployed again when next asked for, which says why it cannot

    def replace_once_broken(self) -> None:
        """Launch the replacement of each deployment whose work ahead, breaking call included, is done, while
        the session still does other work; the broken one stays up to hand over its results. Called between
        the reference's cases and before each test. On one H200 warm (pythia-160m, synthetic weights), the
        replacement launched at settle held the first timing 4 s; launched with the others at the start, it
        delayed ZeRO's calls by 5 s."""
        s = self.session
        for key in self.ahead_breaks:
            backend = s.pending.get(key) or s.backends.get(key)
            if key not in self.replacements and getattr(backend, "finished_ahead", lambda: False)():
                self.launch_replacement(key)

    def ran_breaking_ahead(self) -> list[str]:
        """Deployments whose work ahead, now finished, ended with a breaking call no test has asked for yet:
        marked broken (settle retires them)."""
        keys = [key for key in self.ahead_breaks if key in self.session.backends]
        for key in keys:
            self.broken[key] = self.ahead_breaks.pop(key)
        return keys

    def unbroken(self, key: str, backend: Backend, call: Call) -> Backend:
        """The deployment to compute `call` on: a broken one only hands over what its worker computed ahead,
        before the defect; anything else goes to the engine deployed again."""
        if key not in self.broken or call in getattr(backend, "ahead", ()):
            return backend
        name, dtype = self.retire_broken(key)
        return self.session.backend(name, dtype)

    def retire_broken(self, key: str) -> tuple[str, str]:
        """Close a deployment a known defect broke; the session's next backend() call takes its replacement
        (or deploys the engine again)."""
        s = self.session
        issue = self.broken.pop(key)
        name, dtype = key.split(":", 1)
        s.close_backend(name, dtype)
        if key in self.replacements:
            s.pending[key] = self.replacements.pop(key)
        self.redeployed.append(f"{name} deployed again after known issue [{issue.key}] ran: {issue.breaks_engine}")
        return name, dtype

    def retire_all_broken(self) -> None:
        for key in list(self.broken):
            self.retire_broken(key)

    # -- helpers sharing the calls ahead ------------------------------------------------------------------
    def launch_helper(self, key: str, share: list[Call] | None) -> Backend | None:
        """Another worker of the deployment `key`, computing `share` of its calls ahead (None: given later,
        IsolatedEngine.give_ahead); None when it cannot start: the engine's own deployment then computes
        those calls, each when a test asks."""
        name, dtype = key.split(":", 1)
        try:
            helper = self.session.load(name, dtype, wait=False, ahead=share)
        except (BackendUnavailable, DeploymentError, InjectionFailed):
            return None
        self.helpers.setdefault(key, []).append(helper)
        return helper

    def sharer_of(self, key: str, backend: Backend, call: Call) -> Backend:
        """The helper of `key` that was given `call` ahead (waited for until it is ready), else `backend`."""
        for helper in self.helpers.get(key, ()):
            if call in helper.ahead:
                with self.session.timed("model load"):
                    return helper.wait_ready()
        return backend

    def took(self, key: str, worker: Backend, call: Call) -> None:
        """The session took `call`'s result from `worker`. A helper of `key` whose whole share is taken has
        nothing left to hand over: its account is taken and it closes now, on a thread, while the session
        goes on, instead of at settle, where the two ZeRO helpers' closes held the first timing 1.8 s (one
        H200 warm, pythia-160m synthetic). Its teardown judges GPU memory as any close does: the baseline and
        the readings leave out the test process and the other live deployments, which may work meanwhile."""
        index = next((i for i, h in enumerate(self.helpers.get(key, []), 1) if h is worker), None)
        if index is None:                # the deployment itself, or another engine: nothing closes
            return
        name = ahead_share.helper_key(key, index)
        taken = self.taken.setdefault(name, [])
        taken.append(call)
        if name in self.closing or not all(c in taken for c in worker.ahead):
            return
        if not self._take_account(key, name, worker):
            return                       # it died: settle says so, as it would have
        self.closing[name] = HelperClose(name, worker)

    def _take_account(self, key: str, name: str, helper: Backend) -> bool:
        """The helper's account of its work ahead, for the summary; False (the crash recorded) where it died:
        a crash of its engine, the same deployment."""
        s = self.session
        try:
            with s.timed("model calls"):
                s.ahead_reports[name] = helper.wait_ready().wait_ahead()
            return True
        except DeploymentError as exc:     # (a crash already said is not said again)
            if key not in s.crashed:
                engine, dtype = key.split(":", 1)
                s.record_crash(key, f"{engine} ({dtype}): a worker sharing its calls ahead died: {exc}")
            return False

    def retire_helpers(self) -> None:
        """Wait until every helper has computed its share, take its account, and close it (or wait for the
        close begun when its share was taken): the engine's own deployment answers whatever is asked later,
        and nothing else shares the machine with a timing. A helper that died is a crash of its engine (the
        same deployment); one that does not close cleanly is said as every deployment's teardown is."""
        s = self.session
        for key, helpers in list(self.helpers.items()):
            still_open = {}
            for i, helper in enumerate(helpers, 1):
                name = ahead_share.helper_key(key, i)
                if name not in self.closing:
                    self._take_account(key, name, helper)
                    still_open[name] = helper
            s.close_all(still_open)
            names = [ahead_share.helper_key(key, i) for i in range(1, len(helpers) + 1)]
            self._join_closing(names)
            for name in names:
                self.taken.pop(name, None)
            del self.helpers[key]

    def _join_closing(self, names: list[str]) -> None:
        """Wait for the closes begun on their own threads (what the session waits here is teardown time);
        a close that failed is said as close_all says it."""
        s = self.session
        with s.timed("model teardown"):
            for name in names:
                close = self.closing.pop(name, None)
                if close is not None and close.wait() is not None:
                    s.unavailable[name] = f"close failed: {close.error}"

    # -- the session's end --------------------------------------------------------------------------------
    def still_up(self) -> dict[str, Backend]:
        """Every extra worker not closed yet (a session cut short), by the name its teardown is reported under,
        with its account of the work ahead taken first; the session tears them down with the rest."""
        up: dict[str, Backend] = {}
        closed = list(self.closing)         # closing on their own threads (took): waited for, not closed again
        self._join_closing(closed)
        for key, helpers in self.helpers.items():
            for i, helper in enumerate(helpers, 1):
                name = ahead_share.helper_key(key, i)
                if name in closed:
                    continue
                if helper.is_ready:
                    self.session.take_ahead_account(name, helper)
                up[name] = helper
        up.update({f"{k} (replacement)": b for k, b in self.replacements.items()})
        self.helpers.clear()
        self.replacements.clear()
        return up


class HelperClose:
    """A helper's close on a thread of its own (ExtraWorkers.took): teardown waits on processes and GPU
    memory, not on the session, which goes on meanwhile."""

    def __init__(self, name: str, helper: Backend):
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._close, args=(helper,), name=f"neoxmii close {name}")
        self._thread.start()

    def _close(self, helper: Backend) -> None:
        try:
            helper.close()
        except Exception as exc:        # said where the session waits for it (_join_closing)
            self.error = exc

    def wait(self) -> Exception | None:
        """Wait for the close to end; its error, or None."""
        self._thread.join()
        return self.error
