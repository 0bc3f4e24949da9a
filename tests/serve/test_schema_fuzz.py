"""Fuzzing from the API's own schema: schemathesis reads ``/openapi.json`` of a real ``python -m selfxit serve``
process and generates requests for every route and field, valid ones (which must be answered: 2xx, or
401/409 where the route says so) and invalid ones (which must be refused with a 4xx). Every response must
be no 5xx, and conform to the schema: status documented, content type, body schema, headers (503 carries
``Retry-After``). A bounded number of examples per route and mode keeps it under a minute.

Image bodies (multipart, or one raw image/jpeg or image/png) are the one place the schema cannot say what is
valid (any bytes are a "binary"), so there a valid-by-schema request may be refused (400: cannot decode)
without failing the run.
"""
import pytest

schemathesis = pytest.importorskip("schemathesis")

TOKEN = "schema-fuzz-admin-token-01"
EXAMPLES = {"POST /v1/predict": 15, "POST /v1/reload": 6}  # others take no input: one example is all there is
REFUSED = ["400", "401", "404", "405", "408", "413", "415", "422"]  # how invalid data may be refused


@pytest.fixture(scope="module")
def server(reliability, quick_bundle):
    limits = ["--max-batch", "4", "--max-body-bytes", "1000000", "--read-timeout-s", "5", "--admin-token", TOKEN]
    with reliability.ServeProcess(quick_bundle, "cifar_resnet20", limits) as srv:
        yield srv


@pytest.mark.slow
def test_every_route_fuzzed_from_the_openapi_schema_gets_no_5xx_and_conforms(server):
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.config import SchemathesisConfig
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    config = SchemathesisConfig.from_dict({"checks": {"negative_data_rejection": {"expected-statuses": REFUSED}}})
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json", config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {
        "POST /v1/predict", "GET /healthz", "GET /v1/monitor", "GET /metrics", "POST /v1/reload"}
    calls: dict[str, int] = {}

    def fuzz(op, label: str, mode):
        @settings(max_examples=EXAMPLES.get(label, 3), deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case):
            calls[label] = calls.get(label, 0) + 1
            images = case.media_type == "multipart/form-data" or (case.media_type or "").startswith("image/")
            excluded = [positive_data_acceptance] if images else []
            case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60, excluded_checks=excluded)

        try:
            run()
        except Unsatisfiable:  # no invalid input exists for a route that takes none
            assert mode == GenerationMode.NEGATIVE and label.startswith("GET")

    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(op, f"{op.method.upper()} {op.path}", mode)
    assert calls["POST /v1/predict"] >= 20 and all(calls.get(label) for label in EXAMPLES), calls
    assert "Traceback" not in server.log_text()
