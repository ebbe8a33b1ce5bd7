"""The serving side: the batching engine (``service.engine``) and the HTTP layer."""
