"""The fleet rollout (contrib/ansible/), run by the real ``ansible-playbook`` (ansible-core 2.16 from PyPI, in a
venv of its own) on an inventory of five "hosts" on this machine (``ansible_connection=local``), each with its
own engine root, engine commands and daemon.json; the canary runs a real dockerd, the others a stand-in engine.

First rollout, batches of 1: the canary and the next host complete, the third fails its health gate on
overlay2, is rolled back and started again on aufs, exactly as before, and the rollout stops: the two hosts of
later batches are untouched, byte for byte. After the third host is fixed, a second run skips the completed
hosts and completes the rest; every host passes ``verify``; each host's ``status --json`` is in one summary on
the controller.
"""

import json
import os
import subprocess
import sys
import time

import pytest

import tests.support.dockerd as dk
from migrator.scan.proof import RACY_NS
from tests.conftest import WORKDIR, cli, needs_root, unpack_fixture
from tests.support.manifest import manifest

pytestmark = [needs_root, pytest.mark.engine,
              pytest.mark.skipif(dk.available() is not None, reason=str(dk.available()))]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAYBOOKS = os.path.join(REPO, "contrib", "ansible")
ANSIBLE_CORE = "ansible-core==2.16.*"  # the newest that still manages Python 3.6 targets (Ubuntu 18.04)


@pytest.fixture(scope="session")
def ansible_playbook(tmp_path_factory):
    venv = str(tmp_path_factory.mktemp("ansible") / "venv")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", ANSIBLE_CORE], check=True)
    return os.path.join(venv, "bin", "ansible-playbook")


class Host:
    """One host of the inventory: its root, its engine commands, its daemon.json."""

    def __init__(self, base, name, root_maker, engine=None):
        self.name = name
        self.dir = os.path.join(base, name)
        os.makedirs(self.dir)
        self.root = os.path.join(self.dir, "docker")
        root_maker(self.root)
        self.config = os.path.join(self.dir, "daemon.json")
        with open(self.config, "w") as f:
            f.write('{\n  "log-level": "warn"\n}\n')
        self.engine_log = os.path.join(self.dir, "engine.log")
        self.fail_marker = os.path.join(self.dir, "fail-health-on-overlay2")
        self.engine = engine

    def vars(self):
        v = {"aufs2overlay_root": self.root, "aufs2overlay_engine_config": self.config,
             "aufs2overlay_install_path": os.path.join(self.dir, "bin", "aufs2overlay"),
             "aufs2overlay_state_dir": os.path.join(self.dir, "state"), "aufs2overlay_health_delay": 1,
             "aufs2overlay_health_retries": 2}
        if self.engine is None:  # a stand-in engine: its commands are logged; its health is the marker's
            v.update(aufs2overlay_engine_stop=f"echo stop >> {self.engine_log}",
                     aufs2overlay_engine_start=f"echo start >> {self.engine_log}",
                     aufs2overlay_engine_pidfiles=[os.path.join(self.dir, "engine.pid")],
                     aufs2overlay_docker="false",
                     aufs2overlay_health=(f'test "$AUFS2OVERLAY_EXPECTED_DRIVER" != overlay2 || '
                                          f'test ! -e {self.fail_marker}'))
        else:  # a real dockerd: its data root is this root, its configuration this daemon.json
            e = self.engine
            docker = f"{dk.DOCKER} -H unix://{e.sock}"
            start = (f"setsid {dk.DOCKERD} --config-file {self.config} --data-root {self.root} --exec-root "
                     f"{e.exec_root} --pidfile {e.pidfile} -H unix://{e.sock} --iptables=false --ip6tables=false "
                     f"--bridge=none > {e.log} 2>&1 < /dev/null & "
                     f"for i in $(seq 1 200); do {docker} version > /dev/null 2>&1 && exit 0; sleep 0.3; done; exit 1")
            stop = (f"p=$(cat {e.pidfile} 2>/dev/null) && kill $p && while kill -0 $p 2>/dev/null; do sleep 0.2; "
                    "done; true")
            v.update(aufs2overlay_engine_start=start, aufs2overlay_engine_stop=stop, aufs2overlay_docker=docker,
                     aufs2overlay_engine_pidfiles=[e.pidfile], aufs2overlay_health_retries=5)
        return v

    def state(self):
        return manifest(self.root, skip={WORKDIR}), open(self.config, "rb").read()

    def engine_events(self):
        try:
            with open(self.engine_log) as f:
                return f.read().split()
        except FileNotFoundError:
            return []


def sample_root(root):
    from migrator import sample

    sample.build_sample_root(root)


@pytest.fixture
def fleet(tmp_path, binary):
    base = str(tmp_path)
    canary_engine = dk.Dockerd(os.path.join(base, "h1", "docker"))
    hosts = [Host(base, "h1", unpack_fixture, engine=canary_engine)]
    hosts += [Host(base, f"h{i}", sample_root) for i in range(2, 6)]
    inventory = os.path.join(base, "inventory.json")
    summary_dir = os.path.join(base, "summary")
    doc = {"all": {"hosts": {h.name: h.vars() for h in hosts},
                   "vars": {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
                            "aufs2overlay_binary": binary, "aufs2overlay_summary_dir": summary_dir}}}
    with open(inventory, "w") as f:
        json.dump(doc, f, indent=1)
    try:
        yield {"hosts": hosts, "inventory": inventory, "summary": summary_dir, "base": base}
    finally:
        canary_engine.cleanup()


def rollout(ansible_playbook, fleet, playbook="migrate.yml"):
    env = dict(os.environ, ANSIBLE_LOCAL_TEMP=os.path.join(fleet["base"], "ansible-tmp"),
               ANSIBLE_REMOTE_TEMP=os.path.join(fleet["base"], "ansible-tmp"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_RETRY_FILES_ENABLED="0")
    return subprocess.run([ansible_playbook, "-i", fleet["inventory"], os.path.join(PLAYBOOKS, playbook),
                           "-e", json.dumps({"aufs2overlay_batches": [1, 1, 1, "100%"]})],
                          capture_output=True, text=True, env=env, cwd=fleet["base"])


def phase(host):
    return json.loads(cli("status", "--root", host.root, "--json").stdout)["phase"]


def test_a_failing_host_is_rolled_back_later_hosts_untouched_and_a_rerun_completes(ansible_playbook, fleet):
    h1, h2, h3, h4, h5 = fleet["hosts"]
    before = {h.name: h.state() for h in fleet["hosts"]}
    open(h3.fail_marker, "w").close()

    res = rollout(ansible_playbook, fleet)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert f"{h3.name} failed (Health gate" in out and "is back on aufs, its engine running" in out, out[-3000:]
    assert phase(h1) == "completed" and phase(h2) == "completed"
    info = subprocess.run([dk.DOCKER, "-H", f"unix://{h1.engine.sock}", "info", "--format", "{{.Driver}}"],
                          capture_output=True, text=True)
    assert info.stdout.strip() == "overlay2", info.stderr  # the canary's real engine runs on overlay2
    assert phase(h3) == "rolled-back"
    assert h3.state() == before[h3.name], "the failed host is not exactly as before"
    assert h3.engine_events() == ["stop", "start", "stop", "start"], h3.engine_events()
    for h in (h4, h5):
        assert h.state() == before[h.name] and not os.path.exists(os.path.join(h.root, ".aufs2overlay"))
        assert h.engine_events() == [] and not os.path.exists(os.path.join(h.dir, "bin"))
    summary = json.load(open(os.path.join(fleet["summary"], "summary.json")))
    assert {n: s["phase"] for n, s in summary.items()} == {"h1": "completed", "h2": "completed",
                                                           "h3": "rolled-back"}

    os.unlink(h3.fail_marker)
    res = rollout(ansible_playbook, fleet)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert h2.engine_events() == ["stop", "start"], "a completed host was migrated again"
    for h in fleet["hosts"]:
        assert phase(h) == "completed", h.name
        res = cli("verify", "--root", h.root)
        assert res.returncode == 0, f"{h.name}: {res.stdout}"
        with open(h.config) as f:
            assert json.load(f)["storage-driver"] == "overlay2"
    summary = json.load(open(os.path.join(fleet["summary"], "summary.json")))
    assert sorted(summary) == ["h1", "h2", "h3", "h4", "h5"]
    assert {s["phase"] for s in summary.values()} == {"completed"}

    res = rollout(ansible_playbook, fleet, "cleanup.yml")
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    for h in fleet["hosts"]:
        assert not os.path.exists(os.path.join(h.root, "aufs")), h.name


def test_stage_while_serving_then_the_rollout_cuts_over(ansible_playbook, fleet):
    """``stage.yml`` on every host while the engines serve (none is stopped, nothing they use changes), then
    ``migrate.yml``: each host's run is the cutover, and every host completes."""
    time.sleep(RACY_NS / 1e9 + 0.2)  # the roots were just made: stage trusts their directories after this
    hosts = fleet["hosts"]
    engine_data = {h.name: (manifest(os.path.join(h.root, "aufs")), manifest(os.path.join(h.root, "image", "aufs")))
                   for h in hosts}
    res = rollout(ansible_playbook, fleet, "stage.yml")
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    summary = json.load(open(os.path.join(fleet["summary"], "summary.json")))
    for h in hosts:
        assert phase(h) == "staging", h.name
        assert h.engine_events() == [], "stage stopped an engine"
        assert (manifest(os.path.join(h.root, "aufs")),
                manifest(os.path.join(h.root, "image", "aufs"))) == engine_data[h.name], h.name
        assert summary[h.name]["staged"]["staged"] > 0 and summary[h.name]["cutover_seconds"] is None
    res = rollout(ansible_playbook, fleet, "stage.yml")  # again: nothing new to stage
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    res = rollout(ansible_playbook, fleet)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    summary = json.load(open(os.path.join(fleet["summary"], "summary.json")))
    for h in hosts:
        assert phase(h) == "completed", h.name
        assert cli("verify", "--root", h.root).returncode == 0, h.name
        with open(os.path.join(h.dir, "state", "run.log")) as f:
            assert "staged layers kept" in f.read(), h.name
        assert summary[h.name]["cutover_seconds"] > 0
