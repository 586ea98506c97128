"""Instruction data for a causal LM: prompt/response pairs formatted as one conversation turn,
tokenised with the number of prompt tokens, so the loss can fall on the response alone.

Formatting. With a tokenizer that has a chat template (``tokenizer.chat_template``, e.g.
SmolLM2-Instruct's), an example is the template applied to a user turn (the prompt) and an
assistant turn (the response); its prompt part is the template applied to the user turn alone
with ``add_generation_prompt=True``. Without one, the plain template::

    ### Question:
    {prompt}
    ### Answer:
    {response}<eos>

where ``<eos>`` is the tokenizer's end-of-sequence token (none if it has none) and the prompt
part ends after ``### Answer:\\n``. The prompt's token count is the longest common prefix of
the prompt part's tokens and the whole example's tokens, so a token straddling the boundary
counts as response.

Truncation keeps the prompt and cuts the response from the right to ``max_length`` tokens.
An example whose prompt part alone fills ``max_length`` (or whose response has no token) would
carry no response token; it is dropped, and the number dropped is returned
(:attr:`InstructionTokens.dropped`) and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "PLAIN_PROMPT",
    "PROMPT_COLUMN",
    "RESPONSE_COLUMN",
    "InstructionTokens",
    "format_pair",
    "mask_prompts",
    "plain_text",
    "tokenize_pairs",
]

log = logging.getLogger("fedtune.data")

# the columns an instruction data set carries (set by the corpus loader from data.prompt_key and
# data.response_key); reserved names, so a plain data set never turns into instruction data
PROMPT_COLUMN = "_prompt"
RESPONSE_COLUMN = "_response"
PLAIN_PROMPT = "### Question:\n{prompt}\n### Answer:\n"


@dataclass
class InstructionTokens:
    input_ids: list[list[int]]
    prompt_lengths: list[int]  # leading tokens of each example that belong to its prompt part
    dropped: int  # examples left out: no response token fits in max_length


def plain_text(prompt: str, response: str) -> str:
    """The plain template without an end-of-sequence token (the ``text`` column of instruction data)."""
    return PLAIN_PROMPT.format(prompt=prompt) + response


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_pair(tokenizer: Any, prompt: str, response: str) -> tuple[str, str]:
    """(prompt part, whole example) as text, with the chat template when the tokenizer has one."""
    if has_chat_template(tokenizer):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
        return str(head), str(full)
    head = PLAIN_PROMPT.format(prompt=prompt)
    return head, head + response + (tokenizer.eos_token or "")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pairs(prompts: list[str], responses: list[str], tokenizer: Any, max_length: int) -> InstructionTokens:
    """Format and tokenise prompt/response pairs (see the module docstring for the rules)."""
    out = InstructionTokens(input_ids=[], prompt_lengths=[], dropped=0)
    if not prompts:
        return out
    pairs = [format_pair(tokenizer, p, r) for p, r in zip(prompts, responses, strict=True)]
    # a chat template writes its own special tokens; the plain template gets the tokenizer's usual ones
    special = not has_chat_template(tokenizer)
    head_ids = tokenizer([h for h, _ in pairs], add_special_tokens=special)["input_ids"]
    full_ids = tokenizer([f for _, f in pairs], add_special_tokens=special)["input_ids"]
    for head, full in zip(head_ids, full_ids):
        n_prompt = _common_prefix(list(head), list(full))
        if max(n_prompt, 1) >= min(len(full), max_length):  # no response token left to predict
            out.dropped += 1
            continue
        out.input_ids.append(list(full[:max_length]))
        out.prompt_lengths.append(n_prompt)
    if out.dropped:
        log.warning("instruction data: %d of %d examples dropped: their prompt fills model.max_length = %d"
                    " tokens (or their response is empty)", out.dropped, len(full_ids), max_length)
    return out


def mask_prompts(labels: torch.Tensor, prompt_lengths: list[int]) -> torch.Tensor:
    """``labels`` (batch, seq) with each row's first ``prompt_lengths[row]`` positions set to -100."""
    width = labels.shape[1]
    positions = torch.arange(width, device=labels.device)
    lengths = torch.tensor(prompt_lengths, dtype=torch.long, device=labels.device)
    return labels.masked_fill(positions[None, :] < lengths[:, None], -100)
