"""The Prefect flow drives the DVC stages against a real (temporary) Prefect API."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def prefect_api():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):  # generous: a loaded 2-core box
        yield


def test_flow_skips_up_to_date_stages_and_reruns_changed_ones(
    ci_workspace: Path, prefect_api, tmp_path
):
    """Runs on its own copy of the ci workspace: it edits params.yaml, and the session-wide
    workspace is copied by later tests (e2e safety), whose results must not depend on order."""
    import sys

    from tests.conftest import copy_workspace

    ws = copy_workspace(ci_workspace, tmp_path / "ws")
    sys.path.insert(0, str(ws))
    from flows.pipeline import pipeline, stage_order

    order = stage_order(ws)
    assert order.index("base") < order.index("finetune@rotten_tomatoes") < order.index("evaluate")
    assert order[-1] == "audit"  # the merge-safety audit runs after evaluate (a no-op when off)

    results = pipeline(root=str(ws))
    assert set(results) == set(order)
    assert set(results.values()) == {"skipped"}

    params_file = ws / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["evaluate"]["batch_size"] = 32
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    results = pipeline(root=str(ws))
    assert results["evaluate"] == "ran"
    assert results["audit"] == "ran"  # it also reads evaluate.batch_size
    assert all(v == "skipped" for k, v in results.items() if k not in ("evaluate", "audit"))

    # the dashboard step: the page, and the headline table as a Prefect table artifact
    page = ws / "reports" / "index.html"
    assert "Accuracy per method and task" in page.read_text()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["headline"]))
        )
    assert arts and {a.type for a in arts} == {"table"}
