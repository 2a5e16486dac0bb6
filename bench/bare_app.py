"""The ingest baseline: a Flask endpoint that reads a beacon and answers 204, nothing more.

It runs under the very gunicorn settings of ``ks-collector web`` (``collector.server.run_web``,
with this app loaded instead of the collector's), so what separates the two in the benchmark is
the collector's own work per beacon: parsing, validating, rate limiting and the durable commit.

    python -m bench.bare_app --bind 127.0.0.1:8001 --workers 2 --threads 4
"""

from __future__ import annotations

import argparse

from flask import Flask, Response, request

from collector import server

app = Flask(__name__)


@app.post("/collect")
def collect() -> Response:
    request.get_data()  # the collector reads every beacon, so the baseline does too
    return Response(status=204)


@app.get("/healthz")
def healthz() -> Response:
    return Response("ok", mimetype="text/plain")


class BareGunicornApp(server.GunicornApp):
    """The collector's embedded gunicorn, serving the bare app."""

    def load(self) -> Flask:
        return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bare_app", description=__doc__)
    parser.add_argument("--bind", default="127.0.0.1:8001")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args(argv)
    # run_web builds its gunicorn through this name; everything else about it stays as shipped.
    server.GunicornApp = BareGunicornApp
    server.run_web(args.bind, args.workers, args.threads)


if __name__ == "__main__":
    main()
