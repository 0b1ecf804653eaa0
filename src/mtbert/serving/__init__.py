"""`mtbert serve`: an HTTP server for a trained model (`app.create_app`, `app.serve`), its
cross-request batcher (`batching.Batcher`) and its page (`static/`). Needs the `serve` extra
(fastapi, uvicorn, prometheus-client, swagger-ui-bundle-v2)."""
