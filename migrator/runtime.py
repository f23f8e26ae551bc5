"""The migration runtime: the models the state machines drive, and the order of the switch.

``LayerTask`` is the model of one layer's machine, ``Migration`` the model of the run's.  Their transition
callbacks are the only places that change the filesystem; ``record_state``/``record_phase`` are the only
places that record a state.  The database row is the truth: every start rebuilds the models from it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import fcntl
import multiprocessing
import os
import signal
import time
from typing import Callable, Dict, Iterator, List, Optional

from migrations_state.machine import LAYER_NEXT, layer_machine, phase_machine
from migrations_state.schema import (
    ChangedDirRecord,
    ChangeRecord,
    ContainerRecord,
    FindingRecord,
    LayerRecord,
    SavedTimeRecord,
)
from migrations_state.store import Store
from migrator import containers, engineconfig, fsio, images, inplace, overlay, recovery, survey
from migrator.errors import Locked, MigratorError
from migrator.paths import Paths
from migrator.progress import Reporter


@contextlib.contextmanager
def root_lock(paths: Paths) -> Iterator[None]:
    """An exclusive flock under ROOT: a second migrator (or rollback) on the same root is refused.

    Creating the work area leaves ROOT's own times as they were, so a rollback can return ROOT exactly.
    """
    if not fsio.lexists(paths.workdir):
        st = os.lstat(paths.root)
        os.mkdir(paths.workdir, 0o700)
        os.utime(paths.root, ns=(st.st_atime_ns, st.st_mtime_ns))
        fsio.fsync_path(paths.root)
    fd = os.open(paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Locked(f"another aufs2overlay is working on {paths.root} (lock {paths.lock})") from None
        _worker["lock_fd"] = fd
        yield
    finally:
        _worker.pop("lock_fd", None)
        os.close(fd)


Progress = Reporter


def _quiet() -> Reporter:
    return Reporter(quiet=True)


class LayerTask:
    """Model of one layer's state machine (hardlink strategy); its callbacks are the layer steps of ``overlay``.

    ``record`` receives each reached state: by default it is written to the database at once.
    """

    sync_steps = True

    def __init__(self, record: LayerRecord, link_ids: Dict[str, str], paths: Paths, store: Store,
                 recorder: Optional[Callable[[dict], None]] = None) -> None:
        self.id = record.id
        self.record = record
        self.link_ids = link_ids
        self.paths = paths
        self.store = store
        self.recorder = recorder or (lambda change: store.set_layer_state(change.pop("id"), **change))
        self.result: Optional[overlay.StepResult] = None

    @property
    def src(self) -> str:
        return os.path.join(self.paths.aufs_diff, self.id)

    def build_tree(self) -> None:
        self.result = overlay.build_layer_tree(self.src, self.paths.temp_tree, self.id, copy=self.record.writable)

    def convert_whiteouts_in_tree(self) -> None:
        self.result = overlay.convert_whiteouts(self.src, self.paths.temp_tree, self.id,
                                                self.store.whiteout_dirs(self.id))

    def write_lower_files(self) -> None:
        ancestors = self.record.ancestors.split("\n") if self.record.ancestors else []
        overlay.write_layer_files(self.paths.temp_tree, self.id, self.record.link_id,
                                  [self.link_ids[a] for a in ancestors], sync=self.sync_steps)
        self.result = None

    def write_committed_marker(self) -> None:
        overlay.write_committed_marker(self.paths.temp_tree, self.id, self.record.has_child, sync=self.sync_steps)
        self.result = None

    def record_state(self) -> None:
        change = {"id": self.id, "state": self.state, "entries": None, "findings": [], "whiteout_dirs": []}
        if self.result is not None:
            if self.state == "linked":
                change["entries"] = self.result.entries
                change["whiteout_dirs"] = self.result.whiteout_dirs
            change["findings"] = [FindingRecord(layer_id=self.id, kind=k, detail=d) for k, d in self.result.findings]
        self.recorder(change)


class InPlaceLayerTask(LayerTask):
    """Model of one layer's state machine, in-place strategy: the same states and triggers, but the link step
    moves ``aufs/diff/<id>`` into the tree and the whiteout step converts the layer where it stands, after
    journaling every change.  Steps do not sync: ``Migration`` syncs once per wave of layers, then records."""

    sync_steps = False

    def __init__(self, record: LayerRecord, link_ids: Dict[str, str], paths: Paths, store: Store,
                 recorder: Callable[[dict], None], scanned: Optional[overlay.StepResult]) -> None:
        super().__init__(record, link_ids, paths, store, recorder)
        self.scanned = scanned
        self.planned: Optional[tuple] = None  # (changes, dir times) recorded in this run, for the whiteout step

    @property
    def diff(self) -> str:
        return os.path.join(self.paths.temp_tree, self.id, "diff")

    @property
    def stash(self) -> str:
        return os.path.join(self.paths.stash, self.id)

    def build_tree(self) -> None:
        if self.scanned is None:
            where = inplace.diff_location(self.paths.aufs_diff, self.paths.temp_tree, self.id)
            self.scanned = survey.scan_layer(where)
        inplace.move_layer(self.paths.aufs_diff, self.paths.temp_tree, self.id)
        self.result = self.scanned

    def journal(self, listed: List[bytes]) -> Optional[tuple]:
        """Plan this layer's changes in ``listed`` (its whiteout directories) and write their journal copy;
        return the rows to record, or None when the layer needs none.  Nothing is changed yet; the plan is
        kept (``planned``) for the whiteout step of this run once it is recorded."""
        self.planned = ([], [])
        if not listed:
            return None
        changes, times, found = inplace.plan_changes(self.diff, listed)
        inplace.write_journal_copy(self.stash, changes, times)
        self.planned = (changes, times)
        return (self.id, [ChangeRecord(layer_id=self.id, seq=i, **vars(c)) for i, c in enumerate(changes)],
                [ChangedDirRecord(layer_id=self.id, **vars(t)) for t in times],
                [FindingRecord(layer_id=self.id, kind=k, detail=d) for k, d in found.findings])

    def convert_whiteouts_in_tree(self) -> None:
        """Apply the journal: ``Migration._record_journals`` ran for this layer before this wave, and either
        planned and recorded it (``planned``) or found it recorded by an earlier run (read back here)."""
        self.result = None
        if self.planned is None:
            self.planned = changes_from_rows(*self.store.changes(self.id))
        changes, times = self.planned
        if changes:
            inplace.apply_changes(self.diff, self.stash, self.id, changes, times)


def changes_from_rows(rows: List[ChangeRecord], dirs: List[ChangedDirRecord]) -> tuple:
    fields = inplace.Change.__dataclass_fields__
    return ([inplace.Change(**{f: getattr(r, f) for f in fields}) for r in rows],
            [inplace.DirTimes(d.dir, d.atime_ns, d.mtime_ns) for d in dirs])


def drive_layer(record: LayerRecord, link_ids: Dict[str, str], paths: Paths, store: Store,
                machine) -> tuple:
    """Take one layer from its recorded state to ``committed``; return (id, [(state, entries, seconds)])."""
    task = LayerTask(record, link_ids, paths, store)
    machine.add_model(task, initial=record.state)
    steps = []
    try:
        while task.state != "committed":
            started = time.monotonic()
            getattr(task, LAYER_NEXT[task.state])()
            entries = task.result.entries if task.state == "linked" and task.result is not None else None
            steps.append((task.state, entries, time.monotonic() - started))
    except OSError as exc:
        store.set_layer_error(record.id, f"{task.state}: {exc}")
        raise
    finally:
        machine.remove_model(task)
    return record.id, steps


_worker: Dict[str, object] = {}


def _worker_start() -> None:
    """In each worker process: die with the migrator (a SIGKILL of the migrator must stop all of it)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:
        os._exit(1)
    lock_fd = _worker.pop("lock_fd", None)
    if lock_fd is not None:
        os.close(lock_fd)  # the flock belongs to the migrator: it must end with the migrator, not with us


def _worker_convert(paths: Paths, layer_id: str, link_ids: Dict[str, str]) -> tuple:
    if "store" not in _worker:
        _worker["store"] = Store(paths.state_db)
        _worker["machine"] = layer_machine()
    store = _worker["store"]
    return drive_layer(store.layer(layer_id), link_ids, paths, store, _worker["machine"])


class Migration:
    """Model of the run's phase machine: converting → switching → completed (→ cleaning → cleaned),
    or → rolling-back → rolled-back."""

    def __init__(self, paths: Paths, store: Store, progress: Optional[Progress] = None,
                 surveys: Optional[Dict[str, overlay.StepResult]] = None) -> None:
        self.paths = paths
        self.store = store
        self.progress = progress or _quiet()
        self.surveys = surveys or {}  # the plan's walk of layers still in aufs/diff, reused by the in-place run
        run = store.run()
        self.run_record = run
        phase_machine(self, run.phase)

    # -- converting -------------------------------------------------------------------------------------

    def convert_layers(self, jobs: int = 1) -> None:
        """Drive every layer to ``committed``, resuming each from its recorded state."""
        if self.run_record.strategy == "inplace":
            self._convert_in_place(jobs)
        else:
            self._convert_by_linking(jobs)

    def _convert_by_linking(self, jobs: int) -> None:
        """Hardlink strategy: each layer's tree is built by its own machine, one layer after another.

        Layers are independent (every link id was fixed at discovery), so ``jobs`` worker processes convert
        several at once, each with its own database connection and layer machine.  Processes, not threads:
        the work is one system call per entry, and two threads handing the GIL back and forth around each of
        them spent more time in the kernel than they saved (measured in docs/performance.md).  The first
        failure stops the hand-out of new layers, lets the running ones finish, and is raised.
        """
        overlay.prepare_tree(self.paths.temp_tree)
        records = self.store.layers()
        link_ids = {r.id: r.link_id for r in records}
        pending = [r for r in records if r.state != "committed"]
        self._start_progress(records)

        def report(layer_id: str, steps: list) -> None:
            for state, entries, seconds in steps:
                self.progress.step(layer_id, state, entries, seconds)

        if jobs <= 1 or len(pending) <= 1:
            machine = layer_machine()
            for record in pending:
                report(*drive_layer(record, link_ids, self.paths, self.store, machine))
            return
        self.store.close()  # no pooled connection may cross the fork; the engine reconnects when needed
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context,
                                                    initializer=_worker_start) as pool:
            futures = [pool.submit(_worker_convert, self.paths, record.id, link_ids) for record in pending]
            try:
                for future in concurrent.futures.as_completed(futures):
                    report(*future.result())
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _start_progress(self, records: List[LayerRecord]) -> None:
        surveyed = {i: s.entries for i, s in self.surveys.items()}
        done = [r for r in records if r.state != "discovered"]
        self.progress.start(len(records), sum(r.entries or surveyed.get(r.id, 0) for r in records),
                            sum(r.state == "committed" for r in records), sum(r.entries for r in done))

    def _convert_in_place(self, jobs: int) -> None:
        """In-place strategy: the layers move through the states together, a wave per state.

        Each step is one rename or a handful of small writes, so what costs is making them durable: each wave
        does its step for every layer, syncs the filesystem once, and records all of them in one transaction.
        The one long part, the read-only walk that finds whiteouts, runs first, in ``jobs`` processes.
        """
        p = self.paths
        overlay.prepare_tree(p.temp_tree)
        records = self.store.layers()
        link_ids = {r.id: r.link_id for r in records}
        pending = [r for r in records if r.state != "committed"]
        scans = self._scan([r.id for r in pending if r.state == "discovered"], jobs)
        self.surveys.update(scans)
        self._start_progress(records)
        batch: List[dict] = []
        machine = layer_machine()
        tasks = []
        for record in pending:
            task = InPlaceLayerTask(record, link_ids, p, self.store, batch.append, scans.get(record.id))
            machine.add_model(task, initial=record.state)
            tasks.append(task)
        tfd = fsio.open_dir(p.temp_tree)
        try:
            for source, trigger in LAYER_NEXT.items():
                if source == "linked":
                    self._record_journals([t for t in tasks if t.state == "linked"], tfd)
                took = {}
                for task in tasks:
                    if task.state == source:
                        started = time.monotonic()
                        try:
                            getattr(task, trigger)()
                        except OSError as exc:
                            self.store.set_layer_error(task.id, f"{task.state}: {exc}")
                            raise
                        took[task.id] = time.monotonic() - started
                if batch:
                    fsio.syncfs(tfd)
                    self.store.set_layer_states(batch)
                    for change in batch:
                        self.progress.step(change["id"], change["state"], change.get("entries"), took[change["id"]])
                    batch.clear()
        finally:
            os.close(tfd)

    def _record_journals(self, tasks: List["InPlaceLayerTask"], tfd: int) -> None:
        """Every layer's journal before the whiteout wave changes anything: the copies written, one ``syncfs``,
        then one transaction for all of them.  A layer whose journal is recorded already (a resumed run) is
        left to read it back in its whiteout step."""
        journaled = set(self.store.journaled_layers())
        listed = self.store.all_whiteout_dirs()
        journals = []
        for task in tasks:
            if task.id not in journaled:
                rows = task.journal(listed.get(task.id, []))
                if rows is not None:
                    journals.append(rows)
        if journals:
            fsio.syncfs(tfd)
            self.store.record_journals(journals)

    def _scan(self, layer_ids: List[str], jobs: int) -> Dict[str, overlay.StepResult]:
        """Walk the layers still to move, read-only, in ``jobs`` processes: ``{id: what the walk found}``."""
        p = self.paths
        known = {i: self.surveys[i] for i in layer_ids if i in self.surveys}
        layer_ids = [i for i in layer_ids if i not in known]
        where = [inplace.diff_location(p.aufs_diff, p.temp_tree, i) for i in layer_ids]
        self.store.close()  # no pooled connection may cross the fork; the engine reconnects when needed
        results = survey.scan_layers(where, [False] * len(where), jobs, initializer=_worker_start)
        return {**known, **dict(zip(layer_ids, results))}

    def missing_layers(self) -> List[str]:
        """In-place strategy: layers whose data is nowhere (an engine removed them after completion)."""
        p = self.paths
        if self.run_record.strategy != "inplace":
            return []
        return [r.id for r in self.store.layers()
                if not fsio.lexists(os.path.join(p.aufs_diff, r.id))
                and not fsio.lexists(inplace.moved_location((p.temp_tree, p.tree), r.id))]

    def all_layers_committed(self) -> bool:
        states = self.store.layer_states()
        return set(states) <= {"committed"}

    # -- switching --------------------------------------------------------------------------------------

    def switch_to_overlay2(self) -> None:
        """Stage the image store, switch containers, then rename the layer tree and the image store in.

        Order: (1) ``image/overlay2.temp`` copied and synced, recorded as staged; (2) each container's config
        rewritten atomically (its original bytes are in the database since discovery); (3)
        ``overlay2.temp`` → ``overlay2``; (4) ``image/overlay2.temp`` → ``image/overlay2``.  Each is
        idempotent and detectable from the tree, so a cut anywhere resumes; rollback undoes all four.
        """
        p = self.paths
        run = self.store.run()
        if not run.image_staged:
            if images.is_dir(p.image_aufs):
                n = images.stage_copy(p.image_aufs, p.image_stage)
                self.progress(f"image store staged ({n} entries)")
            self.store.set_image_staged(True)
        for record in self.store.containers():
            if record.state == "pending":
                containers.switch(p.root, record.id, record.original, record.mode, record.uid, record.gid)
                self.store.set_container_state(record.id, "switched")
                self.progress(f"container {record.id} switched to overlay2")
        config = engineconfig.switch(p)
        if config:
            self.progress(f"engine config {config}: storage-driver overlay2")
        if fsio.lexists(p.temp_tree):
            if fsio.lexists(p.tree):
                raise MigratorError(f"both {p.temp_tree} and {p.tree} exist; refusing to guess which is right")
            fsio.rename_durable(p.root, os.path.basename(p.temp_tree), os.path.basename(p.tree))
        if fsio.lexists(p.image_stage):
            fsio.rename_durable(p.image_dir, os.path.basename(p.image_stage), os.path.basename(p.image_overlay2))

    # -- rollback ---------------------------------------------------------------------------------------

    def undo_migration(self) -> None:
        """Restore every container config byte for byte, then remove everything the run created."""
        p = self.paths
        run = self.store.run()
        for record in self.store.containers():
            if record.original is not None and record.state in ("pending", "switched"):
                restored = containers.restore(p.root, record.id, record.original, record.mode, record.uid,
                                              record.gid, (record.atime_ns, record.mtime_ns))
                self.store.set_container_state(record.id, "restored" if restored else "gone")
                if not restored:
                    self.progress(f"container {record.id} was removed since the migration; not restored")
        config = engineconfig.restore(p)
        if config:
            self.progress(f"engine config {config} restored")
        if run.strategy == "inplace":
            self._move_layers_back()
        # overlay2/ and image/overlay2/ are this run's only once it reached switching (refused before).
        recovery.remove_new_trees(p, self.progress, final=run.rollback_from in ("switching", "completed"))
        restore_dir_times(p.root, self.store.saved_times())

    def _move_layers_back(self) -> None:
        """In-place strategy: undo each layer's journal and rename it back into ``aufs/diff``, then sync; only
        then may the new trees, now free of aufs data, be removed."""
        p = self.paths
        for record in reversed(self.store.layers()):
            rows, dirs = self.store.changes(record.id)
            changes, times = changes_from_rows(rows, dirs)
            diff = inplace.moved_location((p.temp_tree, p.tree), record.id)
            inplace.undo_layer(p.aufs_diff, diff, os.path.join(p.stash, record.id), record.id, changes, times,
                               (record.atime_ns, record.mtime_ns), self.progress)
        recovery.sync_moved_back(p)

    # -- cleanup ----------------------------------------------------------------------------------------

    def remove_aufs_data(self) -> None:
        """Move ``aufs/`` and ``image/aufs/`` into the work area (atomic, so no engine sees half of them),
        then delete them there."""
        p = self.paths
        trash = os.path.join(p.workdir, "trash")
        os.makedirs(trash, mode=0o700, exist_ok=True)
        for parent, name, dest in ((p.root, "aufs", "aufs"), (p.image_dir, "aufs", "image-aufs")):
            if fsio.lexists(os.path.join(parent, name)):
                fsio.remove_tree(os.path.join(trash, dest))
                os.rename(os.path.join(parent, name), os.path.join(trash, dest))
                fsio.fsync_path(parent)
                fsio.fsync_path(trash)
        self.progress("removing the aufs data")
        fsio.ensure_absent_durably(p.workdir, "trash")

    # -- recording --------------------------------------------------------------------------------------

    def record_phase(self) -> None:
        rollback_from = None
        if self.state == "rolling-back":
            rollback_from = self.store.run().phase
        self.store.set_phase(self.state, rollback_from=rollback_from)
        self.progress(f"phase: {self.state}")


def default_progress(quiet: bool, log_file: Optional[str] = None) -> Progress:
    return Reporter(quiet, log_file)


def discovered_records(layers, parents, containers_found, findings):
    """Rows for a new run: link ids chosen once here, persisted, so a resumed run writes the same tree."""
    from migrator.linkid import new_link_ids

    link_ids = new_link_ids(len(layers))
    layer_rows = [
        LayerRecord(id=layer.id, seq=i, parent=layer.parent, ancestors="\n".join(layer.ancestors),
                    link_id=link_ids[i], has_child=layer.id in parents, writable=layer.writable,
                    atime_ns=layer.times[0], mtime_ns=layer.times[1], state="discovered")
        for i, layer in enumerate(layers)
    ]
    container_rows = [
        ContainerRecord(id=c.id, state=c.state, original=c.original, note=c.note,
                        mode=(c.st.st_mode & 0o7777) if c.st else 0o600,
                        uid=c.st.st_uid if c.st else 0, gid=c.st.st_gid if c.st else 0,
                        atime_ns=c.st.st_atime_ns if c.st else 0, mtime_ns=c.st.st_mtime_ns if c.st else 0)
        for c in containers_found
    ]
    finding_rows = [FindingRecord(layer_id=None, kind=k, detail=d) for k, d in findings]
    return layer_rows, container_rows, finding_rows


def dirs_whose_times_change(root: str, container_ids: List[str]) -> List[SavedTimeRecord]:
    """The run adds or renames entries in these directories: keep their times so rollback can put them back."""
    rows = []
    dirs = [".", "image", os.path.join("aufs", "diff")] + [os.path.join("containers", c) for c in container_ids]
    for rel in dirs:
        try:
            st = os.lstat(os.path.join(root, rel))
        except FileNotFoundError:
            continue
        rows.append(SavedTimeRecord(path=rel, atime_ns=st.st_atime_ns, mtime_ns=st.st_mtime_ns))
    return rows


def restore_dir_times(root: str, rows: List[SavedTimeRecord]) -> None:
    for row in rows:
        path = os.path.join(root, row.path)
        if os.path.isdir(path) and not os.path.islink(path):
            os.utime(path, ns=(row.atime_ns, row.mtime_ns), follow_symlinks=False)
            fsio.fsync_path(path)
