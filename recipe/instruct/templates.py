"""Chat templates: render a conversation to text with Jinja, the way ``transformers`` does, and find the
assistant turns in that text (the only tokens the loss counts, unless prompts are trained on too).

A checkpoint's own template is the ``chat_template`` of its ``tokenizer_config.json`` (or its
``chat_template.jinja`` file); without one, a built-in is named: ``alpaca`` (the Stanford Alpaca prompt),
``chatml`` (OpenAI's ChatML, as Qwen uses), ``llama3`` (Meta's Llama 3 headers) or ``plain`` (each turn's
text on its own line). Every built-in closes an assistant turn with ``eos_token``.

Rendering follows ``transformers.apply_chat_template``: a sandboxed Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``,
``strftime_now`` and a ``tojson`` that does not escape HTML; the variables are ``messages``,
``add_generation_prompt`` and the special tokens (``bos_token``, ``eos_token``, ...).

Assistant spans (character ranges of the rendered text):

- a template with ``{% generation %} ... {% endgeneration %}`` marks them itself (transformers'
  ``return_assistant_tokens_mask``); here the block's text is wrapped in two private-use characters
  that are then removed, their positions giving the spans;
- otherwise, by rendering prefix by prefix: assistant turn i starts where the rendering of
  ``messages[:i]`` with the generation prompt ends, and ends where the rendering of ``messages[:i + 1]``
  ends. Both must be prefixes of the whole rendering; a template for which they are not is refused.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path

BUILTIN = {
    "alpaca": (
        "{{ bos_token }}{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% else %}"
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "{% endif %}{% for message in messages if message['role'] != 'system' %}"
        "{% if message['role'] == 'user' %}{{ '\\n\\n### Instruction:\\n' }}{{ message['content'] }}\n\n### Response:\n"
        "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"),
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}<|im_end|>{% endif %}{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}<|eot_id|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "plain": (
        "{{ bos_token }}{% for message in messages %}{{ message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"),
}
OPEN, CLOSE = "\ue000", "\ue001"  # private-use characters around a {% generation %} block's text


def _environment():
    try:
        import jinja2
    except ImportError:
        raise ImportError("chat templates need the 'jinja2' package (>= 3.1.6): pip install jinja2") from None
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationMarkers(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            return OPEN + caller() + CLOSE

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationMarkers, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env


def _strip_markers(marked: str) -> tuple[str, list[tuple[int, int]]]:
    """The text without the generation markers, and the (start, end) spans they enclosed."""
    text, spans, length, start = [], [], 0, None
    for piece in re.split(f"([{OPEN}{CLOSE}])", marked):
        if piece == OPEN:
            start = length
        elif piece == CLOSE:
            spans.append((start, length))
        else:
            text.append(piece)
            length += len(piece)
    return "".join(text), spans


class ChatTemplate:
    """A compiled chat template and the special-token strings it is rendered with."""

    def __init__(self, source: str, special_tokens: dict[str, str], name: str = "checkpoint"):
        if not isinstance(source, str) or not source:
            raise ValueError(f"a chat template must be a non-empty Jinja string, got {source!r:.60}")
        self.source, self.special_tokens, self.name = source, dict(special_tokens), name
        self.marks_generation = re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None
        self._template = _environment().from_string(source)

    def _render_marked(self, messages: list[dict], add_generation_prompt: bool) -> str:
        for message in messages:
            if OPEN in message["content"] or CLOSE in message["content"]:
                raise ValueError(f"message content contains the reserved characters U+E000/U+E001: "
                                 f"{message['content']!r:.60}")
        import jinja2

        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special_tokens)
        except jinja2.TemplateError as err:  # raise_exception() of the template, or an undefined variable
            raise ValueError(f"chat template {self.name!r} cannot render this conversation: {err}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The conversation as text (``add_generation_prompt``: end with the assistant header, for generation)."""
        return _strip_markers(self._render_marked(messages, add_generation_prompt))[0]

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """``(text, spans)``: the rendering and the (start, end) character range of every assistant turn."""
        text, marked_spans = _strip_markers(self._render_marked(messages, False))
        if self.marks_generation:
            return text, marked_spans
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[:i + 1])
            if not (text.startswith(before) and text.startswith(through) and len(before) <= len(through)):
                raise ValueError(f"chat template {self.name!r} is not prefix-stable (rendering the first {i + 1} "
                                 f"messages does not begin the whole conversation); mark its assistant turns "
                                 f"with {{% generation %}} ... {{% endgeneration %}}")
            spans.append((len(before), len(through)))
        return text, spans


def checkpoint_template_source(model_dir: str | Path) -> str | None:
    """The template a checkpoint ships: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or a list of ``{name, template}`` of which ``default`` is taken)."""
    model_dir = Path(model_dir)
    if (model_dir / "chat_template.jinja").is_file():
        return (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    config_path = model_dir / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    source = json.loads(config_path.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(source, list):
        source = {entry.get("name"): entry.get("template") for entry in source}.get("default")
    return source


def load_template(model_dir: str | Path | None, special_tokens: dict[str, str], name: str = "auto") -> ChatTemplate:
    """``name="auto"``: the checkpoint's own template, else ``chatml``; or a built-in by name."""
    if name == "auto":
        source = checkpoint_template_source(model_dir) if model_dir is not None else None
        if source is not None:
            return ChatTemplate(source, special_tokens, name="checkpoint")
        name = "chatml"
    if name not in BUILTIN:
        raise ValueError(f"template must be 'auto' or one of {', '.join(BUILTIN)}, got {name!r}")
    return ChatTemplate(BUILTIN[name], special_tokens, name=name)
