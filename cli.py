"""vilbert-data: images -> region features -> task shards -> ViLBERT training -> evaluation.

A thin typer app: each command parses its options and calls one library function, so tests and
users can call the same functions from Python. Heavy imports (torch, ray) happen inside the
commands so that `--help` stays fast.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

import typer

app = typer.Typer(
    name="vilbert-data",
    help=(
        "From a folder of images to a trained and evaluated ViLBERT.\n\n"
        "Steps: extract (region features) -> shard (join with annotations) -> train -> eval.\n\n"
        "Example: vilbert-data extract --images photos/ --out feats/"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _version_callback(value: bool) -> None:
    """Print the installed version and exit."""
    if value:
        try:
            typer.echo(f"vilbert-data {version('vilbert-data')}")
        except PackageNotFoundError:
            typer.echo("vilbert-data (not installed)")
        raise typer.Exit()


@app.callback()
def main(
    version_: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """vilbert-data command-line interface."""


# ---------------------------------------------------------------- extract (owner: pipelines/extract)
# COMMAND: extract


# ---------------------------------------------------------------- inspect (owner: pipelines/extract)
# COMMAND: inspect


# ---------------------------------------------------------------- shard, vocab (owner: pipelines/shard)
# COMMAND: shard
# COMMAND: vocab


# ---------------------------------------------------------------- train (owner: vilbert_core/training)
# COMMAND: train


# ---------------------------------------------------------------- eval, explain (owner: vilbert_core/evaluation)
# COMMAND: eval
# COMMAND: explain


# ---------------------------------------------------------------- demo (owner: README/demo)
# COMMAND: demo


if __name__ == "__main__":
    app()
