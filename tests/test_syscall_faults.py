"""System-call faults: every kind of mutating call the migrator makes fails once, at its first, a middle and its
last invocation in a run of the sample root, for both strategies (``strace --inject``).

Each faulted run either stops with exactly one ``aufs2overlay: error:`` line and no traceback, or absorbs the
fault and leaves the same tree as an undisturbed run. A failed sync is never absorbed, with one documented
exception: SQLite ignores a failed ``fdatasync`` of the database's directory (docs/reliability.md; the
migrator itself never calls fdatasync, and its own fsync of that directory must not be absorbed). After every
faulted run, ``run`` resumes to the identical tree and ``rollback --force`` gives back the exact root.

The migrator runs with ``--jobs 1`` (every mutating call in one process: strace counts invocations per
process) and stops itself once its code is imported (``AUFS2OVERLAY_STOP_AT_START``), so the tracer attaches
to the command's work, not to the interpreter's start-up.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import WORKDIR, cli, needs_root
from tests.support.manifest import diff_manifests
from tests.support.rootstate import wait_stopped, whole_root
from tests.support.signature import tree_signature

pytestmark = [needs_root, pytest.mark.slow,
              pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace (apt-get install strace)")]

# kind (as docs/reliability.md names it): the system calls it covers, and the error injected
KINDS = {
    "mkdir(at)": (("mkdir", "mkdirat"), "ENOSPC"),
    "link(at)": (("link", "linkat"), "ENOSPC"),
    "rename*": (("rename", "renameat", "renameat2"), "EIO"),
    "unlink(at)": (("unlink", "unlinkat"), "EIO"),
    "symlink(at)": (("symlink", "symlinkat"), "ENOSPC"),
    "mknod(at)": (("mknod", "mknodat"), "ENOSPC"),
    "*setxattr": (("setxattr", "lsetxattr", "fsetxattr"), "ENOSPC"),
    "*chown*": (("chown", "fchown", "lchown", "fchownat"), "EIO"),
    "utimensat": (("utimensat",), "EIO"),
    "write": (("write",), "ENOSPC"),
    "pwrite64": (("pwrite64",), "ENOSPC"),
    "fsync": (("fsync",), "EIO"),
    "fdatasync": (("fdatasync",), "EIO"),
    "syncfs": (("syncfs",), "EIO"),
    "ftruncate": (("ftruncate",), "EIO"),
    "openat": (("openat",), "EMFILE"),
}
SYNCS = {"fsync", "fdatasync", "syncfs"}
ALL = sorted(s for calls, _e in KINDS.values() for s in calls)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_traced(root, strategy, strace_args, out):
    """``run`` under strace, attached once the command's code is imported; (exit code, stdout, stderr)."""
    env = dict(os.environ, AUFS2OVERLAY_STOP_AT_START="1")
    proc = subprocess.Popen([sys.executable, "-m", "migrator", "run", "--root", root, "--engine-pidfile",
                             "/nonexistent", "-q", "--jobs", "1", "--strategy", strategy],
                            env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(proc)
        tracer = subprocess.Popen(["strace", "-p", str(proc.pid), "-o", out, "-y", "-e", f"trace={','.join(ALL)}",
                                   *strace_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 10
        while _tracer_of(proc.pid) is None:  # attached: the kernel names the tracer in /proc/PID/status
            assert time.monotonic() < deadline, tracer.stderr.read() if tracer.poll() is not None else "no attach"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGCONT)
        stdout, stderr = proc.communicate(timeout=120)
        tracer.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, stderr


def _tracer_of(pid):
    with open(f"/proc/{pid}/status") as f:
        tracer = re.search(r"^TracerPid:\s+(\d+)", f.read(), re.M).group(1)
    return None if tracer == "0" else tracer


@pytest.fixture(scope="module")
def counts(template, tmp_path_factory):
    """How often a run of the sample root makes each call, per strategy (strace -c)."""
    found = {}
    for strategy in ("hardlink", "inplace"):
        work = tmp_path_factory.mktemp(f"count-{strategy}")
        root = str(work / "docker")
        subprocess.run(["cp", "-a", template, root], check=True)
        out = str(work / "count.txt")
        code, _o, err = run_traced(root, strategy, ["-c"], out)
        assert code == 0, err
        with open(out) as f:
            rows = [line.split() for line in f if re.match(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+\d+", line)]
        found[strategy] = {row[-1]: int(row[3]) for row in rows}
    return found


def points(n):
    return sorted({1, max(1, (n + 1) // 2), n})


def injected_line(trace):
    with open(trace, errors="replace") as f:
        lines = [line for line in f if "(INJECTED)" in line]
    return lines[0] if lines else None


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_failed_call_stops_cleanly_or_is_absorbed_and_resume_and_rollback_are_exact(
        template, reference, counts, strategy, kind, tmp_path):
    syscalls, errno = KINDS[kind]
    made = {s: counts[strategy].get(s, 0) for s in syscalls}
    cases = [(s, n) for s in syscalls for n in points(made[s]) if made[s]]
    if not cases:
        pytest.skip(f"a {strategy} run of the sample root makes no {kind} call")
    original = whole_root(template)
    state_dir = f"/{WORKDIR.decode()}>)"  # strace -y names a descriptor's path: "fsync(4</…/.aufs2overlay>)"
    problems = []
    for i, (call, n) in enumerate(cases):
        root = str(tmp_path / f"r{i}" / "docker")
        os.makedirs(os.path.dirname(root))
        subprocess.run(["cp", "-a", template, root], check=True)
        trace = str(tmp_path / f"r{i}" / "trace.txt")
        code, out, err = run_traced(root, strategy, ["-e", f"inject={call}:error={errno}:when={n}"], trace)
        hit = injected_line(trace)
        where = f"{call} #{n} of {made[call]} ({errno}){': ' + hit.strip() if hit else ''}"
        errors = [line for line in err.splitlines() if line.startswith("aufs2overlay: error:")]
        if "Traceback" in err or (code != 0 and len(errors) != 1) or code not in (0, 1, 3, 4):
            problems.append(f"{where}: exit {code}, not one clear line:\n{err[-1500:]}")
            continue
        if code == 0:
            if hit and call in SYNCS and not (call == "fdatasync" and state_dir in hit):  # SQLite's own
                problems.append(f"{where}: a failed sync was absorbed (exit 0)")
                continue
            if tree_signature(root) != reference["signature"]:
                problems.append(f"{where}: absorbed, but the tree differs from an undisturbed run")
                continue
        res = cli("run", "--root", root, "--engine-pidfile", "/nonexistent", "-q")
        if res.returncode != 0:
            problems.append(f"{where}: the resumed run failed: {res.stderr[-800:]}")
            continue
        if tree_signature(root) != reference["signature"]:
            problems.append(f"{where}: the resumed run's tree differs from an undisturbed run")
            continue
        res = cli("rollback", "--root", root, "--engine-pidfile", "/nonexistent", "--force", "-q")
        after = whole_root(root)
        if res.returncode != 0 or after[0] != original[0] or after[1] != original[1]:
            problems.append(f"{where}: rollback is not exact ({res.stderr[-400:]}): "
                            f"{diff_manifests(original[0], after[0])[:5]}")
        shutil.rmtree(os.path.dirname(root), ignore_errors=True)
    assert not problems, f"{len(problems)} of {len(cases)} injections:\n" + "\n".join(problems)


def directory_syncs(template, tmp_path):
    """Of a run's fdatasync calls (1-based), those of the database's directory right after SQLite created its
    rollback journal, and those right after it deleted it (the commit point)."""
    root = str(tmp_path / "count" / "docker")
    os.makedirs(os.path.dirname(root))
    subprocess.run(["cp", "-a", template, root], check=True)
    trace = str(tmp_path / "count" / "trace.txt")
    code, _out, err = run_traced(root, "hardlink", [], trace)
    assert code == 0, err
    created, deleted, n, last = [], [], 0, None
    with open(trace, errors="replace") as f:
        for line in f:
            if "-journal" in line and (line.startswith("unlink") or "O_CREAT" in line):
                last = "deleted" if line.startswith("unlink") else "created"
            elif line.startswith("fdatasync("):
                n += 1
                if f"/{WORKDIR.decode()}>)" in line and last:
                    (created if last == "created" else deleted).append(n)
                    last = None
    return created, deleted


def test_sqlite_ignores_a_failed_sync_of_its_directory_after_creating_its_journal(template, reference, tmp_path):
    """SQLite's own policy, recorded: the directory sync after it creates its rollback journal may fail
    unnoticed; the one after it deletes the journal (synchronous=EXTRA: the commit point) may not."""
    created, deleted = directory_syncs(template, tmp_path)
    assert created and deleted, (created, deleted)
    outcomes = {}
    for n in (created[0], deleted[-1]):
        root = str(tmp_path / f"r{n}" / "docker")
        os.makedirs(os.path.dirname(root))
        subprocess.run(["cp", "-a", template, root], check=True)
        trace = str(tmp_path / f"r{n}" / "trace.txt")
        code, _out, err = run_traced(root, "hardlink", ["-e", f"inject=fdatasync:error=EIO:when={n}"], trace)
        hit = injected_line(trace)
        assert hit and f"/{WORKDIR.decode()}>)" in hit, hit  # the database's directory, both times
        outcomes[n] = code, err
    assert outcomes[created[0]][0] == 0, outcomes[created[0]][1]
    code, err = outcomes[deleted[-1]]
    assert code == 1 and "state database" in err and "disk I/O error" in err, err
    assert tree_signature(str(tmp_path / f"r{created[0]}" / "docker")) == reference["signature"]
