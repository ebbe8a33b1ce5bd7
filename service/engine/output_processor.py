"""Turn sampled tokens into a request's text and events, and decide when it stops."""

from __future__ import annotations

from model.detokenizer import IncrementalDetokenizer
from model.tokenizer import Tokenizer
from service.engine.request import FinishReason, Request, RequestOutput, TokenOutput
from service.engine.runner import SampledToken


class OutputProcessor:
    """Detokenizes incrementally and applies the stop conditions after every token."""

    def __init__(self, tokenizer: Tokenizer, eos_token_id: int | None) -> None:
        self.tokenizer = tokenizer
        self.eos_token_id = eos_token_id

    def prepare(self, request: Request) -> None:
        """Give a new request its streaming detokenizer."""
        request.detokenizer = IncrementalDetokenizer(self.tokenizer)

    def process(self, request: Request, sampled: SampledToken) -> RequestOutput:
        """Append one sampled token; returns the event to send, finished if a stop hit."""
        token = sampled.token_id
        request.output_token_ids.append(token)
        num_out = request.num_output_tokens
        stop = request.stop
        may_stop = num_out >= stop.min_tokens
        # End-of-text and stop tokens end the request without adding their text.
        is_eos = token == self.eos_token_id and not stop.ignore_eos
        if may_stop and (is_eos or token in stop.stop_token_ids):
            request.finish_reason = FinishReason.STOP
        else:
            previous_length = len(request.output_text)
            self._append_text(request, token)
            if stop.stop and may_stop and self._check_stop_strings(request, previous_length):
                # The text was cut before the stop string: bytes held after it are dropped.
                return self._event(request, sampled)
            if request.num_tokens >= request.max_total_tokens:
                request.finish_reason = FinishReason.LENGTH
        if request.finish_reason is not None and request.detokenizer is not None:
            request.output_text += request.detokenizer.flush()
        return self._event(request, sampled)

    def _append_text(self, request: Request, token: int) -> None:
        detokenizer = request.detokenizer
        if detokenizer is None:
            raise RuntimeError(f"request {request.request_id} was not prepared")
        request.output_text += detokenizer.add(token)

    @staticmethod
    def _check_stop_strings(request: Request, previous_length: int) -> bool:
        """Cut the text before the earliest stop string that this token's text completes."""
        text = request.output_text
        best: tuple[int, int] | None = None
        for stop_string in request.stop.stop:
            # Only matches ending in the new text count: earlier text was checked already, or
            # came before min_tokens, when stop strings do not apply (as in vLLM).
            index = text.find(stop_string, max(0, previous_length - len(stop_string) + 1))
            if index != -1 and (best is None or index < best[0]):
                best = (index, len(stop_string))
        if best is not None:
            index, length = best
            keep = index + length if request.stop.include_stop_str_in_output else index
            request.output_text = text[:keep]
            request.finish_reason = FinishReason.STOP
            return True
        return False

    def _event(self, request: Request, sampled: SampledToken) -> RequestOutput:
        finished = request.finish_reason is not None
        text = request.output_text
        end = len(text) if finished else len(text) - self._held_back(request)
        new_text = text[request.num_emitted_chars : end] if end > request.num_emitted_chars else ""
        request.num_emitted_chars = max(request.num_emitted_chars, end)
        token = TokenOutput(
            sampled.token_id,
            new_text,
            sampled.logprob,
            sampled.top_logprobs,
            sampled.processed_logprob,
            sampled.processed_top_logprobs,
        )
        return RequestOutput(
            request_id=request.request_id,
            tokens=[token],
            text=new_text,
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            finished=finished,
            finish_reason=request.finish_reason,
            num_cached_tokens=request.num_cached_tokens,
        )

    @staticmethod
    def _held_back(request: Request) -> int:
        """Characters at the end of the text that could be the start of a stop string."""
        text = request.output_text
        if not text:
            return 0
        last = text[-1]
        held = 0
        for stop_string in request.stop.stop:
            # A prefix of size n can only match if it ends with the text's last character.
            end = min(len(stop_string) - 1, len(text))
            while end > held:
                index = stop_string.rfind(last, 0, end)
                if index < held:
                    break
                if text.endswith(stop_string[: index + 1]):
                    held = index + 1
                    break
                end = index
        return held
