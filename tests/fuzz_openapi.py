"""schemathesis against a running spatiAL service: ``python tests/fuzz_openapi.py URL EXAMPLES``.

Every operation of ``URL/docs.json`` gets schema-valid requests, every POST also invalid ones; the checks are: no
server error, only documented status codes, only documented bodies. Prints one JSON line with the counts; exits 1
when a check fails. ``tests/test_serving.py::test_openapi_fuzz`` runs it in a fresh interpreter.
"""

from __future__ import annotations

import json
import sys

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance, status_code_conformance


def fuzz(url: str, examples: int) -> dict:
    schema = schemathesis.openapi.from_url(f"{url}/docs.json")
    counts = {"requests": 0, "5xx": 0}
    operations = [result.ok() for result in schema.get_all_operations()]
    runs = [(op, GenerationMode.POSITIVE) for op in operations]  # schema-valid requests ...
    runs += [(op, GenerationMode.NEGATIVE) for op in operations if op.method.upper() == "POST"]  # ... and invalid ones
    for op, mode in runs:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def one(case) -> None:
            response = case.call_and_validate(checks=[not_a_server_error, status_code_conformance,
                                                      response_schema_conformance], timeout=120)
            counts["requests"] += 1
            counts["5xx"] += response.status_code >= 500

        one()
    return counts | {"operations": len(operations), "paths": sorted({op.path for op in operations})}


if __name__ == "__main__":
    print(json.dumps(fuzz(sys.argv[1], int(sys.argv[2]))))
