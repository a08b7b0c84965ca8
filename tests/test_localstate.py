"""The host's local state on a disk that fails: two slots written in place, each with a
sequence number and a checksum; the newest valid slot wins; a full disk does not stop an
update; the old ``state.json`` is migrated."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from supervisor_dcdeploy.localstate import (LEGACY_STATE_FILE, STATE_FILE, LocalState,
                                            ReleaseDir, SlotFile, decode_slot, encode_slot,
                                            read_slots, read_state)


def _slot(path: Path, index: int) -> tuple[int, bytes] | None:
    data = path.read_bytes()
    size = len(data) // 2
    return decode_slot(data[index * size:(index + 1) * size])


def test_updates_alternate_slots_with_rising_sequence(tmp_path):
    state = LocalState(tmp_path)
    size = (tmp_path / STATE_FILE).stat().st_size
    for version in ("1", "2", "3"):
        state.update("api", active=version)
    # The file never grows: every update is written in place.
    assert (tmp_path / STATE_FILE).stat().st_size == size
    slots = [_slot(tmp_path / STATE_FILE, i) for i in (0, 1)]
    assert all(slots)
    seqs = sorted(s[0] for s in slots)  # type: ignore[index]
    assert seqs[1] == seqs[0] + 1
    newest = max(slots, key=lambda s: s[0])  # type: ignore[index,return-value]
    assert json.loads(newest[1])["services"]["api"]["active"] == "3"  # type: ignore[index]
    assert LocalState(tmp_path).get("api").active == "3"


def test_higher_sequence_wins_whichever_slot_holds_it(tmp_path):
    path = tmp_path / STATE_FILE
    size = 8192
    old = json.dumps({"services": {"api": {"active": "1"}}}).encode()
    new = json.dumps({"services": {"api": {"active": "2"}}}).encode()
    # Slot 1 holds the older copy, slot 0 the newer one (sequence 8 after 7).
    path.write_bytes(encode_slot(8, new, size) + encode_slot(7, old, size))
    assert LocalState(tmp_path).get("api").active == "2"
    path.write_bytes(encode_slot(7, old, size) + encode_slot(8, new, size))
    assert LocalState(tmp_path).get("api").active == "2"
    path.write_bytes(encode_slot(9, old, size) + encode_slot(8, new, size))
    assert LocalState(tmp_path).get("api").active == "1"


def test_torn_slot_falls_back_to_the_other_and_is_overwritten_next(tmp_path):
    state = LocalState(tmp_path)
    state.update("api", active="12", verified=True)
    state.update("api", active="13", verified=False)
    path = tmp_path / STATE_FILE
    got = read_slots(path)
    assert json.loads(got.payload)["services"]["api"]["active"] == "13"  # type: ignore[arg-type]
    # Tear the newest slot: half of its payload never reached the disk.
    data = bytearray(path.read_bytes())
    start = got.index * got.slot_size + 60
    data[start:start + 40] = b"\0" * 40
    path.write_bytes(bytes(data))
    again = LocalState(tmp_path)
    assert again.get("api").active == "12" and again.get("api").verified
    assert again.problem and "torn" in again.problem
    # The next update goes into the torn slot, keeping the good one.
    again.update("api", active="14")
    assert _slot(path, got.index) is not None
    assert LocalState(tmp_path).get("api").active == "14"
    assert LocalState(tmp_path).problem is None


def test_no_valid_slot_is_reported_and_the_file_reused(tmp_path):
    path = tmp_path / STATE_FILE
    path.write_bytes(b"\x07" * 8192)
    state = LocalState(tmp_path)
    assert state.problem and "no slot is valid" in state.problem
    assert state.get("api").active is None
    state.update("api", active="3")
    assert path.stat().st_size == 8192
    assert LocalState(tmp_path).get("api").active == "3"
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / STATE_FILE).write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="not two slots"):
        read_state(odd)
    # A misshapen file is made again, in the right shape, by the next update.
    misshapen = LocalState(odd)
    assert misshapen.problem and "not two slots" in misshapen.problem
    misshapen.update("api", active="4")
    assert (odd / STATE_FILE).stat().st_size % 8192 == 0
    assert read_state(odd)["services"]["api"]["active"] == "4"


def test_a_state_larger_than_a_slot_makes_the_file_larger(tmp_path):
    state = LocalState(tmp_path)
    first = (tmp_path / STATE_FILE).stat().st_size
    state.update("api", spec="x" * (first // 2 + 10))
    assert (tmp_path / STATE_FILE).stat().st_size > first
    assert LocalState(tmp_path).get("api").spec == "x" * (first // 2 + 10)


def test_legacy_state_json_is_migrated_once(tmp_path):
    (tmp_path / LEGACY_STATE_FILE).write_text(json.dumps(
        {"services": {"api": {"active": "5", "previous": "4", "installed": {"5": "ab"},
                              "verified": True, "spec": None}}}))
    # Before migration, status readers see the legacy file.
    assert read_state(tmp_path)["services"]["api"]["active"] == "5"
    state = LocalState(tmp_path)
    assert state.get("api").active == "5" and state.get("api").previous == "4"
    assert not (tmp_path / LEGACY_STATE_FILE).exists()
    assert read_state(tmp_path)["services"]["api"]["installed"] == {"5": "ab"}
    assert LocalState(tmp_path).get("api").active == "5"


def test_slot_encoding_rejects_a_payload_that_does_not_fit():
    with pytest.raises(ValueError, match="does not fit"):
        encode_slot(1, b"x" * 5000, 4096)
    assert decode_slot(b"\0" * 4096) is None
    assert decode_slot(encode_slot(3, b"{}", 4096)) == (3, b"{}")


# ------------------------------------------------------------------------- a full disk

@pytest.fixture
def full_disk(tmp_path: Path, require_root) -> Iterator[Path]:
    """A 1 MiB tmpfs: the honest way to get ENOSPC."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        require_root(f"cannot mount a tmpfs: {res.stderr.strip() or res.returncode}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path) -> None:
    fd = os.open(mnt / ".ballast", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (1 << 16, 4096, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    assert shutil.disk_usage(mnt).free == 0
    with pytest.raises(OSError):
        (mnt / "probe").write_bytes(b"x" * 4096)


def test_update_on_a_full_disk_persists(full_disk):
    """The chaos finding (seed 1202, trial 11): on a full disk the switch to 13 could not be
    recorded, so a reboot started 12. With the slots the record survives."""
    rd = ReleaseDir(full_disk, "b")
    for version in ("12", "13"):
        rd.path(version).mkdir(parents=True)
        (rd.path(version) / ".dcdeploy-release.json").write_text("{}")
    rd.point_current("12")
    state = LocalState(full_disk)
    state.update("b", active="12", verified=True, installed={"12": "a", "13": "b"})
    _fill(full_disk)
    # The switch as the agent does it: the new link, the way back, commit, record.
    prepared = rd.prepare_current("13")
    back = rd.prepare_current("12")
    rd.commit_current(prepared)
    state.update("b", active="13", previous="12", verified=False)
    state.update("b", verified=True)
    back.unlink()
    after_reboot = LocalState(full_disk)
    assert after_reboot.problem is None
    assert after_reboot.get("b").active == "13" and after_reboot.get("b").verified
    assert rd.active() == "13"
    assert read_state(full_disk)["services"]["b"]["active"] == "13"


def test_rollback_link_made_before_the_disk_filled_still_works(full_disk):
    rd = ReleaseDir(full_disk, "b")
    for version in ("12", "13"):
        rd.path(version).mkdir(parents=True)
        (rd.path(version) / ".dcdeploy-release.json").write_text("{}")
    rd.point_current("12")
    prepared = rd.prepare_current("13")
    back = rd.prepare_current("12")
    _fill(full_disk)
    rd.commit_current(prepared)
    assert rd.active() == "13"
    rd.commit_current(back)  # a rename: no new space needed
    assert rd.active() == "12"


def test_migration_on_a_full_disk_keeps_the_legacy_file(full_disk):
    """No room to make the slots: the legacy state is still read, and kept until the slots
    can be made."""
    (full_disk / LEGACY_STATE_FILE).write_text(json.dumps({"services": {"b": {"active": "7"}}}))
    _fill(full_disk)
    state = LocalState(full_disk)
    assert state.get("b").active == "7"
    assert state.problem and "cannot create" in state.problem
    assert (full_disk / LEGACY_STATE_FILE).exists()
    (full_disk / ".ballast").unlink()
    state.update("b", verified=True)
    assert LocalState(full_disk).get("b").active == "7"
    assert not (full_disk / LEGACY_STATE_FILE).exists()


def test_slot_file_writes_go_to_the_other_slot(tmp_path):
    slots = SlotFile(tmp_path / "s")
    slots.write(b"one")
    slots.write(b"two")
    slots.write(b"three")
    assert slots.seq == 3 and slots.index == 0
    assert read_slots(tmp_path / "s").payload == b"three"
    assert _slot(tmp_path / "s", 1) == (2, b"two")


def test_installed_ignores_an_unpack_in_progress_or_left_by_a_crash(tmp_path: Path) -> None:
    """An unpack writes its marker in ``.tmp-<version>-*`` and then renames the directory:
    an agent recovering in between (or after a crash left it) must not take the temporary
    directory for a version (seen: recovery started ``.tmp-1-3mclofsb``, SPAWN_ERROR)."""
    rd = ReleaseDir(tmp_path, "a")
    for name in ("1", "2", ".tmp-3-3mclofsb"):
        (rd.releases / name).mkdir(parents=True)
        (rd.releases / name / ".dcdeploy-release.json").write_text("{}")
    (rd.releases / "4").mkdir()  # no marker: not complete
    assert rd.installed() == ["1", "2"]
