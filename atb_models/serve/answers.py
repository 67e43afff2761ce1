"""The bodies of the server's answers in OpenAI's chat format: a whole answer, stream chunks, usage and logprobs,
and `ChatFormat`, the interface app.Answer sends a request's answer through (completions.CompletionFormat and
tools.ToolChatFormat are its other forms). No I/O here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from atb_models.serve.protocol import ChatRequest


def usage(firsts: list, completion_tokens: int) -> dict:
    """OpenAI's usage: `firsts`, the finished RequestOutput of each prompt's first choice, give the prompt tokens
    (visual ones included; a prompt counts once, whatever its n) and those whose K/V came from the prefix cache
    (prompt_tokens_details.cached_tokens); `completion_tokens` are all choices'."""
    return dict(running_usage(sum(o.prompt_token_count for o in firsts), completion_tokens),
                prompt_tokens_details={"cached_tokens": sum(o.cached_prompt_tokens for o in firsts)})


def running_usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """A streamed chunk's usage so far for its choice (vLLM's continuous_usage_stats)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_usage(outputs: list) -> dict:
    """usage() of a chat request's finished outputs, one per choice of its one prompt."""
    return usage(outputs[:1], sum(len(o.token_ids) for o in outputs))


def logprobs_body(logprobs: Optional[list], token_bytes) -> Optional[dict]:
    """OpenAI's choice.logprobs for engine.logprobs.TokenLogprob entries (None where none were asked for):
    each token's text, logprob, UTF-8 bytes (a token may hold part of a character) and top_logprobs."""
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text, raw = token_bytes(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(i, v) for i, v in lp.top])
                        for lp in logprobs]}


def prompt_logprobs_body(entries: list, token_bytes, count: int) -> list:
    """vLLM's prompt_logprobs: None for the first prompt token, then for each other a map of token ids (strings, as
    JSON's keys are) to their logprob, rank and text: the prompt's token first, then the `count` most likely."""
    def entry(lp) -> dict:
        listed = {str(lp.token_id): {"logprob": lp.logprob, "rank": lp.rank,
                                     "decoded_token": token_bytes(lp.token_id)[0]}}
        for rank, (token, logprob) in enumerate(lp.top[:count], start=1):
            listed.setdefault(str(token), {"logprob": logprob, "rank": rank, "decoded_token": token_bytes(token)[0]})
        return listed

    return [None if lp is None else entry(lp) for lp in entries]


def completion_body(completion_id: str, model: str, created: int, outputs: list, token_bytes,
                    prompt_logprobs: Optional[int] = None) -> dict:
    """The whole answer of a request that was not streamed; `outputs` are the engine's final RequestOutputs, one
    per choice, `token_bytes` the LLM's (a token id's text and bytes, for logprobs); with `prompt_logprobs` asked,
    the prompt's (vLLM's top-level field: the choices share the prompt)."""
    body = {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": index, "message": {"role": "assistant", "content": output.text},
                         "logprobs": logprobs_body(output.logprobs, token_bytes),
                         "finish_reason": output.finish_reason, "stop_reason": output.stop_reason}
                        for index, output in enumerate(outputs)],
            "usage": chat_usage(outputs)}
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs_body(outputs[0].prompt_logprobs or [], token_bytes, prompt_logprobs)
    return body


def chunk_body(completion_id: str, model: str, created: int, delta: dict, finish_reason: Optional[str],
               with_usage_field: bool, logprobs: Optional[dict] = None, index: int = 0, stop_reason=None,
               usage: Optional[dict] = None) -> dict:
    """One streamed chunk of choice `index`; with stream_options.include_usage every chunk carries "usage" (null,
    or with continuous_usage_stats the choice's `usage` so far) but the last, the total; `logprobs`
    (logprobs_body's) those of the tokens that came since the choice's chunk before; `stop_reason` (vLLM's field)
    the stop string or token id that ended it."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                         "stop_reason": stop_reason}]}
    if with_usage_field:
        body["usage"] = usage
    return body


def usage_chunk_body(completion_id: str, model: str, created: int, outputs: list) -> dict:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": chat_usage(outputs)}


@dataclass
class ChoiceProgress:
    """What a stream has sent of one choice: characters of its text, generated tokens (their logprobs), and
    whether it has spoken yet."""

    chars: int = 0
    tokens: int = 0
    opened: bool = False


class ChatFormat:
    """The bodies of one accepted chat request's answer, whole or as stream chunks (app.Answer sends them): the
    interface completions.CompletionFormat shares."""

    id_prefix = "chatcmpl"

    def __init__(self, chat: ChatRequest, model: str, token_bytes):
        self.request, self.model, self.token_bytes = chat, model, token_bytes

    def whole(self, completion_id: str, outputs: list) -> dict:
        return completion_body(completion_id, self.model, self.request.created, outputs, self.token_bytes,
                               self.request.params.prompt_logprobs)

    def opening(self, completion_id: str, num_choices: int) -> list:
        """Chunks before any token: each choice's role."""
        return [self._chunk(completion_id, index, {"role": "assistant", "content": ""})
                for index in range(num_choices)]

    def step(self, completion_id: str, index: int, output, progress: ChoiceProgress) -> list:
        """The chunks of choice `index` for its latest output, none where it adds nothing to send: the text since
        the last chunk (a token holding part of a character waits for the rest) and its tokens' logprobs."""
        chunk = self._delta_chunk(completion_id, index, output, progress, output.text, output.finish_reason)
        return [chunk] if chunk else []

    def _delta_chunk(self, completion_id: str, index: int, output, progress: ChoiceProgress, text: str,
                     finish_reason: Optional[str] = None, extra: Optional[dict] = None) -> Optional[dict]:
        """The chunk that brings choice `index` to `text` (what may be shown of its output so far), with `extra`
        delta fields and the logprobs of the tokens since its last chunk; None where there is nothing to send."""
        delta = text[progress.chars:]
        if not (delta or extra or finish_reason):
            return None
        logprobs = None if output.logprobs is None else output.logprobs[progress.tokens:]
        progress.chars, progress.tokens = len(text), len(output.token_ids)
        body = dict({"content": delta} if delta else {}, **(extra or {}))
        return self._chunk(completion_id, index, body, finish_reason, logprobs_body(logprobs, self.token_bytes),
                           output.stop_reason if finish_reason else None, output)

    def usage_chunk(self, completion_id: str, outputs: list) -> dict:
        return usage_chunk_body(completion_id, self.model, self.request.created, outputs)

    def _chunk(self, completion_id: str, index: int, delta: dict, finish_reason=None, logprobs=None,
               stop_reason=None, output=None) -> dict:
        """A chunk of choice `index`; `output`, its latest, gives continuous_usage_stats' usage so far (the role's
        chunk, before any output, carries null)."""
        usage = None
        if self.request.continuous_usage and output is not None:
            usage = running_usage(output.prompt_token_count, len(output.token_ids))
        return chunk_body(completion_id, self.model, self.request.created, delta, finish_reason,
                          self.request.include_usage, logprobs, index, stop_reason, usage)
