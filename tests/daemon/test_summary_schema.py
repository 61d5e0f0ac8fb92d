"""The summary message's JSON Schema in docs/ is the one ``SummaryMessage`` gives (readers in other
languages validate with it), so the two cannot drift apart."""

from __future__ import annotations

import json
from pathlib import Path

from nanoseg_daemon.summary_schema import SummaryMessage

SCHEMA = Path(__file__).resolve().parents[2] / "docs" / "summary_message.schema.json"


def test_the_documented_json_schema_is_the_models() -> None:
    assert json.loads(SCHEMA.read_text()) == SummaryMessage.model_json_schema(), (
        "docs/summary_message.schema.json is stale; write it again with: python -c \"import json; "
        "from nanoseg_daemon.summary_schema import SummaryMessage; print(json.dumps("
        "SummaryMessage.model_json_schema(), indent=1))\" > docs/summary_message.schema.json")


def test_a_real_summary_validates_against_the_documented_schema() -> None:
    """What a reader in another language does: a summary the daemon writes, checked with a
    generic JSON Schema validator against the file."""
    import jsonschema

    from nanoseg_daemon.publish import summary_body
    from tests.daemon.test_sinks import result

    schema = json.loads(SCHEMA.read_text())
    for n_wires in (0, 3):
        jsonschema.validate(json.loads(summary_body(result("run-a", 1, n_wires))), schema)
    bad = json.loads(summary_body(result("run-a", 1)))
    bad["count"] = "three"
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError as err:
        assert list(err.absolute_path) == ["count"]
    else:
        raise AssertionError("a count that is not a number passed the schema")
