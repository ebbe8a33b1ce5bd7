"""`gptserve bench`: a closed-loop load generator for OpenAI-compatible completion servers."""

from service.bench.client import RequestResult, build_payload, fetch_model_name, send_request
from service.bench.config import BenchConfig, BenchError
from service.bench.prompts import PromptFactory
from service.bench.report import LevelSummary, format_table, percentile, summarize
from service.bench.runner import BenchResult, run_benchmark

__all__ = [
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "LevelSummary",
    "PromptFactory",
    "RequestResult",
    "build_payload",
    "fetch_model_name",
    "format_table",
    "percentile",
    "run_benchmark",
    "send_request",
    "summarize",
]
