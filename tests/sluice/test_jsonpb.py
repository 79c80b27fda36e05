from __future__ import annotations

import pytest

from sluice import jsonpb
from sluice.v1 import ingest_pb2, messages_pb2


def test_short_and_full_enum_names_in_short_out() -> None:
    for spelling in ("bulk", "TIER_BULK"):
        msg = jsonpb.parse({"tier": spelling}, ingest_pb2.SendRequest)
        assert msg.tier == messages_pb2.TIER_BULK
        assert jsonpb.to_dict(msg) == {"tier": "bulk"}


def test_violations_name_dotted_paths() -> None:
    with pytest.raises(jsonpb.JsonError) as exc:
        jsonpb.parse(
            {
                "to": [{"email": "a@b.test"}, {"email": 5}, {"mail": "x"}],
                "tier": "urgent",
                "headers": {"X-A": 1},
                "subject": ["x"],
            },
            ingest_pb2.SendRequest,
        )
    assert sorted(exc.value.violations) == sorted(
        [
            ("to[1].email", "must be a string"),
            ("to[2].mail", "unknown field"),
            ("tier", 'must be one of "critical", "transactional", "bulk"'),
            ("headers.X-A", "must be a string"),
            ("subject", "must be a string"),
        ]
    )


def test_body_must_be_object() -> None:
    with pytest.raises(jsonpb.JsonError) as exc:
        jsonpb.parse([1], ingest_pb2.SendRequest)
    assert exc.value.violations == [("body", "must be a JSON object")]
