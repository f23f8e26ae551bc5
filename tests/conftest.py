import os
import shutil
import subprocess
import sys

import pytest

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "balena-aufs-root.tar.gz")
IS_ROOT = os.geteuid() == 0

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: mknod, chown, trusted.* xattrs and overlay mounts")


def cli(*args, env=None, check=None):
    """Run the migrator as operators do, in its own process."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    res = subprocess.run([sys.executable, "-m", "migrator", *args], capture_output=True, text=True, env=full_env)
    if check is not None:
        assert res.returncode == check, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


def run_args(root, *extra):
    return ["run", "--root", root, "--engine-pidfile", "/nonexistent", "-q", *extra]


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


@pytest.fixture
def copy_root():
    def copy(src, dst):
        subprocess.run(["cp", "-a", src, dst], check=True)
        return dst
    return copy


__all__ = ["cli", "needs_root", "run_args", "shutil"]
