"""The same HTTP API without Ray: one uvicorn process over in-process models.

    python -m serve.local serve/config.yaml [key.sub=value ...]

For a laptop, a single-process deployment, or a review-only server (no model). Routes, schemas,
auth and errors are ``serve.api``'s, as behind Ray Serve; requests are not batched across clients.
"""

from __future__ import annotations

import sys


def run_local(config_path: str | None, overrides: list[str] = ()) -> None:
    """Serve ``serve.api`` for the config's args on args.host:args.port until interrupted."""
    import uvicorn

    from serve.api import build_local_api
    from serve.args import load_args

    args = load_args(config_path, overrides)
    # No access log: it would be noise at load, and tokens never appear in it anyway.
    uvicorn.run(
        build_local_api(args), host=args.host, port=args.port, access_log=False, log_level="warning"
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    run_local(argv[0], argv[1:])


if __name__ == "__main__":
    main()
