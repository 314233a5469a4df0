"""`bertpipe serve`: finished runs behind an HTTP API with dynamic batching, and a page to try them.

The layer above recipes/: it imports the shared Predictor (recipes/predict.py) and nothing imports it but the
CLI. server.py (config, entry function, CLI), app.py (FastAPI endpoints and errors), batcher.py (dynamic
batching), schema.py (request and response bodies), metrics.py (Prometheus), page.html (the page at /).
"""
