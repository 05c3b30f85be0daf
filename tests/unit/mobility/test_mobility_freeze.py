"""Freeze and thaw watchdog (mobility/freeze.py, thaw_watchdog.py) on real ext4 loop mounts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lifeboat.mobility.freeze import FreezeError, Frozen, mounted_filesystems

# The test process itself never writes to a filesystem that may be frozen: a subprocess does,
# so a bug shows up as a timeout instead of a hung test run.
WRITER = textwrap.dedent("""
    import os, sys
    with open(sys.argv[1], "wb") as f:
        f.write(b"x" * 65536)
        f.flush()
        os.fsync(f.fileno())
""")


def start_writer(path: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WRITER, path])


def write_seconds(path: str, timeout: float) -> float:
    """Seconds a write + fsync to path takes; fails the test if it blocks longer than timeout."""
    t0 = time.monotonic()
    writer = start_writer(path)
    try:
        assert writer.wait(timeout) == 0
    except subprocess.TimeoutExpired:
        writer.kill()   # takes effect once the fixture thaws
        pytest.fail(f"a write to {path} still blocked after {timeout} s: filesystem left frozen")
    return time.monotonic() - t0


# -- mounted_filesystems -------------------------------------------------------------------------

def test_mounted_filesystems_matches_by_device_and_lists_a_bind_mounted_fs_once(loop_lab, ext4_disk, tmp_path):
    os.mkdir(os.path.join(ext4_disk.mountpoint, "sub"))
    loop_lab.bind(os.path.join(ext4_disk.mountpoint, "sub"), tmp_path / "bind-sub")
    loop_lab.bind(ext4_disk.mountpoint, tmp_path / "bind-root")
    assert mounted_filesystems(ext4_disk.device) == [ext4_disk.mountpoint]
    # A symlink to the device (like /dev/disk/by-*) resolves to the same numbers.
    link = tmp_path / "dev-link"
    link.symlink_to(ext4_disk.device)
    assert mounted_filesystems(str(link)) == [ext4_disk.mountpoint]


def test_mounted_filesystems_of_an_unmounted_device_is_empty(loop_lab):
    dev = loop_lab.attach(loop_lab.image("blank.img", 8 << 20))
    assert mounted_filesystems(dev) == []


def test_mounted_filesystems_finds_partitions(loop_lab):
    disk = loop_lab.partitioned_ext4_disk("parted")
    assert os.path.exists(f"{disk.device}p1")
    assert mounted_filesystems(disk.device) == [disk.mountpoint]
    assert mounted_filesystems(f"{disk.device}p1") == [disk.mountpoint]


def test_mounted_filesystems_rejects_non_devices(tmp_path):
    with pytest.raises(FreezeError, match="not a block device"):
        mounted_filesystems(str(tmp_path))
    with pytest.raises(FreezeError, match="cannot stat"):
        mounted_filesystems(str(tmp_path / "missing"))


# -- Frozen --------------------------------------------------------------------------------------

def test_freeze_blocks_a_writer_until_thaw(ext4_disk):
    target = os.path.join(ext4_disk.mountpoint, "during-freeze")
    writer = None
    try:
        with Frozen([ext4_disk.mountpoint, ext4_disk.mountpoint], timeout=30) as frozen:
            writer = start_writer(target)
            time.sleep(1.0)
            assert writer.poll() is None, "the writer finished while the filesystem was frozen"
        assert writer.wait(10) == 0
    finally:
        if writer is not None and writer.poll() is None:
            writer.kill()
    assert os.path.getsize(target) == 65536
    assert 1.0 <= frozen.window_seconds < 10
    assert frozen.intact and frozen.thawed_early == [] and frozen.thaw_errors == []
    assert write_seconds(os.path.join(ext4_disk.mountpoint, "after"), 10) < 5


def test_freezing_a_non_mount_path_fails_and_leaves_nothing_frozen(ext4_disk):
    sub = os.path.join(ext4_disk.mountpoint, "not-a-mount")
    os.mkdir(sub)
    # A directory inside the mount: FIFREEZE on it would freeze the whole filesystem, so it must
    # be refused before anything is frozen (and here the worst case is only this loop mount).
    with pytest.raises(FreezeError, match="not-a-mount is not a mount point; nothing was frozen"):
        with Frozen([ext4_disk.mountpoint, sub], timeout=10):
            pytest.fail("entered a freeze of a non-mount path")
    with pytest.raises(FreezeError, match="is not a mount point"):
        with Frozen([os.path.join(ext4_disk.mountpoint, "missing")], timeout=10):
            pass
    assert write_seconds(os.path.join(ext4_disk.mountpoint, "after"), 10) < 5


def test_a_failing_freeze_thaws_what_it_froze_and_not_what_others_froze(loop_lab, ext4_disk):
    other = loop_lab.ext4_disk("other")
    subprocess.run(["fsfreeze", "-f", other.mountpoint], check=True)
    try:
        with pytest.raises(FreezeError, match="already frozen.*were thawed"):
            with Frozen([ext4_disk.mountpoint, other.mountpoint], timeout=10):
                pytest.fail("entered with a filesystem frozen by someone else")
        assert write_seconds(os.path.join(ext4_disk.mountpoint, "after"), 10) < 5
        # The operator's freeze is theirs to undo: FITHAW again must still find it frozen.
        assert subprocess.run(["fsfreeze", "-u", other.mountpoint]).returncode == 0
    finally:
        subprocess.run(["fsfreeze", "-u", other.mountpoint], capture_output=True)


def test_empty_mount_list_is_a_no_op():
    with Frozen([], timeout=1) as frozen:
        pass
    assert frozen.window_seconds == 0.0


def test_a_window_past_the_deadline_is_thawed_by_the_watchdog_and_reported(ext4_disk):
    # __exit__ does not raise (the body's work, e.g. an epoch switch, is done): `intact` says it.
    with Frozen([ext4_disk.mountpoint], timeout=1) as frozen:
        time.sleep(2.5)
    assert not frozen.intact
    assert frozen.thawed_early == [ext4_disk.mountpoint]
    assert write_seconds(os.path.join(ext4_disk.mountpoint, "after"), 10) < 5


# -- the watchdog when the agent cannot thaw -----------------------------------------------------

AGENT = textwrap.dedent("""
    import sys, time
    from lifeboat.core import logging as log
    from lifeboat.mobility.freeze import Frozen
    log.configure(level="debug")   # on stderr, as in the agent: stdout is our "frozen" signal
    frozen = Frozen([sys.argv[1]], timeout=float(sys.argv[2]))
    frozen.__enter__()
    print("frozen", frozen._watchdog.pid, flush=True)
    time.sleep(600)   # never reaches __exit__
""")


def start_frozen_agent(mountpoint: str, deadline: float) -> tuple[subprocess.Popen, int]:
    """A child that freezes mountpoint and then hangs (it leads its own process group); its watchdog's pid."""
    agent = subprocess.Popen([sys.executable, "-c", AGENT, mountpoint, str(deadline)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, start_new_session=True)
    line = agent.stdout.readline()
    if not line.startswith(b"frozen "):
        agent.kill()
        pytest.fail(f"the agent did not freeze: {line!r} {agent.communicate(timeout=10)}")
    return agent, int(line.split()[1])


def test_watchdog_thaws_when_the_agent_is_sigkilled(ext4_disk):
    deadline = 30.0
    agent, _watchdog = start_frozen_agent(ext4_disk.mountpoint, deadline)
    # SIGKILL to the agent's whole process group: the watchdog is in its own session and survives.
    os.killpg(agent.pid, signal.SIGKILL)
    try:
        seconds = write_seconds(os.path.join(ext4_disk.mountpoint, "after-kill"), deadline + 10)
    finally:
        agent.kill()
    assert seconds < 5, "thawed only at the deadline: the watchdog missed the agent's death"
    # The watchdog inherited the agent's stderr: it says why it thawed once it exits.
    _out, err = agent.communicate(timeout=10)
    assert b"agent gone" in err and b"thaw watchdog thawed" in err


def test_watchdog_thaws_at_its_deadline_when_the_agent_hangs(ext4_disk):
    deadline = 3.0
    agent, _watchdog = start_frozen_agent(ext4_disk.mountpoint, deadline)
    try:
        os.kill(agent.pid, signal.SIGSTOP)   # hung agent: alive, its pipe open, never thaws
        writer = start_writer(os.path.join(ext4_disk.mountpoint, "after-deadline"))
        t0 = time.monotonic()
        time.sleep(1.0)
        assert writer.poll() is None, "thawed before the deadline"
        try:
            assert writer.wait(deadline + 5) == 0
        except subprocess.TimeoutExpired:
            writer.kill()
            pytest.fail("the watchdog did not thaw at its deadline")
        assert time.monotonic() - t0 < deadline + 2
    finally:
        agent.kill()
        agent.communicate(timeout=10)
    assert write_seconds(os.path.join(ext4_disk.mountpoint, "later"), 10) < 5


def test_watchdog_thaws_at_once_when_terminated(ext4_disk):
    # systemd stopping the unit signals its whole cgroup: the watchdog thaws rather than dies.
    agent, watchdog = start_frozen_agent(ext4_disk.mountpoint, 30.0)
    try:
        os.kill(watchdog, signal.SIGTERM)
        assert write_seconds(os.path.join(ext4_disk.mountpoint, "after-term"), 20) < 5
    finally:
        agent.kill()
    _out, err = agent.communicate(timeout=10)
    assert b"signal SIGTERM" in err
