"""The OpenAI-compatible HTTP server (`kvserve serve`): `server.build_app` is the entry point."""
