"""pathloop's HTTP service: ``serve.app`` (Ray Serve application), ``serve.api`` (FastAPI routes)."""
