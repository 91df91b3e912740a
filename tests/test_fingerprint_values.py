"""Fingerprints are stored with each transaction and compared on a resubmit: their values
must not change between versions, or a resubmit after an upgrade is refused as other
content. These digests were computed by the first released formula."""

from __future__ import annotations

import pytest

from coordinator.fingerprint import fingerprint
from coordinator.model import Options, Status, Trans

SAGA_STEPS = ({"action": "http://a/x", "compensate": "http://a/y"},)


@pytest.mark.parametrize(
    ("trans", "digest"),
    [
        (Trans("g1", "saga", Status.SUBMITTED, steps=SAGA_STEPS, payloads=("{}",)),
         "c097b8fcfc2949b59c4b5b2498405958"),
        # wait_result only says how one request wants its answer: same digest.
        (Trans("g2", "saga", Status.SUBMITTED, steps=SAGA_STEPS, payloads=("{}",),
               options=Options(wait_result=True)),
         "c097b8fcfc2949b59c4b5b2498405958"),
        (Trans("g3", "msg", Status.PREPARED, steps=({"action": "http://b"},), payloads=("p",),
               custom_data='{"delay":3}', query_prepared="http://q",
               options=Options(wait_result=True, timeout_to_fail=5, request_timeout=2,
                               retry_interval=1, retry_limit=4, branch_headers={"X-A": "b"},
                               concurrent=True)),
         "89cd4ad04e25d6fc83717af635774408"),
    ],
)
def test_fingerprint_values_are_stable(trans: Trans, digest: str) -> None:
    assert fingerprint(trans) == digest
