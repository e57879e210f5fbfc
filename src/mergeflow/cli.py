"""``mergeflow`` command line: thin wrappers over the library and the pipeline flow."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mergeflow.engine.cli import merge_command
from mergeflow.runtime import tune_malloc

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
app.command("merge")(merge_command)


@app.callback()
def _process_setup() -> None:
    """Process-wide setup before any command (see :func:`mergeflow.runtime.tune_malloc`)."""
    tune_malloc()


def _fail(err: Exception) -> None:
    console.print(f"[red]error:[/red] {err}")
    raise typer.Exit(2)


@app.command()
def tasks() -> None:
    """List the task catalogue: name, classes, source package, licence."""
    from mergeflow import data

    t = Table("task", "classes", "source", "licence")
    for name in data.available_tasks(include_optional=True):
        s = data.get_task(name)
        t.add_row(name, ", ".join(s.label_names), s.source, s.licence)
    console.print(t)


@app.command()
def methods() -> None:
    """List the merge methods with their hyperparameters and papers."""
    from mergeflow import methods as m

    t = Table("method", "hyperparameters", "paper")
    for name in m.available():
        spec = m.get(name)
        fields = ", ".join(f"{k}={v.default!r}" for k, v in spec.params_model.model_fields.items())
        t.add_row(name, fields, spec.paper)
    console.print(t)


@app.command("check-params")
def check_params(
    path: Annotated[Path, typer.Argument(help="params file to validate")] = Path("params.yaml"),
) -> None:
    """Validate a params file; exit 2 naming every bad key."""
    from mergeflow.config import ConfigError, load_params
    from mergeflow.methods.params import check_config

    try:
        p = load_params(path)
        check_config(p, str(path))
    except ConfigError as err:
        _fail(err)
    console.print(f"{path}: ok ({len(p.tasks)} tasks, finetune.mode={p.finetune.mode})")


@app.command("use-profile")
def use_profile(
    profile: Annotated[Path, typer.Argument(help="overrides file, e.g. configs/ci.yaml")],
    params: Annotated[Path, typer.Option(help="params file to update in place")] = Path(
        "params.yaml"
    ),
) -> None:
    """Merge a profile's overrides into params.yaml, keeping its comments and layout.

    Validated before anything is written; only the keys the profile changes are rewritten, the
    previous file is kept as ``<params>.bak``, and both files are replaced atomically.
    """
    from mergeflow.config import ConfigError, deep_merge, parse_params
    from mergeflow.io import write_bytes_atomic
    from mergeflow.methods.params import check_config
    from mergeflow.yamlio import (
        YAMLInputError,
        dump_yaml_roundtrip,
        load_yaml,
        load_yaml_file,
        load_yaml_roundtrip,
        update_roundtrip,
    )

    try:
        doc, text = load_yaml_roundtrip(params)
        override = load_yaml_file(profile)
        if override is None:
            override = {}
        for path, value in ((params, doc), (profile, override)):
            if not isinstance(value, dict):
                got = {list: "a list", type(None): "an empty file"}.get(type(value))
                raise ConfigError(
                    f"{path}: expected a mapping of params.yaml sections at the top level, "
                    f"got {got or type(value).__name__}"
                )
        source = f"{params} + {profile}"
        merged = deep_merge(load_yaml(text, str(params)), override)
        check_config(parse_params(merged, source=source), source)
        changed = update_roundtrip(doc, override)
    except (ConfigError, YAMLInputError) as err:
        _fail(err)
    except OSError as err:
        _fail(ConfigError(f"{err.filename or profile}: cannot read ({err.strerror or err})"))
    if not changed:
        console.print(f"{params}: already as {profile}; nothing to change")
        return
    backup = params.with_name(params.name + ".bak")
    write_bytes_atomic(backup, text.encode())
    write_bytes_atomic(params, dump_yaml_roundtrip(doc, text).encode())
    console.print(
        f"{params}: applied {profile} ({len(changed)} value(s) changed: {', '.join(changed)}); "
        f"the previous version is in {backup}"
    )


@app.command()
def run(
    root: Annotated[Path, typer.Option(help="the mergeflow repo (with dvc.yaml)")] = Path("."),
) -> None:
    """Run the whole pipeline as a Prefect flow (ephemeral local API unless PREFECT_API_URL).

    While it runs: a live table of the stage items in a terminal (step, loss, rate, time left of
    each running item), plain progress lines in a log; at the end one summary block (wall time
    per stage, what was up to date, the best merge with its interval, where to look).
    """
    # Prefect's ephemeral API gets 20 s to start by default; its first start (DB migrations)
    # on a busy 2-core machine takes longer, so the whole run would fail before any stage.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    sys.path.insert(0, str(root.resolve()))
    from flows.pipeline import pipeline

    try:
        pipeline(root=str(root.resolve()))  # prints the summary block itself (also on a worker)
    except Exception as err:  # noqa: BLE001 - the flow logged the details; one line here
        lines = str(err).strip().splitlines()
        _fail(RuntimeError(f"{lines[0] if lines else type(err).__name__} (details above)"))


@app.command()
def pull(
    ref: Annotated[str, typer.Argument(help="an MLflow flow-run id or a git revision")],
    root: Annotated[Path, typer.Option(help="a clean clone of the workspace")] = Path("."),
) -> None:
    """Restore exactly the artifacts of a run from the S3 remote (MERGEFLOW_S3_* env); md5-checked."""
    from mergeflow.remote import RemoteError
    from mergeflow.remote import pull as pull_run
    from mergeflow.tracking import TrackingUnavailableError

    try:
        outs = pull_run(ref, root)
    except (RemoteError, TrackingUnavailableError) as err:
        _fail(err)
    console.print(f"restored {len(outs)} output(s) of {ref}, md5s match dvc.lock")


@app.command()
def report(
    root: Annotated[Path, typer.Option(help="the workspace (with metrics/, dvc.lock)")] = Path("."),
    out: Annotated[
        Path | None, typer.Option(help="page to write [default: <root>/reports/index.html]")
    ] = None,
    figures: Annotated[
        Path | None, typer.Option(help="also write each chart as <id>.svg into this directory")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="replace an existing file at --out that is not a report")
    ] = False,
) -> None:
    """Write the dashboard: a self-contained HTML page of tables and charts (opens offline).

    Missing inputs (a failed stage, no MLflow history) become notices on the page, not errors.
    """
    from mergeflow.io import OutputError
    from mergeflow.report import write_report

    if not root.is_dir():
        _fail(FileNotFoundError(f"workspace {root} does not exist"))
    page = out or root / "reports" / "index.html"
    try:
        rep = write_report(root, page, figures_dir=figures, force=force)
    except (OutputError, OSError) as err:
        _fail(err)
    for n in rep.missing:
        console.print(f"[yellow]missing:[/yellow] {n.what} — {n.why}")
    console.print(f"wrote {page} ({len(rep.figures)} charts, {len(rep.missing)} notice(s))")


@app.command("export-task")
def export_task(
    archive: Annotated[Path, typer.Option(help="TALL archive dir (artifacts/compressed)")],
    task: Annotated[str, typer.Option(help="task to reconstruct")],
    out: Annotated[Path, typer.Option(help="model dir to write (from_pretrained loads it)")],
    base: Annotated[
        Path | None,
        typer.Option(help="base model dir: θ_0 if the archive references it, and the tokenizer"),
    ] = Path("models/base"),
    force: Annotated[
        bool, typer.Option(help="replace an existing non-empty directory or a file at --out")
    ] = False,
) -> None:
    """Rebuild one expert θ_t = θ_0 + m_t ⊙ τ_MTL from a TALL archive as a Hugging Face model."""
    from mergeflow.compression import ArchiveError, export
    from mergeflow.io import CheckpointError, OutputError

    try:
        base_dir = base if base is not None and base.exists() else None
        export(archive, task, out, base_dir, force=force)
    except (ArchiveError, CheckpointError, OutputError, OSError) as err:
        _fail(err)
    console.print(f"wrote {out} (task {task} from {archive})")


@app.command("lora-lego")
def lora_lego(
    adapters: Annotated[list[Path], typer.Argument(help="peft LoRA adapter dirs to merge")],
    out: Annotated[Path, typer.Option(help="adapter dir to write (PeftModel loads it)")],
    rank: Annotated[int, typer.Option(help="target rank k (clusters per module)")] = 8,
    seed: Annotated[int, typer.Option(help="k-means seed")] = 0,
    force: Annotated[
        bool, typer.Option(help="replace an existing non-empty directory or a file at --out")
    ] = False,
) -> None:
    """Merge LoRA adapters by clustering their rank-1 units (LoRA-LEGO, Zhao et al. ICLR 2025)."""
    from mergeflow.compression.lora_lego import write_adapter
    from mergeflow.models.hf import ModelError
    from mergeflow.tensors import MergeError

    try:
        info = write_adapter({str(p): p for p in adapters}, out, rank, seed=seed, force=force)
    except (MergeError, ModelError, OSError) as err:  # MergeError includes OutputError
        _fail(err)
    console.print(
        f"wrote {out}: {info['units_pooled']} rank-1 units → rank {rank} "
        f"(dropped: {', '.join(info['dropped_tensors']) or 'none'})"
    )


if __name__ == "__main__":
    app()
