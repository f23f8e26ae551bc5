"""The wave runner's order and records, with a fake strategy, and the state store on its own, as any user.

The runner (``migrator/strategies/runner.py``) is driven with a strategy whose two layer steps only note what
they were asked and make the layer's ``diff/``; the steps every strategy shares write overlay2's files for real,
and the store is a real state database.  What it must keep: batches of 1, 2, 4, … in the recorded order
(parents before children), in each batch one wave per state, then one ``syncfs``, then one transaction; a
resumed run takes each layer on from its recorded state; a failed step records its error and nothing of its
batch.
"""

import os
import sqlite3
import types

import pytest

from migrations_state import reader
from migrations_state.errors import StateDatabaseError
from migrations_state.machine import COMMITTED, DISCOVERED, LINKED, LOWERS_WRITTEN, WHITEOUTS_CONVERTED
from migrations_state.schema import SCHEMA_VERSION, ContainerRecord, FindingRecord, LayerRecord
from migrations_state.store import LayerStep, Store
from migrator.fs import fsio
from migrator.paths import Paths
from migrator.scan.findings import StepResult
from migrator.strategies import runner
from migrator.strategies.base import Conversion, LayerTask, Strategy

# -- batches --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,sizes", [(0, []), (1, [1]), (2, [1, 1]), (3, [1, 2]), (7, [1, 2, 4]),
                                     (8, [1, 2, 4, 1]), (20, [1, 2, 4, 8, 5]),
                                     (1500, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 477])])
def test_batches_double_up_to_the_wave_limit_in_order(n, sizes):
    pending = list(range(n))
    got = list(runner.batches(pending))
    assert [len(b) for b in got] == sizes
    assert [x for b in got for x in b] == pending
    assert runner.WAVE_LAYERS == 512


@pytest.mark.parametrize("n,first,sizes", [(2, 512, [2]), (20, 512, [20]), (1500, 512, [512, 512, 476]),
                                           (20, 3, [3, 6, 11]), (5, 0, [1, 2, 2]), (600, 5000, [512, 88])])
def test_a_first_batch_of_another_size(n, first, sizes):
    """The cutover's layers left go in one batch (``first``), never more than the wave limit."""
    got = list(runner.batches(list(range(n)), first))
    assert [len(b) for b in got] == sizes and [x for b in got for x in b] == list(range(n))


def test_thousands_of_layers_go_in_batches_of_the_wave_limit():
    got = [len(b) for b in runner.batches(list(range(5000)))]
    assert got[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512] and set(got[10:-1]) == {512}
    assert sum(got) == 5000 and 0 < got[-1] <= 512


# -- the runner, with a fake strategy ------------------------------------------------------------------------

def _ids(n):
    return [f"{i:02d}" + "a" * 62 for i in range(n)]


def _link_id(i):
    return f"{'L' * 24}{i:02d}"


def _records(n, states=None):
    """A chain of ``n`` layers, each on the one before (the store's order is discovery's: parents first)."""
    ids = _ids(n)
    return [LayerRecord(id=lid, seq=i, parent=ids[i - 1] if i else None, ancestors="\n".join(reversed(ids[:i])),
                        link_id=_link_id(i), has_child=i < n - 1, state=(states or {}).get(lid, DISCOVERED))
            for i, lid in enumerate(ids)]


class Noting(LayerTask):
    """The two strategy steps: note the call, make the layer's ``diff/`` (where overlay2's ``l/`` link points),
    report entries and one whiteout directory (link) or one finding (whiteouts)."""

    events = None  # the test's list
    fail = None  # (layer id, step) to raise an OSError at

    def _note(self, what, *more):
        if self.fail == (self.id, what):
            raise OSError(28, "No space left on device")
        self.events.append((what, self.id) + more)

    def build_tree(self):
        self._note("link")
        os.makedirs(os.path.join(self.paths.temp_tree, self.id, "diff"), exist_ok=True)
        self.result = StepResult(entries=int(self.id[:2]) + 10, whiteout_dirs=[b"/in-" + self.id[:2].encode()])

    def convert_whiteouts_in_tree(self):
        self._note("whiteouts", list(self.whiteout_dirs))
        self.result = StepResult(findings=[("whiteout-hides-nothing", "/" + self.id[:2])])

    def write_lower_files(self):
        self._note("lowers")
        super().write_lower_files()

    def write_committed_marker(self):
        self._note("commit")
        super().write_committed_marker()


class Noted(Strategy):
    task_class = Noting
    pooled_triggers = frozenset()

    def task(self, record, conv, ancestor_links):
        return Noting(record, conv.paths, ancestor_links)

    def before_wave(self, conv, trigger, tasks):
        Noting.events.append(("before", trigger, tuple(t.id for t in tasks)))


class Progress:
    def __init__(self):
        self.started = None
        self.steps = []

    def start(self, layers, entries, done_layers=0, done_entries=0):
        self.started = (layers, done_layers)

    def step(self, layer_id, state, entries, seconds):
        self.steps.append((layer_id, state))


@pytest.fixture
def waves(tmp_path, monkeypatch):
    """``waves.run(records, fail=None, steps=())``: the runner over a new store holding ``records`` (then
    ``steps`` recorded, as an earlier run would have); ``waves.events``: each step, each wave's start, each
    ``syncfs`` and each record, in order; ``waves.paths``."""
    root = tmp_path / "docker"
    root.mkdir()
    paths = Paths.for_root(str(root))
    events = []
    monkeypatch.setattr(Noting, "events", events)
    monkeypatch.setattr(fsio, "syncfs", lambda fd: events.append(("syncfs",)))  # the order is the point here

    def run(records, fail=None, steps=()):
        os.makedirs(paths.workdir, exist_ok=True)
        store = Store.create(paths.state_db, paths.root, "noted", records, [], [])
        if steps:
            store.set_layer_states(list(steps))
        real = store.set_layer_states
        monkeypatch.setattr(store, "set_layer_states", lambda s: (events.append(
            ("record", tuple((x.layer_id, x.state) for x in s))), real(s)))
        monkeypatch.setattr(Noting, "fail", fail)
        conv = Conversion(paths=paths, store=store, progress=Progress(), jobs=1)
        try:
            runner.WaveRunner(Noted(), conv).run()
        finally:
            store.close()

    return types.SimpleNamespace(run=run, events=events, paths=paths)


STEPS = ("link", "whiteouts", "lowers", "commit")


def _steps(events, lid=None):
    return [e[:2] for e in events if e[0] in STEPS and (lid is None or e[1] == lid)]


def _batches_of(events):
    """The events up to each record, and those after the last."""
    out, current = [], []
    for e in events:
        current.append(e)
        if e[0] == "record":
            out.append(current)
            current = []
    return out, current


def test_waves_go_parents_first_in_growing_batches_each_synced_then_recorded_once(waves):
    ids = _ids(11)
    waves.run(_records(11))
    batches, after = _batches_of(waves.events)
    assert not after
    assert [[lid for lid, _s in b[-1][1]] for b in batches] == [ids[:1], ids[1:3], ids[3:7], ids[7:11]]
    for batch in batches:
        layers = [lid for lid, _s in batch[-1][1]]
        assert {s for _lid, s in batch[-1][1]} == {COMMITTED}  # one record: each layer's last state
        assert batch[-2] == ("syncfs",) and sum(e == ("syncfs",) for e in batch) == 1  # synced, then recorded
        # one wave per state: every layer of the batch takes a step before any takes the next, in order
        assert _steps(batch) == [(what, lid) for what in STEPS for lid in layers]
        assert [e[1] for e in batch if e[0] == "before"] == ["link", "convert_whiteouts", "write_lowers", "commit"]
    tree = waves.paths.temp_tree  # the layers' own files, by the shared steps: the ancestors' links, nearest first
    for i, lid in enumerate(ids):
        with open(os.path.join(tree, lid, "link")) as f:
            assert f.read() == _link_id(i)
        lower = os.path.join(tree, lid, "lower")
        if i:
            with open(lower) as f:
                assert f.read() == ":".join(f"l/{_link_id(j)}" for j in reversed(range(i)))
        else:
            assert not os.path.exists(lower)
        assert os.path.exists(os.path.join(tree, lid, "committed")) == (i < 10)  # the layers with a child
        assert os.readlink(os.path.join(tree, "l", _link_id(i))) == f"../{lid}/diff"
    store = Store(waves.paths.state_db)  # what the steps found; the whiteout step got the link step's list
    try:
        assert [(r.id, r.state, r.entries) for r in store.layers()] == [
            (lid, COMMITTED, i + 10) for i, lid in enumerate(ids)]
        assert store.all_whiteout_dirs() == {lid: [b"/in-%02d" % i] for i, lid in enumerate(ids)}
        assert [(f.layer_id, f.kind) for f in store.findings()] == [(lid, "whiteout-hides-nothing") for lid in ids]
    finally:
        store.close()
    assert [e[2] for e in waves.events if e[0] == "whiteouts"] == [[b"/in-%02d" % i] for i in range(11)]


def test_a_resumed_run_takes_each_layer_on_from_its_recorded_state(waves):
    ids = _ids(6)
    done = {ids[0]: COMMITTED, ids[1]: LOWERS_WRITTEN, ids[2]: WHITEOUTS_CONVERTED, ids[3]: LINKED}
    for lid in done:  # what their link steps left
        os.makedirs(os.path.join(waves.paths.temp_tree, lid, "diff"))
    # the layer recorded linked had its whiteout directories recorded with it
    waves.run(_records(6, done), steps=[LayerStep(ids[3], LINKED, entries=5, whiteout_dirs=[b"/early"])])
    events = waves.events
    assert _steps(events, ids[0]) == []
    assert _steps(events, ids[1]) == [("commit", ids[1])]
    assert _steps(events, ids[2]) == [("lowers", ids[2]), ("commit", ids[2])]
    assert _steps(events, ids[3]) == [(w, ids[3]) for w in STEPS[1:]]
    assert ("whiteouts", ids[3], [b"/early"]) in events  # read back from the store
    assert [s for s in _steps(events) if s[1] in ids[4:]] == [(w, lid) for w in STEPS for lid in ids[4:]]
    assert [[lid for lid, _s in e[1]] for e in events if e[0] == "record"] == [ids[1:2], ids[2:4], ids[4:6]]
    store = Store(waves.paths.state_db)
    try:
        assert {r.state for r in store.layers()} == {COMMITTED}
        assert store.layers()[3].entries == 5  # the link step's count stays when later steps record none
    finally:
        store.close()


def test_a_failed_step_records_its_error_and_nothing_of_its_batch(waves):
    """Layer 4 (the second of the third batch, layers 3 to 6) fails its whiteout step: the first two batches
    stay recorded, the failed layer's row has the error, and no layer of its batch moved on in the store, though
    their link steps were done (and are done again by the next run)."""
    ids = _ids(7)
    with pytest.raises(OSError, match="No space left"):
        waves.run(_records(7), fail=(ids[4], "whiteouts"))
    assert [[lid for lid, _s in e[1]] for e in waves.events if e[0] == "record"] == [ids[:1], ids[1:3]]
    assert ("whiteouts", ids[3], [b"/in-03"]) in waves.events and ("whiteouts", ids[5]) not in [
        e[:2] for e in waves.events]
    _done, after = _batches_of(waves.events)
    assert ("syncfs",) not in after and after[-1][:2] == ("whiteouts", ids[3])  # stopped in its batch's wave
    doc = reader.read_status(waves.paths.state_db)
    assert [(lid, state) for lid, state, _n, _e in doc["layers"]] == [
        (lid, COMMITTED if i < 3 else DISCOVERED) for i, lid in enumerate(ids)]
    errors = {lid: error for lid, _s, _n, error in doc["layers"] if error}
    assert errors == {ids[4]: "linked: [Errno 28] No space left on device"}


# -- the store ------------------------------------------------------------------------------------------------

def _layers(n=2):
    return [LayerRecord(id=f"l{i}", seq=i, parent=f"l{i - 1}" if i else None, ancestors=f"l{i - 1}" if i else "",
                        link_id=f"{'A' * 25}{i}", has_child=i < n - 1, state=DISCOVERED) for i in range(n)]


def _created(tmp_path, labels=None, **kw):
    hook = labels.append if labels is not None else (lambda _label: None)
    return Store.create(str(tmp_path / "state.db"), "/root", "hardlink", kw.get("layers", _layers()),
                        kw.get("containers", [ContainerRecord(id="c", state="pending", original=b'{"Driver":"aufs"}')]),
                        [FindingRecord(layer_id=None, kind="skipped-unexpected-file", detail="aufs/diff/README")],
                        on_recorded=hook)


def test_a_new_database_replaces_a_half_built_one_and_exists_only_whole(tmp_path):
    db = tmp_path / "state.db"
    (tmp_path / "state.db.new").write_bytes(b"a creation cut off")
    (tmp_path / "state.db.new-journal").write_bytes(b"its journal")
    labels = []
    store = _created(tmp_path, labels)
    store.close()
    assert sorted(os.listdir(tmp_path)) == ["state.db"] and labels == ["recorded discovery"]
    doc = reader.read_status(str(db))
    assert doc["run"]["phase"] == "converting" and doc["run"]["root"] == "/root"
    assert doc["layers"] == [("l0", DISCOVERED, 0, None), ("l1", DISCOVERED, 0, None)]
    assert doc["containers"] == [("c", "pending", None)]
    assert doc["findings"] == [("skipped-unexpected-file", None, "aufs/diff/README")]


def _sql(db, *statements):
    conn = sqlite3.connect(db)
    try:
        for statement in statements:
            conn.execute(statement)
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize("how,words", [
    ("missing", "no state database at"),
    ("newer schema", "has schema 99, this tool knows"),
    ("no run", "holds no migration"),
    ("not a database", "is unreadable"),
])
def test_what_is_not_a_database_of_this_tool_is_refused_naming_it(tmp_path, how, words):
    db = str(tmp_path / "state.db")
    if how == "not a database":
        (tmp_path / "state.db").write_bytes(b"\0" * 4096)
    elif how != "missing":
        _created(tmp_path).close()
        _sql(db, "UPDATE run SET schema_version = 99" if how == "newer schema" else "DELETE FROM run")
    with pytest.raises(StateDatabaseError) as caught:
        Store(db).close()
    assert words in str(caught.value) and db in str(caught.value)
    if how == "no run":
        with pytest.raises(StateDatabaseError, match="holds no migration"):
            reader.read_status(db)


def test_each_wave_records_states_counts_findings_and_directories(tmp_path):
    labels = []
    store = _created(tmp_path, labels)
    store.set_layer_states([LayerStep("l0", LINKED, entries=3, findings=[("k1", "/a")], whiteout_dirs=[b"/a", b""])])
    store.set_layer_error("l0", "linked: [Errno 5] Input/output error")  # its whiteout step failed
    store.set_layer_error("l1", "discovered: [Errno 28] No space left on device")  # its link step failed
    assert reader.read_status(store.path)["layers"] == [
        ("l0", LINKED, 3, "linked: [Errno 5] Input/output error"),
        ("l1", DISCOVERED, 0, "discovered: [Errno 28] No space left on device")]
    store.set_layer_states([LayerStep("l0", WHITEOUTS_CONVERTED, findings=[("k2", "/a/b"), ("k3", "/")]),
                            LayerStep("l1", LINKED, entries=0)])
    store.set_layer_states([])  # nothing to record: no transaction, no label
    doc = reader.read_status(store.path)
    # each error cleared by the step done since; a step that counts nothing leaves the link step's count
    assert doc["layers"] == [("l0", WHITEOUTS_CONVERTED, 3, None), ("l1", LINKED, 0, None)]
    assert doc["findings"][1:] == [("k1", "l0", "/a"), ("k2", "l0", "/a/b"), ("k3", "l0", "/")]
    assert store.all_whiteout_dirs() == {"l0": [b"/a", b""]}
    assert store.layer_states() == {WHITEOUTS_CONVERTED: 1, LINKED: 1}
    assert labels == ["recorded discovery", "recorded layers linked", "recorded layers whiteouts-converted"]
    store.close()


def test_a_phase_clears_the_last_error_and_keeps_where_a_rollback_began(tmp_path):
    store = _created(tmp_path)
    store.set_error("disk full")
    assert store.run().last_error == "disk full"
    store.set_phase("rolling-back", rollback_from="converting")
    run = store.run()
    assert (run.phase, run.last_error, run.rollback_from) == ("rolling-back", None, "converting")
    store.set_phase("rolled-back")
    assert (store.run().phase, store.run().rollback_from) == ("rolled-back", "converting")
    store.close()


def test_the_record_kept_after_cleanup_holds_what_happened_and_nothing_for_a_rollback(tmp_path):
    store = _created(tmp_path)
    store.set_layer_states([LayerStep("l0", LINKED, entries=3, findings=[("k", "/x")], whiteout_dirs=[b"/x"])])
    store.set_container_state("c", "switched")
    assert store.containers()[0].original == b'{"Driver":"aufs"}'
    store.keep_as_record()
    assert store.all_whiteout_dirs() == {}
    assert [(c.id, c.state, c.original) for c in store.containers()] == [("c", "switched", None)]
    assert [(r.id, r.state, r.entries) for r in store.layers()] == [("l0", LINKED, 3), ("l1", DISCOVERED, 0)]
    assert [(f.kind, f.detail) for f in store.findings()] == [("skipped-unexpected-file", "aufs/diff/README"),
                                                              ("k", "/x")]
    store.close()


def test_a_database_of_the_previous_schema_is_upgraded_keeping_every_state(tmp_path):
    store = _created(tmp_path)
    store.set_layer_states([LayerStep("l0", LINKED, entries=3)])
    store.close()
    db = store.path
    _sql(db, "ALTER TABLE run DROP COLUMN cutover_seconds", "ALTER TABLE layer DROP COLUMN proof_dirs",
         "ALTER TABLE layer DROP COLUMN proof", "UPDATE run SET schema_version = 2")
    assert reader.read_status(db)["run"]["cutover_seconds"] is None  # status reads it as it is
    labels = []
    store = Store(db, labels.append)
    assert labels == ["upgraded the state database from schema 2"]
    assert [(r.id, r.state, r.entries) for r in store.layers()] == [("l0", LINKED, 3), ("l1", DISCOVERED, 0)]
    store.set_cutover_seconds(1.5)
    store.close()
    doc = reader.read_status(db)
    assert doc["run"]["schema_version"] == SCHEMA_VERSION == 3 and doc["run"]["cutover_seconds"] == 1.5


def test_a_new_database_has_the_tables_schema_3_wrote(tmp_path):
    """The store writes with SQLAlchemy Core since the ORM's cost was measured (schema.py): a new database must
    still be the one the schema-3 release created, statement for statement (pinned in support/schema-3.sql),
    so a database an earlier release wrote and one this release writes are the same to both."""
    store = _created(tmp_path)
    store.close()
    conn = sqlite3.connect(store.path)
    try:
        made = [sql + ";" for _type, _name, sql in
                sorted(conn.execute("SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL"))]
    finally:
        conn.close()
    with open(os.path.join(os.path.dirname(__file__), "support", "schema-3.sql")) as f:
        pinned = "".join(line for line in f if not line.startswith("--")).split(";\n")
    assert made == [statement + ";" for statement in pinned if statement.strip()]


def test_each_record_holds_its_tables_columns():
    """A record's fields are its table's column keys, no more, no fewer: what the store inserts and reads back."""
    import dataclasses

    from migrations_state.schema import TABLE_OF

    for record, table in TABLE_OF.items():
        assert {f.name for f in dataclasses.fields(record)} == set(table.c.keys()), record.__name__
