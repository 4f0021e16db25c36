"""Make the tiny Hugging Face checkpoints under tests/hf/fixtures/ and their transformers reference outputs.

Why: llm_jax.hf reads Hugging Face checkpoints and tokenizers (config.json, safetensors, tokenizer.json, chat
templates) for five families: llama, mistral, qwen2, qwen3, gemma3. Its parity tests need real files written by
transformers itself and the numbers transformers computes from them (logits, greedy decoding with a KV cache,
token ids, chat-template renderings). No checkpoint can be downloaded in CI, and the test suite must not need
torch, so this script builds tiny random ones offline, runs transformers on them once, and the outputs are
committed. CI reads only the committed files (json, safetensors, npz) with numpy/jax; it never runs this script.

How: run it by hand, in an environment with torch + transformers 5 + tokenizers + safetensors + jinja2 (CPU only is
enough; here that is the virtualenv /work/venv-ref), whenever a fixture must change:

    /work/venv-ref/bin/python tests/hf/make_fixtures.py [--out tests/hf/fixtures] [--family llama ...]

then commit tests/hf/fixtures/. It is deterministic: every tokenizer is trained on a corpus written below (with the
alphabet chosen here, since the trainer's own limit_alphabet breaks ties in hash order), every weight is drawn from
a seeded generator, torch runs on one CPU thread with deterministic algorithms, and the npz is written with fixed
zip timestamps, so a second run gives the same bytes (checked: `--check-determinism` builds twice into temporary
folders and compares every file; two separate runs gave identical trees too). Other torch/transformers versions
may change the last bits of the logits; reference.json records the versions used.

Each fixtures/<family>/ holds exactly what `save_pretrained` writes for the model and its tokenizer (config.json,
model.safetensors or shards + model.safetensors.index.json, generation_config.json, tokenizer.json,
tokenizer_config.json, chat_template.jinja) plus:
  reference.npz  input_ids (2, 40) int64, logits (2, 40, V) float32 (one eager forward, no padding),
                 greedy_prompt (1, P) int64, greedy_tokens (1, 24) int64 (generate, KV cache, do_sample=False)
  reference.json texts and token ids of the tokenizer and chat-template checks, special tokens, eos ids, the
                 top-2 logit gap of each greedy step (all > 1e-3, so the tokens are not near ties), the RoPE
                 inverse frequencies, and the library versions.
"""

from __future__ import annotations

import argparse
import types
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers  # noqa: E402
from tokenizers import processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    GenerationConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
SEQ_LEN = 40           # > the sliding window (16) of mistral and gemma3
PROMPT_LEN = 12
NEW_TOKENS = 24        # prompt + new tokens = 36 > the window, so the KV cache must evict / mask
MIN_GAP = 1e-3         # the greedy reference must not hinge on a near tie
MIN_DISTINCT = 8       # ... nor be one token repeated (what random tied-embedding models like to do)
SLIDING_WINDOW = 16

# ----------------------------------------------------------------------------------------------------------------
# The corpus the tokenizers are trained on: hand-written English, generated English, other scripts, digits, code.
# ----------------------------------------------------------------------------------------------------------------

ENGLISH = """\
The quick brown fox jumps over the lazy dog.
A journey of a thousand miles begins with a single step.
She sells sea shells by the sea shore, and the shells she sells are surely sea shells.
The weather today is cold and windy, with a little rain in the afternoon.
Please remember to water the plants while I am away for the weekend.
Our train leaves the station at seven in the morning and arrives before noon.
The library opens early on Saturdays and closes late on Thursdays.
He poured a cup of coffee, opened the window, and listened to the birds.
Learning a new language takes patience, practice, and a sense of humour.
The committee will review every proposal before the end of the month.
Mountains rise above the valley where the river bends toward the sea.
It's not what you say, it's how you say it that people remember.
They've already finished the report, but we'll need another day.
I'd like two tickets for the evening show, please.
The children built a small castle out of sand and seaweed.
Good software is written for people to read and only incidentally for machines to run.
A model learns to predict the next word from the words that came before it.
Attention lets every position look back at the positions before it.
The assistant answered the question politely and then asked a follow-up question.
What time does the museum open on Sunday mornings?
Could you explain how a rotary position embedding works?
The recipe calls for flour, sugar, butter, two eggs, and a pinch of salt.
After the storm, the streets were quiet and the air smelled of wet earth.
My grandmother used to tell stories about the old harbour and its ships.
Every evening the lighthouse keeper climbed the long spiral staircase.
The orchestra tuned their instruments while the audience found their seats.
Scientists measured the temperature of the lake every hour for a year.
The cat slept in a patch of sunlight on the kitchen floor.
We walked along the beach, collecting smooth stones and pieces of glass.
Reading before bed helps me relax after a long day at work.
The engineer checked the bridge for cracks after the earthquake.
Nobody expected the small team to win the championship, but they did.
The market sells fresh bread, cheese, apples, and honey every Tuesday.
Write clearly, keep sentences short, and say one thing at a time.
The teacher asked the students to summarise the chapter in three sentences.
Birds migrate south in autumn and return north when spring arrives.
The old clock in the hall struck midnight as the guests were leaving.
Use a sharp knife and a steady hand when you slice the vegetables.
The hikers reached the summit just as the clouds began to lift.
I can't find my keys; have you seen them anywhere in the house?
The company announced a new product for people who work from home.
A good question is often more valuable than a quick answer.
The moon was bright enough to read by, so we left the lamps unlit.
He practised the piano every day until the piece felt effortless.
The garden was full of roses, tulips, and tall yellow sunflowers.
When in doubt, check the documentation and then check the source code.
The tokenizer splits text into pieces and maps each piece to a number.
The model reads the numbers and produces a probability for every next piece.
Training on more data usually helps, but only if the data is clean.
The village celebrated the harvest with music, dancing, and a long dinner.
Thank you for your help; I really appreciate the time you spent on this.
Hello! How are you doing today? I hope everything is going well.
Sure, here is a short summary of the main points of the article.
I'm sorry, but I don't know the answer to that question.
Let's think step by step about how to solve this problem.
First, add the two numbers; then divide the result by three.
The answer is forty-two, but what exactly was the question?
Once upon a time, in a kingdom by the sea, there lived a curious princess.
The robot carefully placed each block on top of the previous one.
Our neighbours invited us to a barbecue in their back garden.
"""

SUBJECTS = ["The teacher", "My friend", "A small dog", "The old sailor", "Our team", "The scientist", "Every student",
            "The pilot", "A young painter", "The gardener", "The doctor", "Her brother", "The baker", "The writer"]
VERBS = ["found", "carried", "painted", "described", "repaired", "noticed", "remembered", "borrowed", "explained",
         "watched", "cleaned", "opened", "discovered", "wrote about"]
OBJECTS = ["a red umbrella", "the broken window", "an interesting book", "the long letter", "a wooden boat",
           "the quiet garden", "a strange noise", "the new bicycle", "the morning news", "a blue notebook",
           "the tall tower", "a warm blanket", "the final chapter", "an empty bottle"]
PLACES = ["near the river", "in the kitchen", "at the station", "on the hill", "after lunch", "before dinner",
          "during the storm", "in the park", "at school", "by the harbour", "last winter", "this morning"]

OTHER_SCRIPTS = """\
Привет, как дела? Сегодня хорошая погода.
Москва — столица России, а Киев — столица Украины.
Я люблю читать книги и гулять в парке.
Мы изучаем машинное обучение и языковые модели.
Γειά σου κόσμε! Τι κάνεις σήμερα;
Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.
Το πρωί πίνω καφέ και διαβάζω εφημερίδα.
Οι μαθητές γράφουν στο τετράδιο.
你好，世界！今天天气很好。
我喜欢学习语言和数学。
北京是中国的首都。
东京是日本的首都，人口很多。
今日は良い天気ですね。散歩に行きましょう。
こんにちは、元気ですか？
مرحبا بالعالم! كيف حالك اليوم؟
أنا أحب القراءة والكتابة.
القاهرة هي عاصمة مصر.
Schöne Grüße aus München! Über den Fluss gehen wir später.
Ça va très bien, merci. Où est la gare, s'il vous plaît ?
¿Dónde está la biblioteca? Mañana vamos al museo.
Vamos à praia amanhã de manhã, não é?
"""

DIGITS_AND_CODE = """\
1 2 3 4 5 6 7 8 9 10 11 12 100 256 1024 2048 65536
The year 1969, the year 2000, and the year 2024 were all important.
pi = 3.14159, e = 2.71828, sqrt(2) = 1.41421
Call 555-0123 or write to room 42 on floor 7.
Order #98765 shipped on 2024-07-26 at 14:30.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
if x > 0 and y < 0:
    result = {"x": x, "y": y}
class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
import numpy as np
x = np.zeros((2, 3), dtype=np.float32)
int main(void) { printf("hello\\n"); return 0; }
const items = [1, 2, 3].map((n) => n * 2);
SELECT name, count(*) FROM users WHERE age >= 18 GROUP BY name;
\tindented with a tab
    indented with four spaces
"""


def corpus() -> list[str]:
    """A few hundred lines: the hand-written text, generated sentences, other scripts, digits and code."""
    rng = random.Random(1234)
    lines = [ln for ln in ENGLISH.splitlines() if ln]
    for _ in range(300):
        s = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
        lines.append(s)
    lines += [ln for ln in OTHER_SCRIPTS.splitlines() if ln] * 3
    lines += DIGITS_AND_CODE.splitlines() * 3
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Chat templates: the real ones, as published in each family's instruct tokenizer_config.json / chat_template.jinja.
# ----------------------------------------------------------------------------------------------------------------

# meta-llama/Llama-3.1-8B-Instruct. (The 3.2 template is the same apart from taking today's date from strftime_now,
# which would make the reference depend on the day it was made; 3.1 falls back to a fixed "26 Jul 2024".)
LLAMA31_TEMPLATE = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# mistralai/Mistral-7B-Instruct-v0.3. Note: it puts the system message in front of the LAST user message only.
MISTRAL_V03_TEMPLATE = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

# Qwen/Qwen2.5-7B-Instruct (chatml with the default system prompt).
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen/Qwen3-0.6B (and the other Qwen3 hybrid-thinking models): <think> handling, enable_thinking.
QWEN3_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}
"""

# google/gemma-3-1b-it (the text part is the same in the 4b/12b/27b templates): the system message is folded
# into the first user turn, the assistant role is called "model".
GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------

# The pre-tokenizer split regexes of Llama 3 (digits in runs of up to 3) and Qwen2/2.5/3 (single digits).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
ALPHABET_SIZE = 150    # characters kept as pieces by the sentencepiece-style tokenizers; the rest fall back to bytes


def special(content: str) -> AddedToken:
    return AddedToken(content, special=True, normalized=False, lstrip=False, rstrip=False, single_word=False)


def plain_added(content: str) -> AddedToken:
    return AddedToken(content, special=False, normalized=False, lstrip=False, rstrip=False, single_word=False)


def byte_level_tokenizer(split_regex: str, vocab_size: int, nfc: bool, ignore_merges: bool) -> Tokenizer:
    """A GPT-2/Llama-3/Qwen style byte-level BPE: split regex, then bytes-to-unicode, no unknown token.

    ignore_merges (set in Llama 3's tokenizer.json, not in Qwen's): a pre-token that is itself in the vocabulary is
    taken whole, without applying the merges.
    """
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(corpus(), trainer=trainer)
    if ignore_merges:
        spec = json.loads(tok.to_str())
        spec["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(spec))
    # Replaced by ByteLevel + TemplateProcessing where a BOS is added (add_bos_template).
    tok.post_processor = processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True)
    return tok


def add_bos_template(tok: Tokenizer, bos: str, byte_level: bool) -> None:
    bos_id = tok.token_to_id(bos)
    template = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                             special_tokens=[(bos, bos_id)])
    if byte_level:
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True), template])
    else:
        tok.post_processor = template


def sentencepiece_style_tokenizer(head_tokens: list[str], n_pieces: int, style: str) -> Tokenizer:
    """A sentencepiece-converted style BPE with byte fallback.

    Vocabulary layout as in the real checkpoints: the control tokens first (head_tokens, at ids 0..), then the 256
    <0xNN> byte tokens, then the trained pieces. style "mistral": Metaspace pre-tokenizer (dummy prefix on the first
    word, no split), decoder Replace+ByteFallback+Fuse+Strip, as transformers 5's LlamaTokenizer builds it.
    style "gemma": no dummy prefix, spaces replaced by "▁" in a normalizer, decoder Replace+ByteFallback+Fuse, as
    transformers 5's GemmaTokenizer builds it.
    """
    # Train the pieces on words marked with "▁" (sentencepiece's split_by_whitespace: no piece crosses a word start).
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if style == "mistral" else "never", split=True)
    # The trainer's own limit_alphabet breaks ties between equally frequent characters in hash-map order, which
    # changes from run to run; choose the alphabet here instead (most frequent first, ties by code point), so that
    # rarer characters (most CJK, all emoji) are left to the byte fallback.
    counts: dict[str, int] = {}
    for line in corpus():
        for ch in line.replace(" ", "▁"):
            counts[ch] = counts.get(ch, 0) + 1
    counts["▁"] = counts.get("▁", 0) + 10**9
    alphabet = sorted(counts, key=lambda ch: (-counts[ch], ch))[:ALPHABET_SIZE]
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, min_frequency=2, show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet), special_tokens=[],
                                  max_token_length=16)
    trainer_tok.train_from_iterator(corpus(), trainer=trainer)
    trained = json.loads(trainer_tok.to_str())["model"]
    pieces = sorted(trained["vocab"].items(), key=lambda kv: kv[1])
    vocab: dict[str, int] = {}
    for t in head_tokens + BYTE_TOKENS:
        vocab[t] = len(vocab)
    for piece, _ in pieces:
        if piece not in vocab:
            vocab[piece] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if style == "mistral":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(content=" ", left=1, right=0)])
    else:
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tok


def build_tokenizer(family: str) -> tuple[PreTrainedTokenizerFast, dict]:
    """The family's tokenizer wrapped for transformers, and facts the model config needs."""
    if family == "llama":
        tok = byte_level_tokenizer(LLAMA3_SPLIT, vocab_size=420, nfc=False, ignore_merges=True)
        # Llama 3's specials in their real order (128000 + 0..10 there).
        names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                 "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                 "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
        tok.add_special_tokens([special(n) for n in names])
        add_bos_template(tok, "<|begin_of_text|>", byte_level=True)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                     eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>",
                                     chat_template=LLAMA31_TEMPLATE, clean_up_tokenization_spaces=True,
                                     model_max_length=131072)
        gen_eos = ["<|end_of_text|>", "<|eot_id|>"]
        model_eos = "<|end_of_text|>"
    elif family == "mistral":
        head = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"]
        tok = sentencepiece_style_tokenizer(head, n_pieces=240, style="mistral")
        tok.add_special_tokens([special(n) for n in head])
        add_bos_template(tok, "<s>", byte_level=False)
        # No pad token, as in the real Mistral tokenizers (generate then pads with eos).
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                     pad_token=None, chat_template=MISTRAL_V03_TEMPLATE,
                                     clean_up_tokenization_spaces=False, model_max_length=32768)
        gen_eos = ["</s>"]
        model_eos = "</s>"
    elif family in ("qwen2", "qwen3"):
        tok = byte_level_tokenizer(QWEN_SPLIT, vocab_size=420, nfc=True, ignore_merges=False)
        tok.add_special_tokens([special(n) for n in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]])
        extra = ["<tool_call>", "</tool_call>"] + (["<think>", "</think>"] if family == "qwen3" else [])
        tok.add_tokens([plain_added(n) for n in extra])
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                     pad_token="<|endoftext|>", unk_token=None,
                                     chat_template=QWEN25_TEMPLATE if family == "qwen2" else QWEN3_TEMPLATE,
                                     clean_up_tokenization_spaces=False, model_max_length=131072,
                                     split_special_tokens=False)
        gen_eos = ["<|im_end|>", "<|endoftext|>"]
        model_eos = "<|im_end|>"
    elif family == "gemma3":
        head = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                "<start_of_image>", "<end_of_image>"]
        tok = sentencepiece_style_tokenizer(head, n_pieces=240, style="gemma")
        tok.add_special_tokens([special(n) for n in head])
        add_bos_template(tok, "<bos>", byte_level=False)
        hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                     pad_token="<pad>", mask_token="<mask>", chat_template=GEMMA3_TEMPLATE,
                                     clean_up_tokenization_spaces=False, model_max_length=32768)
        gen_eos = ["<eos>", "<end_of_turn>"]
        model_eos = "<eos>"
    else:
        raise ValueError(family)
    size = len(hf)  # the full vocabulary, added tokens included
    facts = {
        "tokenizer_size": size,
        "vocab_size": ((size + 7) // 8) * 8,  # rounded up to a multiple of 8: the last rows are unused
        "bos_id": hf.bos_token_id,
        "pad_id": hf.pad_token_id,
        "model_eos_id": hf.convert_tokens_to_ids(model_eos),
        "gen_eos_ids": [hf.convert_tokens_to_ids(t) for t in gen_eos],
    }
    return hf, facts


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------

COMMON = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.02)


def build_config(family: str, facts: dict):
    ids = dict(vocab_size=facts["vocab_size"], bos_token_id=facts["bos_id"], eos_token_id=facts["model_eos_id"],
               pad_token_id=facts["pad_id"])
    if family == "llama":
        # original_max_position_embeddings 64 with head_dim 16 and theta 5e5 puts one frequency in each of the three
        # llama3 regimes: wavelength 6.3 < 64/4 (kept), 32.5 in [16, 64] (smoothly blended), the rest > 64 (/ 8).
        return LlamaConfig(**COMMON, **ids, num_hidden_layers=2, tie_word_embeddings=False, hidden_act="silu",
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 64})
    if family == "mistral":
        return MistralConfig(**COMMON, **ids, num_hidden_layers=2, tie_word_embeddings=False,
                             sliding_window=SLIDING_WINDOW, head_dim=16,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if family == "qwen2":
        return Qwen2Config(**COMMON, **ids, num_hidden_layers=2, tie_word_embeddings=True, use_sliding_window=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "qwen3":
        return Qwen3Config(**COMMON, **ids, num_hidden_layers=2, tie_word_embeddings=False, head_dim=32,
                           use_sliding_window=False,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    if family == "gemma3":
        return Gemma3TextConfig(**COMMON, **ids, num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=24,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                sliding_window=SLIDING_WINDOW, hidden_activation="gelu_pytorch_tanh",
                                tie_word_embeddings=True, final_logit_softcapping=None, attn_logit_softcapping=None,
                                rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    raise ValueError(family)


# Standard deviations of the re-initialisation. A random model tends to fall into a loop of one or two tokens under
# greedy decoding, above all with tied embeddings: the logit of the token just read gets |e_t|^2 / |h| on top of the
# noise. Larger output projections (o_proj, down_proj) make the layers' share of the residual stream dominate the
# embedding's. Gemma RMS-normalises each sublayer's output before adding it to the residual stream and multiplies
# the embeddings by sqrt(hidden), so it gets post-sublayer norm scales 1 + w ~ 7 instead, and q/k norm scales
# 1 + w ~ 2 for sharper attention (so the next token depends on more than the current one). The values were chosen
# by counting distinct tokens in greedy continuations over a few seeds.
SCALES = {
    "default": dict(embed=0.5, lm_head=0.4, proj=0.15, out_proj=0.15, bias=0.1, norm=0.1, post_norm_mean=0.0,
                    qk_norm_mean=0.0),
    "qwen2": dict(embed=0.5, lm_head=0.4, proj=0.15, out_proj=0.6, bias=0.1, norm=0.1, post_norm_mean=0.0,
                  qk_norm_mean=0.0),
    "gemma3": dict(embed=0.3, lm_head=0.4, proj=0.15, out_proj=0.15, bias=0.1, norm=0.1, post_norm_mean=6.0,
                   qk_norm_mean=1.0),
}


def reinit(model: torch.nn.Module, seed: int, family: str) -> None:
    """Draw every parameter again from a seeded generator, so outputs are far from uniform.

    Linear weights N(0, 0.15^2) (the untied LM head 0.4, qwen2's output projections 0.6: see SCALES), biases
    N(0, 0.1^2), embeddings N(0, 0.5^2) (gemma3 0.3); RMSNorm scales 1 + N(0, 0.1^2), except Gemma's, which
    multiply by (1 + w) and so get w ~ N(0, 0.1^2) (post-sublayer norms N(6, 0.1^2), q/k norms N(1, 0.1^2)).
    """
    sc = SCALES.get(family, SCALES["default"])
    g = torch.Generator().manual_seed(seed)
    norm_params = set()
    for mname, module in model.named_modules():
        if "RMSNorm" in type(module).__name__:
            for pname, _ in module.named_parameters(recurse=False):
                norm_params.add(f"{mname}.{pname}" if mname else pname)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name in norm_params:
                base = 0.0 if family == "gemma3" else 1.0
                if family == "gemma3" and ("post_attention_layernorm" in name or "post_feedforward_layernorm" in name):
                    base = sc["post_norm_mean"]
                if family == "gemma3" and ("q_norm" in name or "k_norm" in name):
                    base = sc["qk_norm_mean"]
                p.copy_(base + sc["norm"] * noise)
            elif "embed_tokens" in name:
                p.copy_(sc["embed"] * noise)
            elif name.startswith("lm_head"):
                p.copy_(sc["lm_head"] * noise)
            elif name.endswith(".bias"):
                p.copy_(sc["bias"] * noise)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(sc["out_proj"] * noise)
            elif p.ndim == 2:
                p.copy_(sc["proj"] * noise)
            else:
                raise ValueError(f"unexpected parameter {name} {tuple(p.shape)}")


# ----------------------------------------------------------------------------------------------------------------
# Reference texts
# ----------------------------------------------------------------------------------------------------------------

TEXTS = [
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest to find its friends before "
    "the sun goes down behind the mountains far away.",
    "def add(a, b):\n    return a + b\n\nPrivet: Привет, мир! 3.14159 and 1234567 are numbers. "
    "我喜欢学习语言。 Γειά σου κόσμε! The end of the second text is here.",
]
PROMPT_TEXT = "Once upon a time, in a kingdom by the sea, there lived a curious princess who loved"

SPECIALS_IN_TEXT = {
    "llama": ["<|start_header_id|>", "<|eot_id|>"],
    "mistral": ["[INST]", "</s>"],
    "qwen2": ["<|im_start|>", "<|im_end|>"],
    "qwen3": ["<|im_start|>", "<think>"],
    "gemma3": ["<start_of_turn>", "<end_of_turn>"],
}


def tokenizer_text(family: str) -> str:
    a, b = SPECIALS_IN_TEXT[family]
    return ("Héllo wörld! Café, naïve façade, Ångström. Привет, мир! Γειά σου κόσμε. "
            f"{a}user{b} 你好，世界。こんにちは。 مرحبا بالعالم "
            "👍🏽 family: 👨‍👩‍👧‍👦 flag: 🇫🇷 numbers 1234567 and 3.14159,   three spaces,\ttab\t\tand\n\nnewlines\n"
            "a space before punctuation , don 't ( kept: transformers 5 ignores "
            "clean_up_tokenization_spaces for BPE ) .\n"
            f"  indented {b} end.")


CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ],
    [
        {"role": "user", "content": "Hello! Can you help me with a recipe?"},
        {"role": "assistant", "content": "Of course. What would you like to cook?"},
        {"role": "user", "content": "Something with eggs, flour and sugar."},
        {"role": "assistant", "content": "You could bake a simple sponge cake: whisk the eggs and sugar, then fold in "
                                         "the flour."},
    ],
    [
        {"role": "user", "content": "Translate 'good morning' into Russian."},
        {"role": "assistant", "content": "Доброе утро."},
    ],
]


def as_ids(out) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding by default in transformers 5."""
    ids = out["input_ids"] if not isinstance(out, list) else out
    return [int(i) for i in ids]


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------

def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez_compressed with fixed zip timestamps (numpy stamps the current time, so bytes would differ)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def top2_gap(scores: torch.Tensor) -> torch.Tensor:
    top = torch.topk(scores.float(), 2, dim=-1).values
    return top[..., 0] - top[..., 1]


def make_family(family: str, out_dir: Path, seed: int) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tok, facts = build_tokenizer(family)
    config = build_config(family, facts)

    for attempt in range(20):
        torch.manual_seed(seed + attempt)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        reinit(model, seed + attempt, family)
        model.eval()
        model.generation_config = GenerationConfig(
            bos_token_id=facts["bos_id"], eos_token_id=facts["gen_eos_ids"], pad_token_id=facts["pad_id"])
        for f in out_dir.iterdir():
            (shutil.rmtree if f.is_dir() else os.remove)(f)
        if family == "llama":
            model.save_pretrained(out_dir, max_shard_size="250KB")
        else:
            model.save_pretrained(out_dir)
        hf_tok.save_pretrained(out_dir)

        # Everything below runs on what was saved, reloaded the way a user would load it.
        tok = AutoTokenizer.from_pretrained(out_dir)
        ref_model = AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32)
        ref_model.eval()
        saved, loaded = model.state_dict(), ref_model.state_dict()
        assert saved.keys() == loaded.keys(), f"{family}: {sorted(set(saved) ^ set(loaded))}"
        for name in saved:
            assert torch.equal(saved[name], loaded[name]), f"{family}: {name} changed on reload"

        # 1. Logits of two 40-token sequences, one forward pass, eager attention, no padding.
        rows = []
        for text in TEXTS:
            ids = tok(text)["input_ids"]
            assert len(ids) >= SEQ_LEN, f"{family}: text too short ({len(ids)} tokens)"
            rows.append(ids[:SEQ_LEN])
        input_ids = torch.tensor(rows, dtype=torch.long)
        with torch.no_grad():
            logits = ref_model(input_ids=input_ids).logits.float()
        logit_std = float(logits[..., :facts["tokenizer_size"]].std())

        # 2. Greedy decoding with the KV cache, exactly NEW_TOKENS tokens: plain argmax, with no end-of-sequence id
        # (so an eos is emitted like any token and nothing stops or suppresses it), as a sampler without stop ids.
        prompt = torch.tensor([tok(PROMPT_TEXT)["input_ids"][:PROMPT_LEN]], dtype=torch.long)
        with torch.no_grad():  # a plain loop: the model's own KV cache, argmax, no logits processor, no stop id
            out = ref_model(input_ids=prompt, use_cache=True)
            cache, step_scores, tokens = out.past_key_values, [out.logits[:, -1]], []
            for _ in range(NEW_TOKENS):
                tokens.append(step_scores[-1].argmax(-1, keepdim=True))
                if len(tokens) == NEW_TOKENS:
                    break
                out = ref_model(input_ids=tokens[-1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                step_scores.append(out.logits[:, -1])
        new_tokens = torch.cat(tokens, dim=1)
        assert new_tokens.shape == (1, NEW_TOKENS), new_tokens.shape
        gen = types.SimpleNamespace(sequences=torch.cat([prompt, new_tokens], dim=1), scores=step_scores)
        scores = torch.stack(gen.scores, dim=1)[0].float()  # (NEW_TOKENS, V), after the logits processors
        gaps = top2_gap(scores)
        distinct = len(set(new_tokens[0].tolist()))
        # The same tokens from full forwards without a cache (teacher-forced), as a check on the cached path.
        with torch.no_grad():
            full = ref_model(input_ids=gen.sequences).logits[0, prompt.shape[1] - 1:-1].float()
        nocache_ok = bool(torch.equal(full.argmax(-1), new_tokens[0]))
        min_gap = float(gaps.min())
        if min_gap > MIN_GAP and nocache_ok and distinct >= MIN_DISTINCT:
            break
        print(f"[{family}] seed {seed + attempt}: smallest greedy gap {min_gap:.2e}, no-cache match {nocache_ok}, "
              f"{distinct} distinct greedy tokens; drawing again")
    else:
        raise RuntimeError(f"{family}: no seed gave a greedy reference without near ties")

    # The sliding window must matter: the same weights with the window opened up give the same logits for the first
    # SLIDING_WINDOW positions and different ones after.
    window_effect = None
    if getattr(ref_model.config, "sliding_window", None):
        wide = AutoModelForCausalLM.from_pretrained(out_dir, attn_implementation="eager", dtype=torch.float32,
                                                    sliding_window=10**6)
        wide.eval()
        with torch.no_grad():
            wide_logits = wide(input_ids=input_ids).logits.float()
        inside = float((wide_logits - logits)[:, :SLIDING_WINDOW].abs().max())
        outside = float((wide_logits - logits)[:, SLIDING_WINDOW:].abs().max())
        assert inside < 1e-4 and outside > 1e-1, (family, inside, outside)
        window_effect = {"max_abs_logit_change_first_window": inside, "max_abs_logit_change_after": outside}

    save_npz(out_dir / "reference.npz", {
        "input_ids": input_ids.numpy().astype(np.int64),
        "logits": logits.numpy().astype(np.float32),
        "greedy_prompt": prompt.numpy().astype(np.int64),
        "greedy_tokens": new_tokens.numpy().astype(np.int64),
    })

    # 3. Tokenizer round trip on a mixed-script text with the family's special tokens spelled out.
    text = tokenizer_text(family)
    ids_with = [int(i) for i in tok(text)["input_ids"]]
    ids_plain = [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]
    probe = tok("a")["input_ids"]
    add_bos = tok.bos_token_id is not None and len(probe) > 0 and probe[0] == tok.bos_token_id

    # 4. Chat templates.
    conversations = []
    for conv in CONVERSATIONS:
        head = conv[:-1]
        entry = {
            "messages": conv,
            "text": tok.apply_chat_template(conv, tokenize=False),
            "ids": as_ids(tok.apply_chat_template(conv, tokenize=True)),
            "prompt_text": tok.apply_chat_template(head, tokenize=False, add_generation_prompt=True),
            "prompt_ids": as_ids(tok.apply_chat_template(head, tokenize=True, add_generation_prompt=True)),
        }
        if family == "qwen3":
            entry["prompt_text_no_thinking"] = tok.apply_chat_template(
                head, tokenize=False, add_generation_prompt=True, enable_thinking=False)
            entry["prompt_ids_no_thinking"] = as_ids(tok.apply_chat_template(
                head, tokenize=True, add_generation_prompt=True, enable_thinking=False))
        conversations.append(entry)

    gen_cfg = GenerationConfig.from_pretrained(out_dir)
    gen_eos = gen_cfg.eos_token_id if isinstance(gen_cfg.eos_token_id, list) else [gen_cfg.eos_token_id]
    reference = {
        "family": family,
        "model_class": type(ref_model).__name__,
        "tokenizer_class": type(tok).__name__,
        "vocab_size": ref_model.config.vocab_size,
        "tokenizer_size": len(tok),
        "seed": seed + attempt,
        "logits_note": "reference.npz: logits of input_ids, one forward pass, attn_implementation='eager', float32",
        "logit_std": logit_std,
        "input_texts": TEXTS,
        "greedy_prompt_text": PROMPT_TEXT,
        "greedy_new_tokens": NEW_TOKENS,
        "greedy_min_top2_gap": min_gap,
        "greedy_top2_gaps": [round(float(x), 6) for x in gaps],
        "greedy_distinct_tokens": distinct,
        "greedy_matches_no_cache_forward": nocache_ok,
        "greedy_text": tok.decode(new_tokens[0].tolist()),
        "tokenizer_text": text,
        "tokenizer_ids_with_specials": ids_with,
        "tokenizer_ids_plain": ids_plain,
        "decoded": tok.decode(ids_plain),
        "decoded_skip_special": tok.decode(ids_plain, skip_special_tokens=True),
        "tokens_plain": tok.convert_ids_to_tokens(ids_plain),
        "conversations": conversations,
        "bos_token": tok.bos_token,
        "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token,
        "eos_token_id": tok.eos_token_id,
        "pad_token": tok.pad_token,
        "pad_token_id": tok.pad_token_id,
        "unk_token": tok.unk_token,
        "unk_token_id": tok.unk_token_id,
        "add_bos": add_bos,
        "generation_eos_token_ids": [int(i) for i in gen_eos],
        # The RoPE inverse frequencies transformers computed (after llama3 scaling where configured), per buffer.
        "rope_inv_freq": {name: [float(x) for x in buf] for name, buf in ref_model.named_buffers()
                          if name.endswith("inv_freq") and "original" not in name},
        "sliding_window_effect": window_effect,
        "sliding_window_note": "transformers masks key j for query i unless i - sliding_window < j <= i (the window "
                               "holds sliding_window positions, the query's own included)",
        "config_eos_token_id": ref_model.config.eos_token_id,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__, "numpy": np.__version__},
    }
    with open(out_dir / "reference.json", "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"[{family}] vocab {ref_model.config.vocab_size} (tokenizer {len(tok)}), logit std {logit_std:.2f}, "
          f"smallest greedy gap {min_gap:.3g}, seed {seed + attempt}, add_bos {add_bos}")
    return reference


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "fixtures"))
    parser.add_argument("--family", nargs="*", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-determinism", action="store_true",
                        help="build twice into temporary folders and compare the bytes instead of writing --out")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    if args.check_determinism:
        with tempfile.TemporaryDirectory() as tmp:
            digests = []
            for run in range(2):
                root = Path(tmp) / f"run{run}"
                for fam in args.family:
                    make_family(fam, root / fam, args.seed + 1000 * FAMILIES.index(fam))
                digests.append(tree_digest(root))
            diff = sorted(k for k in set(digests[0]) | set(digests[1]) if digests[0].get(k) != digests[1].get(k))
            print("deterministic" if not diff else f"files that differ between runs: {diff}")
            return 0 if not diff else 1

    out = Path(args.out)
    for fam in args.family:
        make_family(fam, out / fam, args.seed + 1000 * FAMILIES.index(fam))
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"fixtures in {out}: {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
