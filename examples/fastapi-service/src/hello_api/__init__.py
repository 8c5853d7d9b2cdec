"""hello-api: a tiny FastAPI service used as an imgbuild example."""
