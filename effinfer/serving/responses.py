"""Engine outputs -> OpenAI response bodies and server-sent-event chunks (completions and chat)."""

from __future__ import annotations

import json

from effinfer.loader.tokenizer import Tokenizer
from effinfer.outputs import RequestOutput
from effinfer.sampling_params import TokenLogprobs


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion,
            "total_tokens": num_prompt + num_completion}


class LogprobFormatter:
    """Token ids and logprobs in the two OpenAI layouts (legacy completions, chat `content` list)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def completion(self, token_ids: list[int], logprobs: list[TokenLogprobs | None], text_offset: int) -> dict:
        """{tokens, token_logprobs, top_logprobs, text_offset}; a None entry (first prompt token) stays None."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp in zip(token_ids, logprobs):
            text = self.token_text(token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else {self.token_text(t): v for t, v in lp.top})
            out["text_offset"].append(text_offset)
            text_offset += len(text)
        return out

    def chat(self, token_ids: list[int], logprobs: list[TokenLogprobs]) -> dict:
        return {"content": [self._chat_entry(t, lp) for t, lp in zip(token_ids, logprobs)]}

    def _chat_entry(self, token_id: int, lp: TokenLogprobs) -> dict:
        text = self.token_text(token_id)
        return {"token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
                "top_logprobs": [{"token": (s := self.token_text(t)), "logprob": v, "bytes": list(s.encode())}
                                 for t, v in lp.top]}


def completion_choice(index: int, out: RequestOutput, text: str, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason,
            "stop_reason": out.stop_reason}


def chat_choice(index: int, out: RequestOutput, logprobs: dict | None) -> dict:
    return {"index": index, "message": {"role": "assistant", "content": out.text}, "logprobs": logprobs,
            "finish_reason": out.finish_reason, "stop_reason": out.stop_reason}
