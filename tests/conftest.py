import os
import shutil
import subprocess
import sys
import time

import pytest

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "balena-aufs-root.tar.gz")
IS_ROOT = os.geteuid() == 0

# The tiers.  A test that needs root (mounts, mknod, chown to other users, trusted.* xattrs, loop devices,
# dockerd, the aufs VM, the single-file build) carries the ``root`` marker: from its module's
# ``pytestmark = needs_root``, from ``@needs_root``, or from a fixture of ROOT_FIXTURES it uses
# (``pytest_collection_modifyitems`` below).  Not run as root, such a test is skipped with the reason;
# ``pytest -m "not root"`` leaves them out instead and runs the rest, which any user can run.
ROOT_REASON = "needs root: mknod, chown, trusted.* xattrs and overlay mounts"
needs_root = pytest.mark.root
ROOT_FIXTURES = {
    "template": "the sample root holds device nodes and files of other owners",
    "sample_root": "the sample root holds device nodes and files of other owners",
    "reference": "a migration of the sample root (the overlay probe mounts)",
    "fixture_root": "the real balena root is unpacked with its owners",
    "binary": "the single-file build installs with apt, its tests run in chroots",
    "aufs_guest": "the aufs VM (9p passthrough of owners and devices, loop mounts)",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("root")
        reason = marker.kwargs.get("reason", ROOT_REASON) if marker else None
        if marker is None:
            fixture = next((f for f in item.fixturenames if f in ROOT_FIXTURES), None)
            if fixture is None:
                continue
            reason = f"needs root: {ROOT_FIXTURES[fixture]} (fixture {fixture})"
            item.add_marker(pytest.mark.root(reason=reason))
        if not IS_ROOT:
            item.add_marker(pytest.mark.skip(reason=reason))


def cli(*args, env=None, check=None, timeout=None):
    """Run the migrator as operators do, in its own process (killed after ``timeout`` seconds, if given)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    res = subprocess.run([sys.executable, "-m", "migrator", *args], capture_output=True, text=True, env=full_env,
                         timeout=timeout)
    if check is not None:
        assert res.returncode == check, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


STRATEGIES = ("hardlink", "inplace")


def run_args(root, *extra, strategy=None):
    args = ["run", "--root", root, "--engine-pidfile", "/nonexistent", "-q", *extra]
    return args + (["--strategy", strategy] if strategy else [])


@pytest.fixture(scope="session", params=STRATEGIES)
def strategy(request):
    """Suites that take this run once per strategy."""
    return request.param


WORKDIR = b".aufs2overlay"


@pytest.fixture(scope="session")
def template(tmp_path_factory):
    """The sample root, built once; tests copy it with ``cp -a`` (which keeps times, owners, xattrs, links)."""
    from migrator import sample

    root = str(tmp_path_factory.mktemp("template") / "docker")
    sample.build_sample_root(root)
    return root


@pytest.fixture(scope="session")
def reference(template, strategy, tmp_path_factory):
    """An uninterrupted run of the template with ``strategy``: the tree it made, the checkpoints it passed, how
    long it took.  (Both strategies make the same tree: test_convert checks that.)"""
    from tests.support.signature import tree_signature

    root = str(tmp_path_factory.mktemp("reference") / "docker")
    subprocess.run(["cp", "-a", template, root], check=True)
    trace = os.path.join(os.path.dirname(root), "trace")
    started = time.monotonic()
    cli(*run_args(root, strategy=strategy), env={"AUFS2OVERLAY_CHECKPOINT_TRACE": trace}, check=0)
    duration = time.monotonic() - started
    with open(trace) as f:
        labels = [line.rstrip("\n").split(" ", 1)[1] for line in f]
    return {"signature": tree_signature(root), "labels": labels, "duration": duration, "strategy": strategy}


@pytest.fixture
def sample_root(tmp_path):
    from migrator import sample

    root = str(tmp_path / "docker")
    sample.build_sample_root(root)
    return root


def unpack_fixture(dest):
    if not os.path.exists(FIXTURE):
        pytest.fail(f"the real aufs root fixture is missing: {FIXTURE}")
    os.makedirs(dest)
    subprocess.run(["tar", "-xzf", FIXTURE, "-C", dest], check=True)


@pytest.fixture
def fixture_root(tmp_path):
    root = str(tmp_path / "balena")
    unpack_fixture(root)
    return root


@pytest.fixture(scope="session")
def binary():
    """The single-file build of this checkout (``packaging/build-binary``), built once a session."""
    import platform

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([os.path.join(repo, "packaging", "build-binary")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr[-4000:]
    path = res.stdout.strip().splitlines()[-1]
    assert path == os.path.join(repo, "dist", f"aufs2overlay-{platform.machine()}")
    return path


@pytest.fixture(scope="session")
def aufs_guest():
    """One boot of the aufs kernel for the session (tests/support/aufsvm.py): what aufs shows is decided by it.
    Skipped only without root; where qemu or the kernel is missing the test fails with the line that says so
    (the README's test command installs qemu-system-x86: CI runs these)."""
    from tests.support import aufsvm

    if not IS_ROOT:
        pytest.skip("the aufs VM needs root (9p passthrough of owners and devices, loop mounts)")
    reason = aufsvm.missing()
    if reason:
        pytest.fail(reason)
    guest = aufsvm.Guest(time_limit=float(os.environ.get("A2O_GUEST_MINUTES", "180")) * 60).start()
    try:
        yield guest
    finally:
        guest.cleanup()


@pytest.fixture
def copy_root():
    def copy(src, dst):
        subprocess.run(["cp", "-a", src, dst], check=True)
        return dst
    return copy


__all__ = ["cli", "needs_root", "run_args", "shutil", "STRATEGIES"]
