"""`featsync serve` as a command: its options, their checks, and the run until a signal.

The server itself is featsync.localcontext.server; this is what the command line
adds: credentials from the options or the environment, fault injection, the limits
against hostile clients, the shared pool of extraction workers, and the signals.
"""

from __future__ import annotations

import argparse
from typing import Any

from featsync import logs
from featsync.config import ENV_CLIENT_ID, ENV_CLIENT_SECRET
from featsync.errors import Fatal


def add_parser(sub: Any) -> None:
    """The `serve` subcommand and its options, on argparse's subparsers `sub`."""
    srv = sub.add_parser(
        "serve",
        help="serve an embedded search context over the Aspose wire protocol",
        description="Serve embedded search contexts over the Aspose Imaging Cloud wire "
        "protocol. Credentials: --client-id / --client-secret-file, else "
        "$FEATSYNC_CLIENT_ID / $FEATSYNC_CLIENT_SECRET.",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    srv.add_argument("--port", type=int, default=8080, help="port (0: any free port)")
    srv.add_argument("--data", default="featsync-serve", metavar="DIR", help="contexts live here")
    srv.add_argument("--threads", type=int, default=16, help="requests served at once")
    srv.add_argument("--client-id", default=None, help="the client ID tokens are issued to")
    srv.add_argument("--client-secret-file", default=None, metavar="PATH")
    srv.add_argument("--token-lifetime", type=float, default=3600.0, metavar="SECONDS")
    srv.add_argument("--log-format", choices=["auto", "json", "console"], default="auto")
    srv.add_argument(
        "--access-log", action="store_true", help="log every request (http_request events)"
    )
    srv.add_argument(
        "--max-pixels",
        type=int,
        default=250_000_000,
        metavar="N",
        help="refuse images with more pixels (decompression bombs; default 250 million)",
    )
    srv.add_argument(
        "--extract-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="stop one image's feature extraction after this long (default 60)",
    )
    limits = srv.add_argument_group("limits against hostile clients")
    limits.add_argument(
        "--connection-limit",
        type=int,
        default=1000,
        metavar="N",
        help="connections held at once (the open-files limit is raised to fit)",
    )
    limits.add_argument(
        "--idle-timeout",
        type=int,
        default=30,
        metavar="SECONDS",
        help="close a connection idle this long (whole seconds)",
    )
    limits.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="close a connection whose request line and headers take longer than this",
    )
    limits.add_argument(
        "--token-failures",
        type=int,
        default=10,
        metavar="N",
        help="failed token requests an address may make in a burst before getting 429",
    )
    limits.add_argument(
        "--token-failure-interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="after the burst, one more failed token request per this interval",
    )
    faults = srv.add_argument_group("fault injection (off by default)")
    faults.add_argument("--latency", type=float, default=0.0, metavar="SECONDS")
    faults.add_argument(
        "--error-rate",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="answer this share of API calls with 500 or 503",
    )
    faults.add_argument(
        "--throttle-rate",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="answer this share with 429 and Retry-After",
    )
    faults.add_argument("--retry-after", type=float, default=1.0, metavar="SECONDS")
    faults.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="cut this share of answers off after the operation ran",
    )
    faults.add_argument("--seed", type=int, default=None, help="seed for the fault dice")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT; exit 0 then. Fatal for a bad option or a port in use."""
    import os
    import signal

    from featsync.localcontext.auth import TokenBudget
    from featsync.localcontext.extractor import Extractor, default_workers
    from featsync.localcontext.server import Faults, create_app, serve
    from featsync.localcontext.transport import Limits
    from featsync.model import Secret

    client_id = args.client_id or os.environ.get(ENV_CLIENT_ID)
    secret = os.environ.get(ENV_CLIENT_SECRET)
    if args.client_secret_file:
        try:
            with open(args.client_secret_file, encoding="utf-8") as fh:
                secret = fh.read().strip()
        except OSError as exc:
            raise Fatal(
                f"--client-secret-file {args.client_secret_file!r}: {exc.strerror}"
            ) from None
    if not client_id or not secret:
        raise Fatal(
            f"serve needs a client ID and secret: --client-id and --client-secret-file, "
            f"or {ENV_CLIENT_ID} and {ENV_CLIENT_SECRET}"
        )
    for name in ("error_rate", "throttle_rate", "drop_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise Fatal(f"--{name.replace('_', '-')} must be a share from 0 to 1")
    for name in ("connection_limit", "idle_timeout", "token_failures"):
        if getattr(args, name) < 1:
            raise Fatal(f"--{name.replace('_', '-')} must be at least 1")
    if not 1 <= args.max_pixels <= 10**10:
        raise Fatal("--max-pixels must be a whole number from 1 to 10000000000")
    if not 1.0 <= args.extract_timeout <= 3600.0:  # as [context] extract_timeout; nan fails
        raise Fatal("--extract-timeout must be a number of seconds from 1 to 3600")
    for name in ("header_timeout", "token_failure_interval"):
        if not 0 < getattr(args, name) <= 86400:  # inf and nan fail too
            raise Fatal(f"--{name.replace('_', '-')} must be a number of seconds up to 86400")
    faults = Faults(
        latency_s=args.latency,
        error_rate=args.error_rate,
        throttle_rate=args.throttle_rate,
        retry_after_s=args.retry_after,
        drop_rate=args.drop_rate,
        seed=args.seed,
    )
    limits = Limits(args.connection_limit, args.idle_timeout, args.header_timeout)
    log = logs.get()
    logs.capture_stdlib()  # waitress and Flask log through the stdlib: make it JSON too
    app = create_app(
        args.data,
        client_id,
        Secret(secret),
        args.token_lifetime,
        faults,
        log,
        args.access_log,
        TokenBudget(args.token_failures, args.token_failure_interval),
        # one pool of extraction workers for every context, no more workers than CPUs
        # callers wait at most 10 s for a worker, then get 503 (threads stay free)
        Extractor(
            default_workers(args.threads),
            args.extract_timeout,
            args.max_pixels,
            max_wait=10.0,
        ),
    )

    def ready(host: str, port: int, limits: Limits) -> None:
        log.info(
            "serve_started",
            url=f"http://{host}:{port}",
            data=os.path.abspath(args.data),
            faults=faults.any,
            connection_limit=limits.connection_limit,
            idle_timeout_s=limits.idle_timeout_s,
            header_timeout_s=limits.header_timeout_s,
        )
        print(f"serving on http://{host}:{port}", flush=True)

    stopped_by: list[str] = []

    def stop(signum: int, _frame: object) -> None:
        # waitress's loop catches the KeyboardInterrupt and returns: which signal it was
        # is kept here. A second signal while stopping is ignored, so the clean-up (a few
        # seconds at most) runs to the end and serve_stopped is always logged.
        first = not stopped_by
        stopped_by.append(signal.Signals(signum).name)
        if first:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        serve(
            app,
            args.host,
            args.port,
            args.threads,
            ready,
            quiet_drops=args.drop_rate > 0,
            limits=limits,
            log=log,
        )
    except KeyboardInterrupt:
        pass  # a signal outside waitress's loop (while starting or closing)
    except OSError as exc:
        raise Fatal(f"cannot serve on {args.host}:{args.port}: {exc.strerror or exc}") from None
    log.info("serve_stopped", signal=stopped_by[0] if stopped_by else None)
    return 0
