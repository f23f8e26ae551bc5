"""Stops sent to an unattended run (a terminal's ^C, systemd's SIGTERM, a closed session's SIGHUP), to the
program alone or to its whole process group, at a random instant of the conversion: one line saying so, the
documented code (128 + the signal), no traceback, no process left, nothing left in TMPDIR (the single file),
and the next ``run`` converges with ``verify`` ok."""

import os
import random
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import cli, needs_root
from tests.support.smallroot import SmallRoot

pytestmark = needs_root

STOPS = [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)]
LAYERS = 1500


def many_layers(root: str) -> None:
    ids = [f"{n:064x}" for n in range(LAYERS)]
    SmallRoot(root, {lid: ids[i - i % 20:i][::-1] for i, lid in enumerate(ids)})


def group_gone(pgid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def stop_during_conversion(program, root, log, signum, whole_group, seed, env=None):
    """Start ``run``, wait until the log shows a layer step, wait a random moment more, send ``signum``; the
    finished process and its stderr."""
    proc = subprocess.Popen([*program, "run", "--root", root, "--engine-pidfile", "/nonexistent", "--log-file",
                             log], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, **(env or {})})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if os.path.exists(log) and " layer " in open(log).read():
            break
        if proc.poll() is not None:
            break
        time.sleep(0.01)
    time.sleep(random.Random(seed).uniform(0, 0.4))
    if whole_group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    out, err = proc.communicate(timeout=120)
    return proc, out, err


def check_stopped(proc, err, signum, code, log):
    assert proc.returncode == code, (proc.returncode, err)
    assert "Traceback" not in err and "Error" not in err, err
    stopped = [line for line in err.splitlines() if "stopped by" in line]
    assert stopped == [f"aufs2overlay: stopped by {signal.Signals(signum).name} at a safe point; run the same "
                       "command again to resume"], err
    assert group_gone(proc.pid), "a process of the migrator is left"
    with open(log) as f:
        assert f"stopped by {signal.Signals(signum).name} at a safe point" in f.read().splitlines()[-1]


@pytest.mark.parametrize("whole_group", [False, True], ids=["program", "group"])
@pytest.mark.parametrize("signum,code", STOPS, ids=[s.name for s, _ in STOPS])
def test_a_stop_is_one_line_and_its_code_and_run_resumes(tmp_path, signum, code, whole_group):
    root = str(tmp_path / "docker")
    many_layers(root)
    log = str(tmp_path / "run.log")
    proc, _out, err = stop_during_conversion([sys.executable, "-m", "migrator"], root, log, signum, whole_group,
                                             seed=f"{signum}{whole_group}")
    check_stopped(proc, err, signum, code, log)
    res = cli("run", "--root", root, "--engine-pidfile", "/nonexistent", check=0)
    assert "resuming the migration" in res.stderr
    cli("verify", "--root", root, check=0)


@pytest.mark.parametrize("whole_group", [False, True], ids=["launcher", "group"])
@pytest.mark.parametrize("signum,code", STOPS, ids=[s.name for s, _ in STOPS])
def test_the_single_file_stops_the_same_and_leaves_nothing_unpacked(binary, tmp_path, signum, code,
                                                                       whole_group):
    root = str(tmp_path / "docker")
    many_layers(root)
    log = str(tmp_path / "run.log")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc, _out, err = stop_during_conversion([binary], root, log, signum, whole_group,
                                             seed=f"bin{signum}{whole_group}", env={"TMPDIR": str(tmp)})
    check_stopped(proc, err, signum, code, log)
    assert os.listdir(tmp) == [], "the single file left unpacked files behind"
    res = subprocess.run([binary, "run", "--root", root, "--engine-pidfile", "/nonexistent"], capture_output=True,
                         text=True, env={**os.environ, "TMPDIR": str(tmp)})
    assert res.returncode == 0, res.stderr
    assert subprocess.run([binary, "verify", "--root", root], capture_output=True,
                          env={**os.environ, "TMPDIR": str(tmp)}).returncode == 0
    assert os.listdir(tmp) == []
