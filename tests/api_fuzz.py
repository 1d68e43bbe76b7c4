"""schemathesis over the operations of the REST API's served OpenAPI document.

Used by tests/test_api_rest.py (every route of one node) and tests/test_cluster_view.py
(the cluster routes of a real cluster). Data that fits the document and data that does
not, under schemathesis' default checks: no 5xx, status codes, content types, headers
and bodies as documented, bad data refused. Needs schemathesis 4 (its Python API), an
optional test dependency (setup.cfg extras "test"): `schemathesis` is None without it.
"""

try:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
except ImportError:
    schemathesis = None

MISSING = "schemathesis is not installed (pip install .[test])"


def operations(url, auth, prefix="/"):
    """The operations of the document at url whose path starts with prefix (but the
    document's own: schemathesis leaves out where it read it)."""
    schema = schemathesis.openapi.from_url(url, headers=auth)
    found = [result.ok() for result in schema.get_all_operations()]
    return [operation for operation in found if operation.path.startswith(prefix)]


def fuzz_operations(found, auth, examples, timeout):
    """Each operation with `examples` cases per generation mode. The token is fixed:
    left to schemathesis, nearly every request would be a 401 and never reach a route
    (the REST tests try missing and wrong tokens)."""
    from schemathesis.generation import GenerationMode

    def fuzz(strategy):
        @settings(max_examples=examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case):
            case.call_and_validate(timeout=timeout)
        run()

    for operation in found:
        fuzz(operation.as_strategy(generation_mode=GenerationMode.POSITIVE, headers=auth))
        # Health and the cluster's node list take nothing (but the token) to get wrong.
        if any(p.name != "Authorization" for p in operation.iter_parameters()):
            fuzz(operation.as_strategy(generation_mode=GenerationMode.NEGATIVE,
                                       headers=auth))
