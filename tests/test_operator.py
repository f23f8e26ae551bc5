"""What an operator sees: plan, progress (terminal and not), the log file, status, verify, the engine config,
and the docs: their commands run as written, every error message explained, the systemd unit valid."""

import fcntl
import json
import os
import pty
import re
import shlex
import struct
import subprocess
import sys
import termios

import pytest

from tests import benchmark
from tests.conftest import STRATEGIES, cli, needs_root, run_args
from tests.support.errorcatalog import exit_codes, finding_kinds, messages
from tests.support.loopfs import LoopFS, can_loop
from tests.support.manifest import manifest
from tests.support.rootstate import whole_root

# No pytestmark: the tests on the sample root need root through their fixture (``ROOT_FIXTURES`` in conftest.py),
# those that build their own root say so (``@needs_root``), and the docs' tests run as any user.
DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
STAMP = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00 "


def in_terminal(*args, columns=0):
    """Run the CLI with a pseudo-terminal (``columns`` wide; 0: its size unknown) as its stdout and stderr;
    return (exit code, output)."""
    pid, fd = pty.fork()
    if pid == 0:
        if columns:
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        os.execvp(sys.executable, [sys.executable, "-m", "migrator", *args])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(fd)
    _pid, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


# -- plan -------------------------------------------------------------------------------------------------------


def test_plan_changes_nothing_and_says_yes(sample_root):
    before = whole_root(sample_root)
    res = cli("plan", "--root", sample_root, "--engine-pidfile", "/nonexistent")
    assert res.returncode == 0, res.stderr
    for label in ("engine root:", "strategy:       hardlink", "engine running: no", "images:         2",
                  "layers:         6", "containers:     1 to switch", "whiteouts", "needs:", "free:",
                  "overlay probe:  d_type yes, trusted.* xattrs yes, whiteout devices yes, mount yes",
                  "verdict:        yes"):
        assert label in res.stdout, res.stdout
    assert whole_root(sample_root) == before  # the probe's directory is gone and the root's times are back
    assert not os.path.exists(os.path.join(sample_root, ".aufs2overlay"))


def test_plan_json_schema(sample_root):
    res = cli("plan", "--root", sample_root, "--engine-pidfile", "/nonexistent", "--json", "--strategy", "inplace")
    doc = json.loads(res.stdout)
    assert res.returncode == 0
    assert set(doc) >= {"root", "strategy", "engine", "engine_reason", "images", "layers", "containers",
                        "deepest_chain", "entries", "directories", "whiteouts", "opaque_directories", "need",
                        "free", "overlay", "engine_running", "findings", "problems", "verdict"}
    assert doc["strategy"] == "inplace" and doc["verdict"] == "yes" and doc["layers"] == 6
    assert doc["deepest_chain"] == 5 and doc["whiteouts"] > 0 and doc["overlay"]["mount"] is True
    assert {f["kind"] for f in doc["findings"]} >= {"skipped-removing-layer"}


def test_plan_says_no_and_run_refuses_when_an_engine_runs(sample_root, tmp_path):
    fake = tmp_path / "dockerd"
    subprocess.run(["cp", "/bin/sleep", str(fake)], check=True)
    proc = subprocess.Popen([str(fake), "30"])
    try:
        pidfile = tmp_path / "docker.pid"
        pidfile.write_text(str(proc.pid))
        res = cli("plan", "--root", sample_root, "--engine-pidfile", str(pidfile))
        assert res.returncode == 3
        assert "engine running: yes" in res.stdout and "problem:        an engine is using" in res.stdout
        assert "verdict:        no" in res.stdout
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(can_loop() is not None, reason=str(can_loop()))
def test_plan_says_no_for_too_few_inodes_and_run_refuses(template, tmp_path):
    disk = LoopFS.create(str(tmp_path), size_mb=16, inodes=1024)
    try:
        root = os.path.join(disk.mountpoint, "docker")
        subprocess.run(["cp", "-a", template, root], check=True)
        before = whole_root(root)
        filler = os.path.join(disk.mountpoint, "filler")
        os.mkdir(filler)
        i = 0
        while os.statvfs(root).f_ffree > 120:
            open(os.path.join(filler, str(i)), "wb").close()
            i += 1
        res = cli("plan", "--root", root, "--engine-pidfile", "/nonexistent")
        assert res.returncode == 3 and "not enough free inodes" in res.stdout and "inplace" in res.stdout
        res = cli(*run_args(root))
        assert res.returncode == 3 and "not enough free inodes" in res.stderr and "'aufs2overlay plan'" in res.stderr
        assert whole_root(root) == before
        # The in-place strategy fits where the hardlink one does not.
        assert cli("plan", "--root", root, "--engine-pidfile", "/nonexistent", "--strategy", "inplace").returncode == 0
        cli(*run_args(root, strategy="inplace"), check=0)
    finally:
        disk.destroy()


@needs_root
@pytest.mark.skipif(can_loop() is not None, reason=str(can_loop()))
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plan_estimates_match_a_measured_run(tmp_path, strategy):
    """plan's inodes and bytes against statvfs before and after run on the same root: within 10%."""
    from migrator import sample

    disk = LoopFS.create(str(tmp_path), size_mb=64)
    try:
        root = os.path.join(disk.mountpoint, "docker")
        sample.build_sample_root(root)
        layer = "f" * 64  # one more image layer with a few hundred directories and three thousand files
        benchmark.generated_layer(os.path.join(root, "aufs", "diff", layer), 3000, 7, ["/etc/motd"],
                                  ["/usr/share/zoneinfo"])
        open(os.path.join(root, "aufs", "layers", layer), "w").close()
        res = cli("plan", "--root", root, "--engine-pidfile", "/nonexistent", "--json", "--strategy", strategy)
        need = json.loads(res.stdout)["need"]
        os.sync()
        before = os.statvfs(root)
        cli(*run_args(root, strategy=strategy), check=0)
        os.sync()
        after = os.statvfs(root)
        inodes = before.f_ffree - after.f_ffree
        used = (before.f_bfree - after.f_bfree) * before.f_frsize
        assert abs(need["inodes"] - inodes) <= 0.1 * inodes, (need, inodes)
        assert abs(need["bytes"] - used) <= 0.1 * used, (need, used)
    finally:
        disk.destroy()


# -- progress, log file ------------------------------------------------------------------------------------------


def test_run_without_a_terminal_prints_a_numbered_line_per_layer(sample_root, tmp_path):
    """A serial console or journald gets one line per layer committed, numbered N/M (the log file every
    step); a resumed run says so."""
    log = str(tmp_path / "a2o.log")
    res = cli("run", "--root", sample_root, "--engine-pidfile", "/nonexistent", "--log-file", log)
    assert res.returncode == 0
    lines = res.stderr.splitlines()
    assert all(line.startswith("aufs2overlay: ") for line in lines)
    assert "\r" not in res.stderr and "\033" not in res.stderr
    layers = [x for x in lines if " layer " in x]
    assert [re.match(r"aufs2overlay: layer [0-9a-f]{64}(-init)? committed \((\d)/6, \d+ entries\)$", x).group(2)
            for x in layers] == [str(n) for n in range(1, 7)], lines
    assert "resuming" not in res.stderr
    assert re.search(r"aufs2overlay: done in [\d.]+s: 6 layers, \d+ entries", res.stderr)
    assert res.stdout.startswith("migration of ")
    with open(log) as f:
        logged = f.read()
    for state in ("linked", "whiteouts-converted", "lowers-written", "committed"):
        assert len(re.findall(rf" layer \S+ {state} \(", logged)) == 6, state


def test_a_resumed_run_says_where_it_resumes(template, reference, tmp_path):
    root = str(tmp_path / "docker")
    subprocess.run(["cp", "-a", template, root], check=True)
    first_batch = reference["labels"].index("recorded layers committed") + 1
    res = cli(*run_args(root, strategy=reference["strategy"]), env={"AUFS2OVERLAY_KILL_AT": str(first_batch)})
    assert res.returncode == -9
    res = cli("run", "--root", root, "--engine-pidfile", "/nonexistent", check=0)
    assert "aufs2overlay: resuming the migration (converting): 1 of 6 layers committed" in res.stderr, res.stderr


@needs_root
def test_thousands_of_layers_without_a_terminal_stay_under_a_line_per_layer(tmp_path):
    """3,000 layers: at most one line per layer (numbered), a summary now and then, the final lines there."""
    from tests.support.smallroot import SmallRoot

    ids = [f"{n:064x}" for n in range(3000)]
    SmallRoot(str(tmp_path / "docker"), {lid: ids[i - i % 20:i][::-1] for i, lid in enumerate(ids)})
    res = cli("run", "--root", str(tmp_path / "docker"), "--engine-pidfile", "/nonexistent", check=0)
    lines = res.stderr.splitlines()
    assert len(lines) < 4000, len(lines)
    numbered = [int(m.group(1)) for m in map(re.compile(r".* committed \((\d+)/3000, ").match, lines) if m]
    assert numbered == list(range(1, 3001))
    assert lines[-1].startswith("aufs2overlay: done in ") and "3000 layers" in lines[-1]
    assert res.stdout.startswith("migration of ")


def test_quiet_run_prints_only_the_result(sample_root):
    res = cli("run", "--root", sample_root, "--engine-pidfile", "/nonexistent", "-q")
    assert res.returncode == 0 and res.stderr == "" and "completed" in res.stdout


def test_run_on_a_terminal_shows_a_bar(sample_root):
    code, out = in_terminal("run", "--root", sample_root, "--engine-pidfile", "/nonexistent", "--strategy",
                            "inplace")
    assert code == 0, out
    bars = re.findall(r"\[([#-]{24})\] (\d+)/6 layers +[\d,]+ files/s +ETA [\d-]+:[\d-]{2} +\S+ \S+", out)
    assert bars and bars[-1][1] == "6" and bars[-1][0] == "#" * 24, out
    assert "\r\033[K" in out
    assert "aufs2overlay: layer" not in out  # steps go to the bar, not to lines
    assert "phase: completed" in out and "migration of" in out


def test_the_bar_is_cut_to_the_terminals_width(sample_root):
    """A bar wider than the terminal wraps, and each redraw then leaves a stale line behind."""
    code, out = in_terminal("run", "--root", sample_root, "--engine-pidfile", "/nonexistent", "--strategy",
                            "inplace", columns=50)
    assert code == 0, out
    bars = [part.split("\r")[0].split("\n")[0] for part in out.split("\r\033[K")[1:]]
    drawn = [b for b in bars if b.startswith("[")]
    assert drawn and max(len(b) for b in drawn) <= 49, drawn


def test_log_file_keeps_every_step_and_the_error(sample_root, tmp_path):
    log = str(tmp_path / "a2o.log")
    res = cli("cleanup", "--root", sample_root, "--engine-pidfile", "/nonexistent", "--log-file", log)
    assert res.returncode == 3
    cli(*run_args(sample_root, "--log-file", log), check=0)
    with open(log) as f:
        lines = f.read().splitlines()
    assert all(re.match(STAMP, line) for line in lines), lines
    assert "error: no migration state at" in lines[0]  # kept, and appended to
    for state in ("linked", "whiteouts-converted", "lowers-written", "committed"):
        assert sum(bool(re.search(rf" layer \S+ {state} \(", x)) for x in lines) == 6
    assert any("phase: completed" in x for x in lines) and any(" done in " in x for x in lines)
    assert oct(os.stat(log).st_mode & 0o777) == "0o600"


# -- status, verify ---------------------------------------------------------------------------------------------


def test_status_table_and_exit_codes(sample_root):
    def status():
        return cli("status", "--root", sample_root)

    res = status()
    assert res.returncode == 0 and "not-started" in res.stdout
    killed = cli(*run_args(sample_root), env={"AUFS2OVERLAY_KILL_AT": "30"})
    assert killed.returncode < 0
    res = status()
    assert res.returncode == 5
    for label in ("phase:      converting", "layers:     6 (", "containers: ", "next:       run 'aufs2overlay run'"):
        assert label in res.stdout, res.stdout
    code, out = in_terminal("status", "--root", sample_root)
    assert code == 5 and "phase:      converting" in out
    doc = json.loads(cli("status", "--root", sample_root, "--json").stdout)
    assert doc["phase"] == "converting" and len(doc["layers"]) == 6
    cli(*run_args(sample_root), check=0)
    assert status().returncode == 0 and "phase:      completed" in status().stdout
    cli("rollback", "--root", sample_root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
    res = status()
    assert res.returncode == 6 and "rolled-back" in res.stdout


def test_verify_reports_differences_with_the_aufs_view(sample_root):
    cli(*run_args(sample_root), check=0)
    res = cli("verify", "--root", sample_root)
    assert res.returncode == 0 and res.stdout.strip() == "verify: ok"
    devices = subprocess.run(["find", os.path.join(sample_root, "overlay2"), "-type", "c", "-name", "passwd"],
                             capture_output=True, text=True, check=True).stdout.split()
    os.unlink(devices[0])  # a whiteout lost: the lower file shows through
    res = cli("verify", "--root", sample_root)
    assert res.returncode == 1
    assert "shown by overlay2, not by aufs" in res.stdout and re.search(r"verify: \d+ problem", res.stdout)


# -- engine config ----------------------------------------------------------------------------------------------


def test_set_engine_config_is_switched_and_rolled_back(sample_root, tmp_path):
    etc = tmp_path / "etc-docker"
    etc.mkdir()
    config = etc / "daemon.json"
    original = b'{"storage-driver": "aufs", "log-level": "warn"}\n'
    config.write_bytes(original)
    os.chmod(config, 0o640)
    os.utime(config, ns=(1_000_000_000, 2_000_000_000))
    before = manifest(str(etc))
    cli(*run_args(sample_root, "--set-engine-config", str(config)), check=0)
    doc = json.loads(config.read_bytes())
    assert doc == {"storage-driver": "overlay2", "log-level": "warn"}
    cli("rollback", "--root", sample_root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
    assert config.read_bytes() == original and manifest(str(etc)) == before
    # Absent before: created by the switch, removed by the rollback.
    absent = etc / "new.json"
    cli(*run_args(sample_root, "--set-engine-config", str(absent)), check=0)
    assert json.loads(absent.read_bytes()) == {"storage-driver": "overlay2"}
    cli("rollback", "--root", sample_root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
    assert not absent.exists()


def test_unusable_engine_config_is_refused_before_anything(sample_root, tmp_path):
    config = tmp_path / "daemon.json"
    config.write_bytes(b"{not json")
    before = whole_root(sample_root)
    res = cli(*run_args(sample_root, "--set-engine-config", str(config)))
    assert res.returncode == 3 and "is not valid JSON" in res.stderr
    assert whole_root(sample_root) == before


# -- docs -------------------------------------------------------------------------------------------------------


def guide_blocks():
    with open(os.path.join(DOCS, "operator-guide.md")) as f:
        return re.findall(r"```sh\n(.*?)```", f.read(), re.S)


def test_the_operator_guide_runs_as_written(sample_root, tmp_path):
    blocks = guide_blocks()
    assert len(blocks) >= 5
    # the console script of the Python running the tests (a venv's bin/ need not be on PATH)
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    env = dict(os.environ, ROOT=sample_root, LOG=str(tmp_path / "guide.log"), PATH=path)
    for block in blocks:
        res = subprocess.run(["bash", "-e", "-c", block], env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"{block}\nexit {res.returncode}\n{res.stdout}\n{res.stderr}"
    assert sorted(os.listdir(sample_root)) == [".aufs2overlay", "containers", "image", "overlay2"]  # the record
    assert os.path.getsize(env["LOG"]) > 0


def test_operations_names_every_finding_kind_and_exit_code():
    with open(os.path.join(DOCS, "operations.md")) as f:
        doc = f.read()
    kinds = finding_kinds()
    assert len({kind for _f, _l, kind in kinds}) >= 15
    missing = [f"{file}:{line}: {kind}" for file, line, kind in kinds if f"`{kind}`" not in doc]
    assert not missing, missing
    table = doc.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    codes = {int(c) for row in re.findall(r"^\| ([\d, ]+) \|", table, re.M) for c in row.split(",")}
    assert {value for _name, value in exit_codes()} | {129, 130, 143} <= codes, codes


def test_troubleshooting_quotes_every_message():
    with open(os.path.join(DOCS, "troubleshooting.md")) as f:
        doc = f.read()
    found = messages()
    assert len(found) >= 60
    missing = [f"{file}:{line}: {text}" for file, line, text in found if text not in doc]
    assert not missing, missing


def test_the_systemd_unit_is_the_documented_one_and_its_command_parses():
    from migrator.cli import _parser
    from migrator.options import Options

    with open(os.path.join(DOCS, "aufs2overlay.service")) as f:
        unit = f.read()
    with open(os.path.join(DOCS, "operator-guide.md")) as f:
        assert unit.strip() in f.read()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    argv = shlex.split(exec_start)
    assert os.path.basename(argv[0]) == "aufs2overlay"
    args = _parser().parse_args(argv[1:])
    opts = Options.from_args(args)
    assert args.command == "run" and opts.log_file and opts.engine_config and opts.skip_if_rolled_back
    assert re.search(r"^Before=.*docker\.service", unit, re.M)
    assert re.search(r"^RequiredBy=docker\.service balena-engine\.service$", unit, re.M)
    assert "Environment=TMPDIR=/var/tmp" in unit and re.search(r"^RequiresMountsFor=/var/lib/docker ", unit, re.M)



def test_the_boot_unit_leaves_a_rolled_back_root_alone(sample_root):
    """`run --skip-if-rolled-back` (the unit's): after an operator's rollback the next boot does not migrate
    again; a root never migrated is migrated; `run` by hand still migrates the rolled-back one."""
    cli(*run_args(sample_root, "--skip-if-rolled-back"), check=0)
    cli("rollback", "--root", sample_root, "--engine-pidfile", "/nonexistent", "--force", "-q", check=0)
    before = whole_root(sample_root)
    res = cli(*run_args(sample_root, "--skip-if-rolled-back"), check=0)
    assert "was rolled back; not migrating again" in res.stdout
    assert whole_root(sample_root) == before
    assert cli("status", "--root", sample_root).returncode == 6
    cli(*run_args(sample_root), check=0)
    assert cli("status", "--root", sample_root).returncode == 0
