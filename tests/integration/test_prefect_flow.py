"""The Prefect flow drives the DVC stages against the session's Prefect server (``prefect_harness``)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_flow_skips_up_to_date_stages_and_reruns_changed_ones(
    ci_workspace: Path, prefect_harness, tmp_path
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

    # one flow run shows both: the items whose code changed rerun, every other item (all run by
    # `dvc repro`) is up to date — including those downstream of the rerun items, whose outputs
    # come out byte-identical (the cheapest change that reruns something: prepare's code)
    with open(ws / "stages" / "prepare.py", "a") as f:
        f.write("# changed by test_prefect_flow\n")
    results = pipeline(root=str(ws))
    assert set(results) == set(order)
    ran = {k for k, v in results.items() if v == "ran"}
    assert ran == {k for k in order if k.startswith("prepare@")}, results
    assert all(v == "skipped" for k, v in results.items() if k not in ran), results

    # the dashboard step: the page, and the headline table as a Prefect table artifact
    page = ws / "reports" / "index.html"
    assert "Accuracy per method and task" in page.read_text()
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["headline"]))
        )
    # the session's one Prefect server also holds other tests' flow runs (some without an
    # evaluation, whose "headline" is markdown): this run's artifact is the newest
    assert arts and max(arts, key=lambda a: a.created).type == "table"
