"""pathloop's HTTP service: serve.app (Ray Serve application) over serve.api (FastAPI routes)."""
