"""Serving: ``python -m epmoe serve`` (an OpenAI-compatible API) and the engine under it.

The engine (``types``, ``kv_cache``, ``scheduler``, ``sampling``, ``engine``,
``sync``, ``client``) needs torch and transformers; the HTTP front
(``protocol``, ``detokenize``, ``api``, ``metrics``) needs the ``serve`` extra
(FastAPI, uvicorn, pydantic, prometheus_client). Nothing is imported here, so
``import epmoe`` stays free of both. See ``docs/serving.md``.
"""
