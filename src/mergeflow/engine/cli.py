"""``mergeflow merge``: the streaming merge engine on the command line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(stderr=True)


def _parse_sets(items: list[str]) -> dict:
    from mergeflow.tensors import MergeError
    from mergeflow.yamlio import YAMLInputError, load_yaml

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MergeError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = load_yaml(value, f"--set {key.strip()}")
        except YAMLInputError as err:
            raise MergeError(str(err)) from None
    return out


def _parse_experts(items: list[str]) -> dict[str, str]:
    from mergeflow.tensors import MergeError

    out: dict[str, str] = {}
    for item in items:
        task, sep, path = item.partition("=")
        if not sep or not task or not path:
            raise MergeError(f"--expert expects task=PATH, got {item!r}")
        if task in out:
            raise MergeError(f"--expert: task '{task}' given twice")
        out[task] = path
    return out


def merge_command(
    method: Annotated[
        str | None, typer.Option(help="merge method (see `mergeflow methods`)")
    ] = None,
    base: Annotated[str | None, typer.Option(help="base checkpoint: dir, file or s3://…")] = None,
    expert: Annotated[list[str] | None, typer.Option(help="task=PATH, repeat per expert")] = None,
    out: Annotated[
        str | None, typer.Option(help="output directory or s3://bucket/prefix (written atomically)")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="hyperparameter key=value (YAML value)")
    ] = None,
    recipe: Annotated[Path | None, typer.Option(help="YAML recipe; flags override it")] = None,
    workers: Annotated[int | None, typer.Option(help="read-ahead threads (0 = none)")] = None,
    storage_options: Annotated[
        str | None, typer.Option(help="fsspec options as JSON, e.g. an S3 endpoint_url")
    ] = None,
    progress: Annotated[bool, typer.Option(help="show the progress bar")] = True,
    force: Annotated[
        bool, typer.Option("--force", help="replace an existing non-empty --out")
    ] = False,
) -> None:
    """Merge experts into a base, streaming tensor by tensor (exit code 2 on bad input)."""
    from pydantic import ValidationError

    from mergeflow.engine.recipe import Recipe, load_recipe
    from mergeflow.engine.run import merge_checkpoints
    from mergeflow.io import CheckpointError
    from mergeflow.remote import RemoteError
    from mergeflow.tensors import MergeError

    try:
        fields: dict = load_recipe(recipe).model_dump() if recipe else {}
        if method:
            fields["method"] = method
        if base:
            fields["base"] = base
        if expert:
            fields["experts"] = _parse_experts(expert)
        if out:
            fields["out"] = out
        if set_:
            fields["params"] = {**fields.get("params", {}), **_parse_sets(set_)}
        if workers is not None:
            if workers < 0:
                raise MergeError(f"--workers: must be 0 or more (got {workers})")
            fields["workers"] = workers
        if storage_options:
            try:
                fields["storage_options"] = json.loads(storage_options)
            except json.JSONDecodeError as exc:
                raise MergeError(f"--storage-options is not JSON: {exc}") from None
            if not isinstance(fields["storage_options"], dict):
                raise MergeError(
                    '--storage-options must be a JSON object, e.g. {"client_kwargs": '
                    '{"endpoint_url": "http://127.0.0.1:9000"}}'
                )
        missing = [f for f in ("method", "base", "out") if not fields.get(f)]
        if missing:
            raise MergeError(f"missing --{missing[0]} (or set it in a --recipe)")
        fields.setdefault("experts", {})
        try:
            r = Recipe(**fields)
        except ValidationError as exc:
            raise MergeError(
                "; ".join(
                    f"--{'.'.join(str(x) for x in e['loc']).replace('_', '-')}: {e['msg']}"
                    for e in exc.errors()
                )
            ) from None
        adapters = [t for t, p in r.experts.items() if (Path(p) / "adapter_config.json").is_file()]
        if adapters:  # peft LoRA/DoRA adapters: merged in weight space (mergeflow.engine.lora)
            from mergeflow.engine.lora import merge_lora_adapters

            if len(adapters) != len(r.experts):
                raise MergeError(
                    f"--expert '{adapters[0]}' is a peft adapter, the others are not: merge "
                    "adapters with adapters, checkpoints with checkpoints"
                )
            merge_lora_adapters(r.experts, r.out, r.method, base=r.base, force=force, **r.params)
            console.print(f"merged {len(adapters)} peft adapters with {r.method} into {r.out}")
            return
        rep = merge_checkpoints(
            r.method,
            r.base,
            r.experts,
            r.out,
            r.params,
            storage_options=r.storage_options,
            workers=r.workers,
            max_shard_bytes=r.max_shard_bytes,
            progress=progress,
            force=force,
        )
    except (MergeError, CheckpointError, RemoteError) as err:
        console.print(f"[red]error:[/red] {err}", soft_wrap=True)
        raise typer.Exit(2) from None
    gb = rep.bytes_read / 1e9
    console.print(
        f"merged {len(rep.merged)} tensors with {rep.method} into {rep.out} in "
        f"{rep.seconds:.1f} s ({gb:.2f} GB read, {gb / max(rep.seconds, 1e-9):.2f} GB/s, "
        f"{rep.passes} pass{'es' if rep.passes > 1 else ''})"
    )
    if rep.copied:
        console.print(
            f"copied from the base unchanged ({len(rep.copied)}): {', '.join(rep.copied)}"
        )
    if rep.side_files:
        console.print(f"carried over: {', '.join(rep.side_files)}")
