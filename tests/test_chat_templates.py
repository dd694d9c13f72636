"""Chat templates render exactly as transformers' `apply_chat_template(tokenize=False)` on templates
written in the styles of current model families (ChatML/Qwen, Llama 2/3, Gemma, Phi-3, Zephyr,
Mistral tools, Command-R documents, DeepSeek break/continue, SmolLM3 generation blocks, Qwen3
thinking switch)."""

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from jaxlm.checkpoints.hf import CheckpointError
from jaxlm.checkpoints.tokenizer import Tokenizer

TEMPLATES = {
    "chatml_qwen_tools": (
        "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
        "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}{{- '\\n\\n# Tools\\n\\n<tools>' }}"
        "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}{{- '\\n</tools><|im_end|>\\n' }}"
        "{%- else %}{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endif %}"
        "{%- for message in messages %}{%- if message.role != 'system' %}"
        "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    "llama3_date": (
        "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = strftime_now('%Y') %}{%- endif %}"
        "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
        "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
        "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{{- 'Year: ' + date_string + '\\n\\n' }}"
        "{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
    ),
    "llama2_alternation": (
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
        "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
        "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
        "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
        "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
    ),
    "gemma": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{% for message in messages %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
        "{% else %}{% set role = message['role'] %}{% endif %}"
        "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
    ),
    "phi3_indented_blocks": (
        "{% for message in messages %}\n"
        "    {% if message['role'] == 'system' %}\n<|system|>\n{{ message['content'] }}<|end|>\n"
        "    {% elif message['role'] == 'user' %}\n<|user|>\n{{ message['content'] }}<|end|>\n"
        "    {% else %}\n<|assistant|>\n{{ message['content'] }}<|end|>\n    {% endif %}\n"
        "{% endfor %}\n{% if add_generation_prompt %}\n<|assistant|>\n{% endif %}\n"
    ),
    "zephyr_loop_last": (
        "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'system' %}\n{{ '<|system|>\\n' + message['content'] + eos_token }}\n"
        "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\\n'  + message['content'] + eos_token }}\n"
        "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
    ),
    "deepseek_break_continue": (
        "{% set ns = namespace(last_user=-1) %}{% for m in messages %}{% if m.role == 'user' %}"
        "{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}{{ bos_token }}"
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% if loop.index0 > ns.last_user %}{% break %}{% endif %}<\uff5c{{ m.role }}\uff5c>{{ m.content }}"
        "{% endfor %}{% if add_generation_prompt %}<\uff5cAssistant\uff5c>{% endif %}"
    ),
    "mistral_optional_tools": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
        "{% if loop.last and tools is not none and tools | length > 0 %}[AVAILABLE_TOOLS]{{ tools | tojson }}"
        "[/AVAILABLE_TOOLS]{% endif %}[INST] {{ message['content'] }}[/INST]{% elif message['role'] == 'assistant' %}"
        " {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    ),
    "command_r_documents": (
        "{{ bos_token }}{% if documents %}<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>"
        "{% for doc in documents %}\nDocument: {{ loop.index0 }}\ntitle: {{ doc.title }}\ntext: {{ doc.text }}"
        "{% endfor %}\n</results><|END_OF_TURN_TOKEN|>{% endif %}{% for message in messages %}"
        "<|START_OF_TURN_TOKEN|><|{{ message.role | upper }}_TOKEN|>{{ message.content }}<|END_OF_TURN_TOKEN|>"
        "{% endfor %}{% if add_generation_prompt %}<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>{% endif %}"
    ),
    "smollm3_generation_blocks": (
        "{% for message in messages %}<|im_start|>{{ message.role }}\n{% if message.role == 'assistant' %}"
        "{% generation %}{{ message.content }}<|im_end|>{% endgeneration %}\n{% else %}"
        "{{ message.content }}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "qwen3_thinking_switch": (
        "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and enable_thinking is false %}"
        "<think>\n\n</think>\n\n{% endif %}{% endif %}"
    ),
    "tool_schema_dict_items": (
        "{% if tools %}{% for tool in tools %}{% set fn = tool.function %}{{ fn.name }}("
        "{% for name, spec in fn.parameters.properties | dictsort %}{{ name }}: {{ spec | tojson(indent=2) }}"
        "{% if not loop.last %}, {% endif %}{% endfor %})\n{% endfor %}{% endif %}"
        "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    ),
}

CHAT = [
    {"role": "system", "content": "  Tu es un assistant très utile. 😀  "},
    {"role": "user", "content": "Héllo, what's 2+2?"},
    {"role": "assistant", "content": " It is 4. "},
    {"role": "user", "content": "Et la température à Zürich ?"},
]
TOOLS = [{"type": "function", "function": {"name": "météo", "description": "La température d'une ville",
                                           "parameters": {"type": "object", "properties": {
                                               "ville": {"type": "string", "description": "nom, p.ex. Zürich"},
                                               "unité": {"type": "string", "enum": ["°C", "°F"]}}}}}]
DOCS = [{"title": "Zürich", "text": "Il fait 12 °C."}, {"title": "Genève", "text": "Il pleut."}]
NO_SYSTEM = CHAT[1:]


def _pair(template):
    from transformers import PreTrainedTokenizerFast

    backend = HFTokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    ours = Tokenizer(backend, bos_id=0, eos_ids=(1,), chat_template=template,
                     special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    ref = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")
    ref.chat_template = template
    return ours, ref


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_templates_render_like_transformers(name):
    ours, ref = _pair(TEMPLATES[name])
    rendered = set()
    for messages in ([NO_SYSTEM] if name == "gemma" else [CHAT, NO_SYSTEM]):
        for extra in ({}, {"tools": TOOLS}, {"documents": DOCS}, {"enable_thinking": False},
                      {"add_generation_prompt": False}, {"date_string": "2031"}):
            kwargs = {"add_generation_prompt": True, **extra}
            want = ref.apply_chat_template(messages, tokenize=False, **kwargs)
            got = ours.apply_chat_template(messages, **kwargs)
            assert got == want, (name, extra)
            rendered.add(got)
    assert len(rendered) >= 2  # the cases exercise the template's branches


def test_template_features_the_issue_names():
    ours, _ = _pair(TEMPLATES["chatml_qwen_tools"])
    assert '"météo"' in ours.apply_chat_template(NO_SYSTEM, tools=TOOLS)  # tojson keeps non-ASCII
    ours, _ = _pair(TEMPLATES["llama3_date"])
    import datetime

    assert f"Year: {datetime.datetime.now():%Y}" in ours.apply_chat_template(NO_SYSTEM)  # strftime_now


@pytest.mark.parametrize("name,messages,message", [
    ("gemma", CHAT, "System role not supported"),
    ("llama2_alternation", [CHAT[1], CHAT[1]], "Conversation roles must alternate"),
])
def test_raise_exception_is_a_one_line_error(name, messages, message):
    import jinja2

    ours, ref = _pair(TEMPLATES[name])
    with pytest.raises(jinja2.TemplateError, match=message):
        ref.apply_chat_template(messages, tokenize=False)
    with pytest.raises(CheckpointError, match=f"chat template: {message}"):
        ours.apply_chat_template(messages)


def test_sandbox_blocks_attribute_escapes():
    ours, _ = _pair("{{ messages.__class__.__mro__ }}")
    with pytest.raises(CheckpointError, match="chat template"):
        ours.apply_chat_template(NO_SYSTEM)
