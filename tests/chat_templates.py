"""Public chat template layouts, written for the tests from their documented behaviour.

Each is a format string: `{g}` / `{eg}` become "" (the plain template) or `{% generation %}` /
`{% endgeneration %}` (a twin whose generation block wraps exactly the reply and its turn end,
so transformers' return_assistant_tokens_mask says what the turn-by-turn mask must be).
Braces for Jinja are doubled.
"""

LLAMA3 = (
    "{{% for message in messages %}}"
    "{{% if loop.first %}}{{{{ bos_token }}}}{{% endif %}}"
    "{{{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}}}"
    "{{% if message['role'] == 'assistant' %}}{g}{{{{ message['content'] | trim + '<|eot_id|>' }}}}{eg}"
    "{{% else %}}{{{{ message['content'] | trim + '<|eot_id|>' }}}}{{% endif %}}"
    "{{% endfor %}}"
    "{{% if add_generation_prompt %}}{{{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}}}{{% endif %}}"
)

LLAMA2 = """{{% if messages[0]['role'] == 'system' %}}
{{% set system = messages[0]['content'] %}}{{% set turns = messages[1:] %}}
{{% else %}}
{{% set system = false %}}{{% set turns = messages %}}
{{% endif %}}
{{% for message in turns %}}
{{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}}
{{{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...')  -}}}}
{{% endif %}}
{{% if loop.index0 == 0 and system != false %}}
{{% set text = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}}
{{% else %}}
{{% set text = message['content'] %}}
{{% endif %}}
{{% if message['role'] == 'user' %}}
{{{{ bos_token + '[INST] ' + text.strip() + ' [/INST]' -}}}}
{{% elif message['role'] == 'assistant' %}}
{g}{{{{ ' ' + text.strip() + ' ' + eos_token -}}}}{eg}
{{% endif %}}
{{% endfor %}}"""

# Mistral Instruct: no system role of its own; a system prompt is folded into the first user
# turn (as v0.2+ templates do), any other role is refused.
MISTRAL = """{{{{ bos_token -}}}}
{{% if messages[0]['role'] == 'system' %}}
{{% set lead = messages[0]['content'] + '\\n\\n' %}}{{% set turns = messages[1:] %}}
{{% else %}}
{{% set lead = '' %}}{{% set turns = messages %}}
{{% endif %}}
{{% for message in turns %}}
{{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}}
{{{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}}}
{{% endif %}}
{{% if message['role'] == 'user' %}}
{{% if loop.first %}}{{{{ '[INST] ' + lead + message['content'] + ' [/INST]' -}}}}
{{% else %}}{{{{ '[INST] ' + message['content'] + ' [/INST]' }}}}{{% endif %}}
{{% elif message['role'] == 'assistant' %}}
{g}{{{{ message['content'] + eos_token -}}}}{eg}
{{% else %}}
{{{{ raise_exception('Only user and assistant roles are supported!') -}}}}
{{% endif %}}
{{% endfor %}}"""

# Qwen2.5: ChatML with a default system prompt, and a tools block rendered with tojson.
QWEN25 = """{{%- set default = 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' %}}
{{%- if tools %}}
    {{{{- '<|im_start|>system\\n' }}}}
    {{%- if messages[0]['role'] == 'system' %}}{{{{- messages[0]['content'] }}}}{{%- else %}}{{{{- default }}}}{{%- endif %}}
    {{{{- '\\n\\n# Tools\\n\\nYou may call one or more functions. Signatures:\\n<tools>' }}}}
    {{%- for tool in tools %}}{{{{- '\\n' }}}}{{{{- tool | tojson }}}}{{%- endfor %}}
    {{{{- '\\n</tools><|im_end|>\\n' }}}}
{{%- elif messages[0]['role'] == 'system' %}}
    {{{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}}}
{{%- else %}}
    {{{{- '<|im_start|>system\\n' + default + '<|im_end|>\\n' }}}}
{{%- endif %}}
{{%- for message in messages %}}
    {{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}}
        {{{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}}}
    {{%- elif message.role == 'assistant' %}}
        {{{{- '<|im_start|>assistant\\n' }}}}{g}{{{{- message.content + '<|im_end|>\\n' }}}}{eg}
    {{%- endif %}}
{{%- endfor %}}
{{%- if add_generation_prompt %}}
    {{{{- '<|im_start|>assistant\\n' }}}}
{{%- endif %}}"""

# Gemma: user/model turns, the assistant called "model", a system prompt folded into the first
# user turn (Gemma 3's layout), roles must alternate.
GEMMA = """{{{{ bos_token }}}}
{{%- if messages[0]['role'] == 'system' -%}}
    {{%- set first = messages[0]['content'] + '\\n\\n' -%}}{{%- set turns = messages[1:] -%}}
{{%- else -%}}
    {{%- set first = '' -%}}{{%- set turns = messages -%}}
{{%- endif -%}}
{{%- for message in turns -%}}
    {{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}}
        {{{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}}}
    {{%- endif -%}}
    {{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}}
    {{{{ '<start_of_turn>' + role + '\\n' }}}}
    {{%- if role == 'model' -%}}{g}{{{{ message['content'] | trim + '<end_of_turn>\\n' }}}}{eg}
    {{%- else -%}}{{{{ (first if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}}}
    {{%- endif -%}}
{{%- endfor -%}}
{{%- if add_generation_prompt -%}}{{{{ '<start_of_turn>model\\n' }}}}{{%- endif -%}}"""

# SmolLM2's own ChatML layout with generation markers (its shipped template has none).
CHATML_GEN = (
    "{{% for message in messages %}}"
    "{{% if loop.first and messages[0]['role'] != 'system' %}}"
    "{{{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}}}"
    "{{% endif %}}"
    "{{{{ '<|im_start|>' + message['role'] + '\\n' }}}}"
    "{{% if message['role'] == 'assistant' %}}{g}{{{{ message['content'] + '<|im_end|>\\n' }}}}{eg}"
    "{{% else %}}{{{{ message['content'] + '<|im_end|>\\n' }}}}{{% endif %}}"
    "{{% endfor %}}"
    "{{% if add_generation_prompt %}}{{{{ '<|im_start|>assistant\\n' }}}}{{% endif %}}"
)

LAYOUTS = {"llama3": LLAMA3, "llama2": LLAMA2, "mistral": MISTRAL, "qwen2.5": QWEN25,
           "gemma": GEMMA, "chatml": CHATML_GEN}


def plain(name: str) -> str:
    return LAYOUTS[name].format(g="", eg="")


def marked(name: str) -> str:
    return LAYOUTS[name].format(g="{% generation %}", eg="{% endgeneration %}")
