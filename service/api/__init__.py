"""The HTTP layer: a FastAPI app of thin routes over the engine (see `service.api.app`)."""
