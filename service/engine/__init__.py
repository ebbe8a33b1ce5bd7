"""The continuous-batching engine: requests, scheduler, runner, the step loop and its async front.

Nothing here imports FastAPI: the HTTP layer only submits requests and consumes their outputs.
"""
