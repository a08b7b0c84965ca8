"""When the agent reads once to learn that the store still admits it (agent/access.py): the
pure decision, table-tested, and the agent.conf key that says whether notifications count.
The real revocation is tests/test_zk_security.py's (a revoked host reports it and hears no
notification)."""

from __future__ import annotations

import pytest

from supervisor_dcdeploy.agent.access import access_check_due, events_prove_access
from supervisor_dcdeploy.agent.config import ConfigError, load

INTERVAL = 60.0


@pytest.mark.parametrize("now, checked, accepted, notified, events_prove, refused, due", [
    # nothing known yet: check at once
    (100.0, None, None, None, True, False, True),
    # the last check is the only proof: due once the interval has passed
    (159.0, 100.0, None, None, True, False, False),
    (160.0, 100.0, None, None, True, False, True),
    # an accepted request renews the proof
    (200.0, 100.0, 150.0, None, True, False, False),
    (210.0, 100.0, 150.0, None, True, False, True),
    # a notification renews it only where the server filters them by read right
    (200.0, 100.0, None, 190.0, True, False, False),
    (200.0, 100.0, None, 190.0, False, False, True),
    (200.0, None, None, 190.0, False, False, True),
    # the newest proof counts, whatever its kind
    (250.0, 100.0, 150.0, 240.0, True, False, False),
    (250.0, 100.0, 240.0, 150.0, False, False, False),
    # refused before: every cycle, however fresh the rest
    (100.0, 99.0, 99.5, 99.9, True, True, True),
])
def test_the_check_is_due_once_the_newest_proof_is_older_than_the_interval(
        now, checked, accepted, notified, events_prove, refused, due):
    got, reason = access_check_due(now, INTERVAL, checked_at=checked, accepted_at=accepted,
                                   notified_at=notified, events_prove=events_prove,
                                   refused=refused)
    assert got is due
    assert reason  # every answer says why


def test_a_revoked_host_is_noticed_within_the_interval_of_its_last_proof():
    """Whatever proofs came before a revocation at ``t``, none comes after it (the store
    refuses our requests and sends no notification), so a cycle at ``t + interval`` or
    later checks, and the check's read is refused."""
    for last in (0.0, 10.0, 59.0, 60.0):
        revoked = last + 0.5
        for now in (revoked + INTERVAL, revoked + INTERVAL + 30):
            due, _ = access_check_due(now, INTERVAL, checked_at=None, accepted_at=last,
                                      notified_at=last, events_prove=True, refused=False)
            assert due


@pytest.mark.parametrize("raw, expected", [
    ("", True), ("true", True), ("Yes", True), ("1", True), ("on", True),
    ("false", False), ("no", False), ("0", False), ("OFF", False),
])
def test_events_prove_access_reads_a_boolean_defaulting_to_true(raw, expected):
    extra = {"store_events_prove_access": raw} if raw else {}
    assert events_prove_access(extra) is expected


def test_a_bad_events_prove_access_value_is_a_clear_config_error(tmp_path):
    conf = tmp_path / "agent.conf"
    conf.write_text("[agent]\nhost = h1\nstore = zk://127.0.0.1:2181/dc\n"
                    f"root = {tmp_path}\ninsecure_unsigned = true\n"
                    "store_events_prove_access = sometimes\n"
                    "[service:api]\nprogram = api\n")
    with pytest.raises(ConfigError, match="store_events_prove_access: 'sometimes'"):
        load(conf)
