"""Chat tokenizers built locally (no downloads): a byte-level BPE trained on the shared real
trajectories, saved with one of several chat templates of different families.

- `chatml`: ChatML with tools in the system turn and `<tool_call>` blocks (Qwen-like),
  end of turn `<|im_end|>`;
- `llama3`: header tokens, a BOS token, `<|eot_id|>` closing each turn with no newline after
  it, tool output as the `ipython` role (Llama-3-like);
- `chatml_drops_past_thoughts`: ChatML that shows the text of past assistant turns only on the
  last one, as reasoning templates do: not prefix-stable, an export must refuse it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from tests.helpers import all_trajectory_files

CHATML = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a coding agent.{% endif %}

# Tools
<tools>
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}</tools><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}<|im_start|>assistant
{% generation %}{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments }}}
</tool_call>{% endfor %}<|im_end|>{% endgeneration %}
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA3 = """\
{{- bos_token }}
{%- if tools or messages[0].role == 'system' %}<|start_header_id|>system<|end_header_id|>

{% if messages[0].role == 'system' %}{{ messages[0].content }}{% endif %}
{%- if tools %}

You can call these functions:
{% for tool in tools %}{{ tool | tojson(indent=2) }}
{% endfor %}{% endif %}<|eot_id|>
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}<|start_header_id|>assistant<|end_header_id|>

{% generation %}{{ message.content or '' }}
{%- for call in message.tool_calls or [] %}{"name": "{{ call.function.name }}", "parameters": {{ call.function.arguments }}}{% endfor %}<|eot_id|>{% endgeneration %}
{%- else %}<|start_header_id|>{{ 'ipython' if message.role == 'tool' else message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

# Past assistant turns lose their text; only the last assistant turn keeps it.
CHATML_DROPS_PAST_THOUGHTS = CHATML.replace(
    "{% if message.content %}{{ message.content }}{% endif %}",
    "{% if message.content and loop.last %}{{ message.content }}{% endif %}",
)

TEMPLATES: dict[str, tuple[str, dict[str, str]]] = {
    "chatml": (CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": (
        LLAMA3,
        {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|pad|>"},
    ),
    "chatml_drops_past_thoughts": (
        CHATML_DROPS_PAST_THOUGHTS,
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    ),
}

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|pad|>",
]


def _corpus() -> Iterator[str]:
    for path in all_trajectory_files():
        text = path.read_text(encoding="utf-8", errors="replace")
        for start in range(0, len(text), 4096):
            yield text[start : start + 4096]
    yield json.dumps({"name": "bash", "arguments": {"command": "ls"}})


def train_bpe(corpus: Iterable[str], vocab_size: int) -> str:
    """A byte-level BPE of `vocab_size` tokens trained on `corpus`, as tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    return str(bpe.to_str())


@lru_cache(maxsize=2)
def trained_bpe(vocab_size: int = 4000) -> str:
    """A byte-level BPE trained on the real trajectories (~2 s), as tokenizer.json text."""
    return train_bpe(_corpus(), vocab_size)


def save_tokenizer(directory: Path, bpe_json: str, template: str = "chatml") -> Path:
    """Save a trained BPE (tokenizer.json text) with `template` to `directory`, loadable with
    `AutoTokenizer.from_pretrained(directory)`."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    chat_template, special = TEMPLATES[template]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(bpe_json), **special)
    tokenizer.chat_template = chat_template
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return directory


def build_tokenizer(directory: Path, template: str = "chatml", vocab_size: int = 4000) -> Path:
    """Save the BPE trained on the real trajectories with `template` to `directory`."""
    return save_tokenizer(directory, trained_bpe(vocab_size), template)
