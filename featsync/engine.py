"""One cycle: scan -> plan -> apply -> record -> one summary line.

Every trigger goes through here: ``featsync reconcile``, its ``--dry-run`` (which
stops after the plan), and later the daemon. A lock makes sure cycles never overlap.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from featsync import retention
from featsync.apply import apply_plan
from featsync.apply_record import ApplyResult
from featsync.backup_worker import Backups
from featsync.backups import BackupStore
from featsync.config import Settings
from featsync.errors import Fatal, Transient
from featsync.listing import held_ids
from featsync.model import (
    CycleLedger,
    Kind,
    LedgerRow,
    Plan,
    Policy,
    RootState,
    SearchContext,
    Snapshot,
    State,
)
from featsync.plan import plan
from featsync.progress import Sink, nothing
from featsync.scan import image_id_for, scan
from featsync.wiring import scan_rules


@dataclass(frozen=True, slots=True)
class CycleReport:
    snapshot: Snapshot
    plan: Plan
    applied: ApplyResult | None  # None for a dry run
    duration_ms: float
    interrupted: bool = False  # a stop was asked for during the cycle
    # A dry run's ledger rows of the actions and withheld deletes: why each is planned
    rows: Mapping[str, LedgerRow] = field(default_factory=dict)

    @property
    def in_step(self) -> bool:
        """Everything in the folder is in the context and nothing is held back."""
        p = self.plan
        if p.withheld or p.waiting or p.unreadable or p.unsettled or not self.snapshot.complete:
            return False
        if self.applied is None:  # a dry run: would it call the context? (refreshing
            return not p.actions  # the ledger's stat keys or forgetting is no call)
        a = self.applied
        return not (a.failed or a.deferred or a.not_sent or a.fatal)

    @property
    def good(self) -> bool:
        """The cycle saw the whole folder and reached the service: single images may have
        been rejected, but nothing stopped it (what a heartbeat's "last good cycle" means)."""
        a = self.applied
        return (
            a is not None
            and a.fatal is None
            and a.backed_off is None
            and not a.not_sent
            and self.snapshot.complete
        )


def bind_context(
    ledger: CycleLedger,
    context: SearchContext,
    log: Any,
    resync: bool = False,
    dry_run: bool = False,
    prefix: str = "",
) -> None:
    """The ledger mirrors one search context: on first use record which; afterwards
    refuse another (switched in the config, or a store deleted and made anew), unless
    told to resync, which sends every image again to the one configured now. `prefix`:
    the configuration's id_prefix (what it adopts of a context that can list)."""
    want, have = context.identity(), ledger.context_identity()
    if have == want and not resync:
        return
    if have is None and not resync:  # a new ledger, or one from before bindings
        if not dry_run:
            try:
                _adopt(ledger, context, log, prefix)
            except Transient as exc:
                # Not bound yet, so the next cycle adopts (and binds): a listing that
                # failed for now must not lose the adoption for good, nor stop the sync.
                log.warning(
                    "context_adoption_deferred",
                    error=str(exc),
                    reason="could not list what the context holds; the next cycle tries again",
                )
                return
            ledger.bind_context(want)
        return
    if resync:
        if not dry_run:
            n = ledger.resync(want, time.time())
            log.warning("context_resync", previous=have, context=want, images=n)
            try:
                _adopt(ledger, context, log, prefix)
            except Transient as exc:  # resync sends everything anyway; the deletes wait
                log.warning("context_adoption_deferred", error=str(exc), reason="resync")
        return
    raise Fatal(
        f"the ledger mirrors {have}, but the configuration names {want}: nothing was "
        "sent. If the new context is meant (a new store, another Aspose context), run "
        "`featsync reconcile --resync` to send every image of the folder to it; "
        "otherwise put the configuration (or the store) back"
    )


def _adopt(ledger: CycleLedger, context: SearchContext, log: Any, prefix: str) -> None:
    """A ledger that starts mirroring a context that can list what it holds (the
    embedded one, featsync serve) learns every image ID under its prefix in it: after
    a lost ledger, images removed meanwhile are deleted (through the delete guard)
    instead of staying for good. Raises Transient if the listing failed for now."""
    held = held_ids(context, prefix)
    if held is None:
        return  # Aspose cannot list a context's image IDs
    n = ledger.adopt(held, time.time())
    if n:
        log.warning(
            "context_adopted",
            images=n,
            reason="held by the context, unknown to the ledger: each is sent again if "
            "its file is there, deleted if not",
        )


class Stopped(Exception):
    """A stop was requested while a cycle was scanning: it ends without sending."""


class Engine:
    """Runs cycles for one configuration, one at a time.

    `stop` is asked during the scan and before each call (a daemon's SIGTERM);
    `progress` is told whenever the cycle moves on (a folder listed, a file hashed,
    an outcome recorded): the daemon's systemd watchdog pings only while it does;
    `sink` is told where the cycle stands (featsync.progress: a terminal's live line).
    """

    def __init__(
        self,
        settings: Settings,
        ledger: CycleLedger,
        context: SearchContext,
        log: Any,
        stop: Callable[[], bool] = lambda: False,
        progress: Callable[[], None] = lambda: None,
        hold: Callable[[str], bool] | None = None,
        sink: Sink = nothing,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.context = context
        self.log = log
        self.stop = stop
        self.progress = progress
        self.hold = hold  # paths still being written (the daemon's watcher knows)
        self.in_flight = 0  # calls under way right now
        self.sink = sink
        self._scanned = 0  # folders listed and files hashed by this cycle's scan
        self.last: CycleReport | None = None  # the last cycle's, even if it raised
        self.lock = threading.Lock()

    def policy(
        self,
        confirm_deletes: bool = False,
        held: int | None = None,
        now: float | None = None,
        pending_gone: int = 0,
    ) -> Policy:
        s, sync = self.settings.safety, self.settings.sync
        now = time.time() if now is None else now
        recent, added = (
            self.ledger.recent_changes(now - s.delete_window) if s.delete_window else (0, 0)
        )
        return Policy(
            max_delete_count=s.max_delete_count,
            max_delete_fraction=s.max_delete_fraction,
            marker=s.marker,
            expected_device=self.ledger.device(),
            confirm_deletes=confirm_deletes,
            held=held,
            recent_deletes=recent,
            recent_adds=added,
            pending_gone=pending_gone,
            max_file_size=sync.max_file_size,
            min_features=sync.min_features,
            follow_symlinks=sync.follow_symlinks,
        )

    def cycle(
        self,
        *,
        dry_run: bool = False,
        confirm_deletes: bool = False,
        scope: Collection[str] | None = None,
        resync: bool = False,
        pending_gone: int = 0,
    ) -> CycleReport:
        """One cycle over the whole folder, or over `scope` (paths relative to the root:
        files, and folders with all below them) after watch events. `resync`: the
        configured context is new to the ledger: send every image to it.
        `pending_gone`: files the daemon saw go that a later cycle will judge (they
        count against the delete limits now, so deleting a folder in bursts gains
        nothing)."""
        with self.lock:
            prefix = self.settings.sync.id_prefix
            bind_context(self.ledger, self.context, self.log, resync, dry_run, prefix)
            return self._cycle(dry_run, confirm_deletes, scope, pending_gone)

    def _release_withheld(self, snapshot: Snapshot) -> None:
        """Files whose deletes were withheld and that are there again."""
        flagged = self.ledger.withheld_ids()
        if not flagged:
            return
        s = snapshot
        back = [
            i
            for i in flagged
            if i in s.files or i in s.unchanged or i in s.unsettled or i in s.unreadable
        ]
        if back:
            self.ledger.release_withheld(back)
            self.log.info("deletes_released", count=len(back), reason="the files are back")

    def _backups(self, p: Plan) -> Backups | None:
        """The backups for a cycle that sends anything (an add may meet features
        already there); the store opens when a worker first needs it. One that cannot
        be opened holds back what needs a backup (unless [backup] required = false),
        not the adds."""
        b = self.settings.backup
        if not b.enabled or not p.actions:
            return None
        return Backups(b.path, b.required, b.images)

    def _prune(self, store: BackupStore, touched: list[str]) -> None:
        """The retention rules (featsync.retention): for the images this cycle touched,
        and for all at most once an hour. A failure to prune is logged, not fatal: the
        sync itself went well."""
        b, now = self.settings.backup, time.time()
        try:
            full = retention.full_prune_due(store, now)
            pruned = retention.prune(
                store,
                b.keep_versions,
                b.keep_deleted_days,
                b.max_size,
                self.ledger.gone_before,
                self.ledger.current_digests,
                now,
                touched=None if full else touched,
            )
        except (Fatal, OSError) as exc:
            self.log.warning("backups_not_pruned", error=str(exc))
            return
        retention.log_pruned(self.log, pruned, b.max_size)

    def _count_in_flight(self, n: int) -> None:
        self.in_flight = n

    def _tick(self) -> None:
        if self.stop():
            raise Stopped
        self.progress()
        self._scanned += 1
        self.sink("scan", self._scanned, None, 0)

    def _look(
        self, dry_run: bool, scope: Collection[str] | None
    ) -> tuple[Snapshot, dict[str, LedgerRow], int | None]:
        """Scan, and fetch the ledger rows the planner needs (and the held count of a
        targeted cycle, for the delete fraction)."""
        rules = scan_rules(self.settings)
        if scope is not None:
            prefix = rules.id_prefix
            ids = [image_id_for(p.strip("/"), prefix) for p in scope]
            scoped = self.ledger.rows_in_scope(ids, [i + "/" for i in ids])
            known = {
                (r.image_id, r.size, r.mtime_ns or None, r.inode)
                for r in scoped.values()
                if r.state == State.SYNCED
            }
            snap = scan(
                rules, known, self.log.warning, scope=scope, tick=self._tick, hold=self.hold
            )
            return snap, scoped, self.ledger.held_count()
        # Only quick-check keys for the scan; whole rows only for what it did not
        # find unchanged (and every failed row): a no-change rescan of a large
        # folder never builds a row object per image.
        quick = self.ledger.quick_keys(write_cache=not dry_run)
        snapshot = scan(rules, quick, self.log.warning, tick=self._tick, hold=self.hold)
        if len(snapshot.unchanged) == len(quick):  # every synced image seen unchanged
            return snapshot, self.ledger.rows_for(snapshot.files), None
        synced = set(map(itemgetter(0), quick))
        del quick  # a large set, not needed from here on
        wanted = synced.difference(snapshot.unchanged).union(snapshot.files)
        return snapshot, self.ledger.rows_for(wanted), None

    def _cycle(
        self,
        dry_run: bool,
        confirm_deletes: bool,
        scope: Collection[str] | None,
        pending_gone: int = 0,
    ) -> CycleReport:
        started_wall = time.time()
        started = time.perf_counter()
        log = self.log
        self._scanned, self.last = 0, None
        try:
            snapshot, rows, held = self._look(dry_run, scope)
        except Stopped:
            if scope is None and not dry_run:
                self._record_stopped(started_wall, started)
            raise
        policy = self.policy(confirm_deletes, held, started_wall, pending_gone)
        p = plan(snapshot, rows, policy, started_wall)
        if snapshot.root_state is not RootState.OK:
            log.error(
                "folder_unavailable",
                folder=snapshot.root,
                state=snapshot.root_state.value,
                fix=f"mount or create it, or set [sync] folder in {self.settings.config_path}",
            )
        if p.withheld:
            log.warning("deletes_withheld", count=len(p.withheld), reason=p.withheld_reason)
        updates = p.count(Kind.UPDATE)
        if updates > max(1.0, policy.max_delete_fraction * p.held):
            # Not withheld (the files are there), but worth a look: a tool rewrote the
            # folder, or another folder was copied over it under the same names.
            log.warning("mass_update", count=updates, held=p.held)
        if dry_run:
            why = [*p.actions, *p.withheld]
            shown = {a.image_id: rows[a.image_id] for a in why if a.image_id in rows}
            return CycleReport(snapshot, p, None, _ms(started), rows=shown)
        if p.withheld and not p.doubtful:  # kept withheld until confirmed or back
            self.ledger.withhold([a.image_id for a in p.withheld], started_wall)
        self._release_withheld(snapshot)

        # First sight of the root (or an operator confirming a new mount): remember its
        # device, so that an unmounted folder is recognised later.
        if (
            snapshot.root_state is RootState.OK
            and snapshot.device is not None
            and (policy.expected_device is None or confirm_deletes)
            and policy.expected_device != snapshot.device
        ):
            self.ledger.set_device(snapshot.device)
        backups = self._backups(p)
        try:
            applied = apply_plan(
                p,
                snapshot.root,
                self.context,
                self.ledger,
                policy,
                self.settings.sync.concurrency,
                log,
                stop=self.stop,
                progress=self.progress,
                hold=self.hold or (lambda _relpath: False),
                in_flight=self._count_in_flight,
                backups=backups,
                sink=self.sink,
            )
            if backups is not None and backups.unavailable:
                log.error(
                    "backups_unavailable", error=backups.unavailable, required=backups.required
                )
            if backups is not None and backups.opened is not None:
                touched = [a.image_id for a in p.actions if a.kind is not Kind.ADD or a.held]
                self._prune(backups.opened, touched)
        finally:
            if backups is not None:
                backups.close()
        report = CycleReport(snapshot, p, applied, _ms(started), interrupted=self.stop())
        self.last = report
        if confirm_deletes and applied.fatal is None:
            self.ledger.confirm_deletes(time.time())
        counts = {
            "added": applied.added,
            "updated": applied.updated,
            "deleted": applied.deleted,
            "unchanged": p.unchanged,
            "failed": applied.failed + len(p.waiting),
            "withheld_deletes": len(p.withheld),
        }
        if scope is None:  # the cycles table keeps full cycles (status: "last cycle")
            try:
                self.ledger.record_cycle(
                    started_at=started_wall,
                    finished_at=time.time(),
                    complete=snapshot.complete,
                    duration_ms=report.duration_ms,
                    interrupted=report.interrupted,
                    **counts,
                )
            except Fatal as exc:  # the summary line below is still written
                log.error("cycle_not_recorded", error=str(exc))
                if applied.fatal is None:
                    applied.fatal = exc
        log.info(
            "cycle_finished",
            scope="full" if scope is None else "paths",
            paths=None if scope is None else len(scope),
            **counts,
            weak=applied.weak,
            deferred=applied.deferred,
            not_sent=applied.not_sent,
            complete=snapshot.complete,
            duration_ms=report.duration_ms,
            **({"interrupted": True} if report.interrupted else {}),
        )
        if applied.fatal is not None:
            raise applied.fatal
        return report

    def _record_stopped(self, started_wall: float, started: float) -> None:
        """A full cycle stopped while it scanned: nothing was sent; the cycles table
        says it was interrupted (status: "last cycle")."""
        zero = ("added", "updated", "deleted", "unchanged", "failed", "withheld_deletes")
        try:
            self.ledger.record_cycle(
                started_at=started_wall,
                finished_at=time.time(),
                complete=False,
                duration_ms=_ms(started),
                interrupted=True,
                **dict.fromkeys(zero, 0),
            )
        except Fatal as exc:
            self.log.error("cycle_not_recorded", error=str(exc))


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)
