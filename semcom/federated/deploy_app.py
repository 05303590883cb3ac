"""The ServerApp a SuperLink runs for `--engine deployment` (deploy.py names it in the app's
pyproject.toml): the FederateConfig and OUT come in the run config, the rest is run_server."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from semedge.semcom.federated.config import FederateConfig
from semedge.semcom.federated.flower_server import run_server

server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = FederateConfig.from_json(str(context.run_config["fed"]))
    run_server(grid, cfg, str(context.run_config["out"]))
