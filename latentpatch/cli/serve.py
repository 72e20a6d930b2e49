"""`latentpatch serve`: a local web app to explore latents, patch and steer interactively.

    latentpatch serve smollm2-135m-res/blocks.15.hook_resid_pre
    latentpatch serve runs/sae-l1 --n-layers 2 --port 8765 --json

One model (the first SAE's, loaded with its weight processing; `--n-layers` keeps its first layers) and
the SAEs named here, fixed for the server's life: requests pick an SAE by index and never name a path.
Bound to 127.0.0.1 unless `--host` says otherwise. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
from typing import Any

from latentpatch.cli.common import SAE_HELP, bounded_int

log = logging.getLogger(__name__)

JSON_OUTPUT = {
    "url": "where the app listens (printed as one line once the port is bound, before serving)",
    "model": "the model's name",
    "n_layers": "its layers (after --n-layers)",
    "saes": "the SAEs served: index, name as given, hook name, d_sae",
}
"""The keys of the one JSON line `--json` prints when the app is ready, documented on the docs' CLI page."""


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand to the `latentpatch` parser."""
    p = subparsers.add_parser("serve", help="a local web app: latents, patching sweeps, steering, circuits",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("saes", nargs="+", metavar="sae", help=SAE_HELP + " (several: the same model)")
    p.add_argument("--model", default=None, help="model name (default: the one the first SAE records)")
    p.add_argument("--n-layers", type=bounded_int(1, 1024), default=None, help="keep only the model's first N layers")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=bounded_int(0, 65535), default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--card-documents", type=bounded_int(1, 10_000), default=48,
                   help="held-out documents the latent cards read (default 48)")
    p.add_argument("--json", action="store_true", help="print one JSON line with the URL once ready")
    p.set_defaults(run=run_serve, json_output=JSON_OUTPUT)


def run_serve(args: argparse.Namespace) -> None:
    _check_installed()
    from latentpatch.app import AppLimits, Workbench, create_app
    from latentpatch.app.server import LOCAL_HOSTS
    from latentpatch.cli.common import resolve_sae
    from patching.model.loading import load_model_for

    saes = [resolve_sae(name) for name in args.saes]  # every SAE before the model loads
    model = load_model_for(saes[0], args.model, n_layers=args.n_layers)
    model.eval()
    bench = Workbench(model, saes, [str(name) for name in args.saes], limits=AppLimits(card_documents=args.card_documents))
    listener = _bind(args.host, args.port)
    wildcard = args.host in ("0.0.0.0", "::", "")
    if args.host not in LOCAL_HOSTS:
        log.warning("serving on %s: reachable from other machines; the app has no authentication", args.host)
    app = create_app(bench, allowed_hosts=("*",) if wildcard else (args.host, *LOCAL_HOSTS))
    host, port = listener.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/"
    info = bench.info()
    line = {"url": url, "model": info["model"], "n_layers": info["n_layers"], "saes": info["saes"]}
    print(json.dumps(line) if args.json else f"latentpatch serve: {url} (model {info['model']}, "
          f"{len(saes)} SAE{'s' if len(saes) > 1 else ''}); Ctrl-C stops it", flush=True)
    _serve(app, listener)


def _check_installed() -> None:
    from patching.errors import PatchingError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise PatchingError(f"latentpatch serve needs FastAPI and uvicorn ({err.name} is missing): "
                            "pip install 'latentpatch[app]'") from err


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before serving so that the URL printed is the one that works (port 0 too)."""
    from patching.errors import PatchingError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as err:
        listener.close()
        raise PatchingError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port") from err
    return listener


def _serve(app: Any, listener: socket.socket) -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[listener])
    finally:
        listener.close()
    if server.should_exit and not server.started:
        print("latentpatch serve: the server did not start", file=sys.stderr)
