"""Chat templates shipped for tokenizers that have none of their own.

A tokenizer's own `chat_template` always wins (data.chat_template: auto). These follow the
published formats of each family:
- chatml: Qwen2.5 (`<|im_start|>role\\n...<|im_end|>\\n`), without Qwen's default system prompt.
- llama3: Llama-3.x headers (`<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>`).
- gemma2: Gemma-2 turns (`<start_of_turn>user|model ... <end_of_turn>`); like the original it
  has no system role and requires user/model alternation starting with the user. The renderer
  folds the system prompt into the first user turn for such templates.
"""

from __future__ import annotations

from pathlib import Path

from cso_dist.util.errors import ConfigError, DataError
from cso_dist.util.io import read_text

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3 = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

GEMMA2 = (
    "{{- '<bos>' -}}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- raise_exception('System role not supported') -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

# name -> (Jinja text, the special tokens it needs in a vocabulary (tiny tokenizers built here), the token that
# ends an assistant turn: generation stops there)
TEMPLATES = {
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>"),
    "gemma2": (GEMMA2, ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
}
CHAT_TEMPLATES = {name: t[0] for name, t in TEMPLATES.items()}
TEMPLATE_SPECIAL_TOKENS = {name: t[1] for name, t in TEMPLATES.items()}
TEMPLATE_EOT = {name: t[2] for name, t in TEMPLATES.items()}


def resolve_template(spec: str) -> str:
    """A shipped template name or a path to a Jinja file."""
    if spec in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[spec]
    path = Path(spec)
    if path.exists():
        try:
            return read_text(path, "a chat template")
        except DataError as e:
            raise ConfigError(f"data.chat_template: {e}") from None
    raise ConfigError(f"data.chat_template: '{spec}' is not auto, {', '.join(CHAT_TEMPLATES)} or a Jinja file")


def end_of_turn_ids(tokenizer) -> list[int]:
    """The tokens that end a reply: the tokenizer's end of sequence and the chat templates' end-of-turn tokens."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)
