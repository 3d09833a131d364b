"""Pure pieces of the project's own services."""

from __future__ import annotations

import base64

from app.devstack.kafka import new_cluster_id


def test_cluster_ids_are_16_random_bytes_that_never_start_with_a_dash() -> None:
    ids = [new_cluster_id() for _ in range(5000)]  # one in 64 plain ids starts with "-"
    assert not [cluster_id for cluster_id in ids if cluster_id.startswith("-")]
    assert len(set(ids)) == len(ids)
    assert {len(base64.urlsafe_b64decode(cluster_id + "==")) for cluster_id in ids} == {16}
