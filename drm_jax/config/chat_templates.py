"""Chat templates a merge config may name (`chat_template: chatml`), and how `chat_template` is resolved.

mergekit 0.1.5 ships five named templates; the names below are the same and each template renders the
same text as mergekit's under transformers' chat-template environment (blocks trimmed and left-stripped),
whitespace included (tests/mergekit/test_output_folder.py renders both on the same conversations). The
Jinja source is ours, written from the rendered format:

- chatml: `<|im_start|>ROLE\\nCONTENT<|im_end|>\\n` per message; generation prompt `<|im_start|>assistant\\n`.
- llama3: the BOS token first, then `<|start_header_id|>ROLE<|end_header_id|>\\n\\nCONTENT<|eot_id|>\\n` per
  message, the content stripped of surrounding whitespace; prompt `<|start_header_id|>assistant<|end_header_id|>\\n\\n`.
- alpaca: the last system message (stripped), a blank line, then `### Instruction:` / `### Response:` /
  `### Input:` sections for user / assistant / user_context messages separated by blank lines; prompt
  `### Response:\\n` unless the last message is the assistant's.
- mistral: BOS, then ` [INST] USER [/INST]` and ` ASSISTANT</s>` turns that must alternate, an optional
  leading system message prefixed to the first user turn; no generation prompt.
- exaone: `[|ROLE|]CONTENT` turns with the indentation mergekit's template renders, an empty system turn
  first when the conversation has none; prompt `[|assistant|]`.

`chat_template` in a config is one of: a name above, `auto` (the template most of the input models'
tokenizers carry), or a literal Jinja template (at least 20 characters and a `{`), as in mergekit.
"""

from __future__ import annotations

from typing import Iterable

_CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_LLAMA3 = (
    "{%- for message in messages -%}"
    "{{- (bos_token if loop.first else '') + '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + (message['content'] | trim) + '<|eot_id|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)

_ALPACA = (
    "{%- set systems = messages | selectattr('role', 'equalto', 'system') | list -%}"
    "{{- ((systems | last).content | trim if systems else '') + '\\n\\n' -}}"
    "{%- set headers = {'user': '### Instruction:\\n', 'assistant': '### Response:\\n',"
    " 'user_context': '### Input:\\n'} -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] in headers -%}"
    "{{- headers[message['role']] + (message['content'] | trim) + ('' if loop.last else '\\n\\n') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

_MISTRAL = (
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system_message = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set turns = messages -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('conversation roles must alternate user/assistant after an optional system message') -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set prefix = system_message + '\\n\\n' if (loop.first and system_message is defined) else '' -%}"
    "{{- ' [INST] ' + prefix + message['content'] + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- ' ' + message['content'] + eos_token -}}"
    "{%- else -%}"
    "{{- raise_exception('only user and assistant roles (and a leading system message) are supported') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

_EXAONE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}{{- '        [|system|][|endofturn|]\\n\\n' -}}{%- endif -%}"
    "{{- '    [|' + message['role'] + '|]' + message['content'] + '\\n' -}}"
    "{{- '        \\n\\n' if message['role'] == 'user' else '        [|endofturn|]\\n\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '    [|assistant|]\\n' -}}{%- endif -%}"
)

NAMED_TEMPLATES: dict[str, str] = {
    "alpaca": _ALPACA,
    "chatml": _CHATML,
    "exaone": _EXAONE,
    "llama3": _LLAMA3,
    "mistral": _MISTRAL,
}


def looks_like_name(value: str) -> bool:
    """mergekit's test for a template name rather than a template: short, one line, no `{`."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def check_chat_template(value: str) -> str | None:
    """None if `value` is a valid `chat_template` setting, else the reason it is not (mergekit's rules:
    `auto`, a shipped name, or a Jinja template of at least 20 characters containing `{`)."""
    if value == "auto":
        return None
    if looks_like_name(value) and value in NAMED_TEMPLATES:
        return None
    if len(value) < 20 or "{" not in value:
        return (f"not a template name ({', '.join(sorted(NAMED_TEMPLATES))}, or auto) and not a Jinja "
                f"template (at least 20 characters with a '{{')")
    return None


def most_common_template(templates: Iterable[str | dict | None]) -> str | None:
    """`auto`: the template carried by most tokenizers (stripped; a dict of templates counts its
    "default"); ties go to the first seen. None when no tokenizer has one."""
    counts: dict[str, int] = {}
    for template in templates:
        if isinstance(template, dict):
            template = template.get("default")
        if isinstance(template, str) and template:
            counts[template.strip()] = counts.get(template.strip(), 0) + 1
    if not counts:
        return None
    best = max(counts.values())
    return next(t for t, n in counts.items() if n == best)


def resolve_chat_template(value: str | None, input_templates: Iterable[str | dict | None] = ()) -> str | None:
    """The Jinja text to set on the output tokenizer, or None to leave its template as it is.

    `input_templates` is only read for `auto` (the input models' templates, in config order)."""
    if not value:
        return None
    if value == "auto":
        return most_common_template(input_templates)
    if looks_like_name(value) and value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    return value


__all__ = ["check_chat_template", "resolve_chat_template"]
