"""`c2am pull` and `c2am push`: weights from and to the Hugging Face Hub."""
from __future__ import annotations

from typing import Optional

import typer

from ..runtime.errors import C2AMError
from .options import friendly


@friendly
def pull(
    spec: Optional[str] = typer.Argument(None, metavar="NAME|REPO_ID[@REV]", help="A registry name or a Hub repo id, optionally @revision."),
    list_: bool = typer.Option(False, "--list", help="Show the registry and which models are cached here."),
    force: bool = typer.Option(False, "--force", help="Download again even if cached."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: HF_TOKEN or the saved login)."),
):
    """Fetch C2AM weights (model.safetensors, config.json, model card) from the Hugging Face Hub; print the local path.

    \b
    Example: c2am pull org/c2am-resnet50@v1.0   then   c2am localize ./images --weights hf://org/c2am-resnet50@v1.0

    Offline (HF_HUB_OFFLINE=1) the cached copy is used; a registry name's sha256 is always verified.
    """
    from ..hub.download import list_registry, pull as run_pull

    if list_:
        typer.echo("name\tsource\tbackbone\tinput size\tlicence\tlocal path")
        for row in list_registry():
            where = str(row.local_path) if row.local_path else ("missing" if row.source.startswith("shipped") else "not cached")
            typer.echo(f"{row.name}\t{row.source}\t{row.backbone}\t{row.input_size}\t{row.license}\t{where}")
        return
    if spec is None:
        raise C2AMError("give a registry name or a Hub repo id (or --list)")
    typer.echo(str(run_pull(spec, token=token, force_download=force)))


@friendly
def push(
    run_dir: str = typer.Argument(..., help="Run folder, .safetensors file or registry name."),
    repo_id: str = typer.Argument(..., help="Hub repo id, e.g. your-name/c2am-resnet50 (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    license: Optional[str] = typer.Option(None, "--license", help="Licence id for the model card (default: the one in the config, else 'other')."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: HF_TOKEN or the saved login)."),
):
    """Upload model.safetensors, config.json and a generated model card to the Hugging Face Hub.

    \b
    Example: c2am push runs/r50 your-name/c2am-resnet50 --license apache-2.0
    """
    from ..hub.push import push as run_push

    info = run_push(run_dir, repo_id, private=private, token=token, license=license)
    typer.echo(f"pushed to {info.commit_url}")
