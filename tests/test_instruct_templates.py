"""recipe.instruct templates + encode: the same token ids as transformers' apply_chat_template, and
targets on assistant turns only (the same tokens as transformers' assistant mask)."""
import json

import pytest

import llama
from recipe.instruct import BUILTIN, ChatTemplate, TextEncoder, encode_example, load_template, special_tokens
from recipe.instruct.templates import checkpoint_template_source
from reference_libs import reference

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
          "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
          " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
          " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CHATML_MARKED = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
                 "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
                 "{% endgeneration %}{{ '\n' }}{% else %}{{ message['content'] + '<|im_end|>\n' }}{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|im_start|>", "<|im_end|>"]
CHAT = [{"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What does json.dumps do?"},
        {"role": "assistant", "content": "Serialize obj to a JSON formatted str.  "},
        {"role": "user", "content": "And its signature?"},
        {"role": "assistant", "content": "json.dumps(obj, *, skipkeys=False, ensure_ascii=True, ...) -> str"}]


def train_bpe(vocab_size: int, special_tokens: list[str], documents: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained offline on the first ``documents`` pydoc topics."""
    tokenizers = reference("tokenizers")
    from recipe import data

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(data.load_documents(None).values())[:documents], trainer)
    return tok


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json with Llama-3 and ChatML control tokens, trained offline."""
    tok = train_bpe(500, SPECIALS, documents=2)
    directory = tmp_path_factory.mktemp("bpe")
    tok.save(str(directory / "tokenizer.json"))
    return directory


def checkpoint(bpe_dir, tmp_path, template, bos, eos):
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "chat_template": template}
    if bos is not None:
        config["bos_token"] = {"__type": "AddedToken", "content": bos, "special": True}  # the AddedToken form some checkpoints use
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("template, bos, eos", [(LLAMA3, "<|begin_of_text|>", "<|eot_id|>"),
                                                (CHATML, None, "<|im_end|>"), (CHATML_MARKED, None, "<|im_end|>")],
                         ids=["llama3", "chatml", "chatml-generation-marked"])
def test_checkpoint_templates_give_transformers_ids_and_assistant_mask(bpe_dir, tmp_path, template, bos, eos):
    transformers = reference("transformers")
    model_dir = checkpoint(bpe_dir, tmp_path, template, bos, eos)
    theirs = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    expected = theirs.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)

    tokenizer = llama.load_tokenizer(model_dir)
    special = special_tokens(model_dir, tokenizer)
    chat_template = load_template(model_dir, special, name="auto")
    assert chat_template.name == "checkpoint" and chat_template.source == template
    ours = encode_example({"messages": CHAT}, chat_template, TextEncoder(tokenizer, special))
    assert ours.ids == list(expected["input_ids"])
    eos_id = tokenizer.token_to_id(eos)
    assert sum(i == eos_id and t for i, t in zip(ours.ids, ours.targets)) == 2  # each response ends with EOS
    if template == CHATML_MARKED:
        assert [int(t) for t in ours.targets] == list(expected["assistant_masks"])
    targets = tokenizer.decode([i for i, t in zip(ours.ids, ours.targets) if t], skip_special_tokens=False)
    answers = [m["content"] for m in CHAT if m["role"] == "assistant"]
    trimmed = [a.strip() for a in answers] if template == LLAMA3 else answers
    assert targets == "".join(a + eos + "\n" * (template == CHATML) for a in trimmed)


def test_prefix_diff_finds_the_same_targets_as_generation_markers(bpe_dir, tmp_path):
    tokenizer = llama.load_tokenizer(checkpoint(bpe_dir, tmp_path, CHATML, None, "<|im_end|>"))
    special = special_tokens(tmp_path, tokenizer)
    encoder = TextEncoder(tokenizer, special)
    by_prefix = encode_example({"messages": CHAT}, ChatTemplate(CHATML, special), encoder)
    marked = encode_example({"messages": CHAT}, ChatTemplate(CHATML_MARKED, special), encoder)
    assert by_prefix.ids == marked.ids
    # the prefix diff also counts the newline after <|im_end|> (it belongs to the assistant turn's rendering)
    newline = encoder.encode("\n")[0]
    extra = [k for k, (a, b) in enumerate(zip(by_prefix.targets, marked.targets)) if a != b]
    assert extra and all(not marked.targets[k] and by_prefix.ids[k] == newline[0] for k in extra)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_templates_target_exactly_each_response_and_its_eos(name):
    tokenizer = llama.ByteTokenizer()
    special = special_tokens(None, tokenizer)
    encoder = TextEncoder(tokenizer, special)
    encoded = encode_example({"messages": CHAT}, load_template(None, special, name), encoder)
    targets = [i for i, t in zip(encoded.ids, encoded.targets) if t]
    responses = [m["content"].strip() if name == "llama3" else m["content"] for m in CHAT if m["role"] == "assistant"]
    trailing = [10] if name == "chatml" else []  # ChatML's newline after the end of a turn
    assert targets == [b for r in responses for b in [*r.encode(), tokenizer.eos_token_id, *trailing]]
    everything = encode_example({"messages": CHAT}, load_template(None, special, name), encoder, train_on_prompt=True)
    assert everything.ids == encoded.ids and all(everything.targets)


def test_plain_text_is_bos_text_eos_all_targets():
    tokenizer = llama.ByteTokenizer()
    encoder = TextEncoder(tokenizer, special_tokens(None, tokenizer))
    encoded = encode_example({"text": "héllo"}, None, encoder)
    assert encoded.ids == tokenizer.encode("héllo", bos=True, eos=True) and all(encoded.targets)


def test_eos_is_inserted_after_a_response_the_template_leaves_open():
    tokenizer = llama.ByteTokenizer()
    special = special_tokens(None, tokenizer)
    template = ChatTemplate("{% for m in messages %}{{ m['content'] }}|{% endfor %}", special)
    encoded = encode_example({"messages": CHAT[1:3]}, template, TextEncoder(tokenizer, special))
    text = "What does json.dumps do?|" + CHAT[2]["content"] + "|"
    assert encoded.ids == [*text.encode(), tokenizer.eos_token_id]
    assert encoded.targets == [False] * 25 + [True] * (len(CHAT[2]["content"]) + 2)


def test_a_template_that_is_not_prefix_stable_is_refused():
    special = special_tokens(None, llama.ByteTokenizer())
    template = ChatTemplate("{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}", special)
    with pytest.raises(ValueError, match="not prefix-stable"):
        template.assistant_spans(CHAT)


def test_template_sources_and_names(tmp_path):
    special = {"bos_token": "<s>", "eos_token": "</s>"}
    assert checkpoint_template_source(tmp_path) is None
    assert load_template(tmp_path, special).name == "chatml"  # no template of its own: the default built-in
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": CHATML}]}))
    assert checkpoint_template_source(tmp_path) == CHATML
    (tmp_path / "chat_template.jinja").write_text(LLAMA3)
    assert load_template(tmp_path, special).source == LLAMA3
    assert load_template(tmp_path, special, name="alpaca").source == BUILTIN["alpaca"]
    with pytest.raises(ValueError, match="template must be 'auto' or one of alpaca, chatml, llama3, plain, got 'vicuna'"):
        load_template(tmp_path, special, name="vicuna")


def test_a_template_error_is_a_value_error_naming_the_template():
    special = special_tokens(None, llama.ByteTokenizer())
    template = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}", special)
    with pytest.raises(ValueError, match="chat template 'checkpoint' cannot render this conversation: user first"):
        template.render([{"role": "assistant", "content": "x"}])
    alpaca = load_template(None, special, "alpaca")  # an assistant-only conversation renders
    assert alpaca.render([{"role": "assistant", "content": "x"}]).endswith("request.x</s>")
