"""Conversation records for ``fastpeft train``: reading (``messages`` and ShareGPT), the chat-template layout,
assistant-only labels (checked against transformers' own assistant mask, ``return_assistant_tokens_mask``),
truncation, and the command end to end with ``generate --chat``."""

from __future__ import annotations

import json

import pytest

from fastpeft import cli
from fastpeft.data import _GENERATION_TAG as GENERATION_TAG
from fastpeft.data import IGNORE_INDEX, ByteTokenizer, DataError, HFTokenizer, read_records, tokenize
from fastpeft.train import parse_args, train
from helpers import CHATML, bpe_tokenizer

TOK = ByteTokenizer()
CONVO = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}]



def chat_tokenizer(template: str = CHATML):
    """A small byte-level BPE tokenizer built here (nothing downloaded), with ChatML's special tokens."""
    return bpe_tokenizer(template, "Be terse. hi Hello. 2+2? 4 assistant user system\n")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_messages_and_sharegpt_records_read_alike(tmp_path):
    sharegpt = [{"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
                for m in CONVO]
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVO}, {"conversations": sharegpt},
                                              {"prompt": "p", "response": "r"}])
    rows = read_records(path)
    assert [r["messages"] for r in rows[:2]] == [CONVO, CONVO]
    assert rows[2]["prompt"] == "p"
    other = write_jsonl(tmp_path / "e.jsonl", [{"dialog": CONVO}])
    with pytest.raises(DataError, match="e.jsonl:1: needs string fields"):
        read_records(other)
    assert read_records(other, messages_field="dialog")[0]["messages"] == CONVO


@pytest.mark.parametrize("turns, match", [
    ([], "non-empty list"),
    ([{"role": "user", "content": "hi"}], "no assistant reply"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}], "role 'bot'"),
    ([{"role": "assistant", "content": None}], r"turn 0 \(assistant\) has no string content"),
    ([{"speaker": "user", "text": "hi"}], "needs 'role' and 'content'"),
    (["hi"], "turn 0 is a str"),
])
def test_malformed_conversations_name_the_line(tmp_path, turns, match):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVO}, {"messages": turns}])
    with pytest.raises(DataError, match=f"d.jsonl:2: .*{match}"):
        read_records(path)


def test_byte_tokenizer_learns_each_reply_and_its_eos():
    (sample,) = tokenize([{"messages": CONVO}], TOK, 512)
    assert TOK.decode(sample.input_ids, skip_special_tokens=False) == (
        "<bos><|system|>\nBe terse.\n<|user|>\nhi\n<|assistant|>\nHello.<eos><|user|>\n2+2?\n<|assistant|>\n4<eos>")
    learned = [t for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert [t for t in sample.labels if t != IGNORE_INDEX] == learned
    assert TOK.decode(learned, skip_special_tokens=False) == "Hello.<eos>4<eos>"


def untagged(template: str) -> str:
    """The template without transformers' {% generation %} markers (what most models ship)."""
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def assert_labels_equal_the_mask(template: str, convo=CONVO):
    """fastpeft's labels with the untagged template equal transformers' assistant mask from the tagged one."""
    ours = HFTokenizer(chat_tokenizer(untagged(template)))
    assert not GENERATION_TAG.search(ours.tok.chat_template)
    (sample,) = tokenize([{"messages": convo}], ours, 512)
    ref = chat_tokenizer(template).apply_chat_template(convo, tokenize=True, return_dict=True,
                                                       return_assistant_tokens_mask=True)
    assert sample.input_ids == list(ref["input_ids"])
    assert [label != IGNORE_INDEX for label in sample.labels] == [bool(m) for m in ref["assistant_masks"]]
    assert sum(m for m in ref["assistant_masks"]) > 0
    assert all(label in (IGNORE_INDEX, t) for t, label in zip(sample.input_ids, sample.labels))


def test_chat_template_labels_equal_transformers_assistant_mask():
    assert_labels_equal_the_mask(CHATML)


# Written here after Qwen3's template: replies before the last user turn lose their reasoning, the replies after
# it show theirs (empty if none) in a <think> block, so the rendering of a prefix is not a prefix of the whole.
REWRITING = (
    "{% set ns = namespace(last_user=-1) %}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}"
    "{% set answer = m['content'].split('</think>')[-1].lstrip('\n') %}"
    "{% set thought = m['content'].split('</think>')[0].split('<think>')[-1].strip('\n') "
    "if '</think>' in m['content'] else '' %}"
    "<|im_start|>assistant\n{% generation %}"
    "{% if loop.index0 > ns.last_user %}<think>\n{{ thought }}\n</think>\n\n{% endif %}"
    "{{ answer }}<|im_end|>\n{% endgeneration %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("convo", [
    CONVO,
    CONVO[:3],  # one turn: the renderings of prefixes extend each other, the prefix method runs
    CONVO[:3] + [{"role": "user", "content": "4 or 5?"}, {"role": "assistant", "content": "<think>sum</think>\n\n4"}],
    CONVO[:2] + [{"role": "assistant", "content": "<think>greet</think>\n\nHello."}] + CONVO[3:],
])
def test_a_template_that_rewrites_earlier_turns_learns_what_its_generation_markers_mark(convo):
    # the reply's text also in the next user turn ("4 or 5?") must not be taken for the reply
    import warnings as w

    with w.catch_warnings(record=True) as caught:
        w.simplefilter("always")
        assert_labels_equal_the_mask(REWRITING, convo)
    rewrites = sum(m["role"] == "assistant" for m in convo) > 1
    assert any("rewrites earlier turns" in str(c.message) for c in caught) == rewrites


def test_generation_markers_are_used_when_the_template_has_them():
    # markers that leave the end-of-turn token out: the labels follow them (the prefix method would learn it)
    tagged = CHATML.replace("{{ m['content'] }}<|im_end|>\n{% endgeneration %}",
                            "{{ m['content'] }}{% endgeneration %}<|im_end|>\n")
    tok = chat_tokenizer(tagged)
    (sample,) = tokenize([{"messages": CONVO}], HFTokenizer(tok), 512)
    ref = tok.apply_chat_template(CONVO, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert [label != IGNORE_INDEX for label in sample.labels] == [bool(m) for m in ref["assistant_masks"]]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end in sample.input_ids and all(label != end for label in sample.labels)


def test_a_reply_the_rewriting_template_hides_is_refused():
    hiding = REWRITING.replace("{{ answer }}", "{{ answer | upper }}")
    convo = CONVO[:3] + [{"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]
    with pytest.raises(DataError, match="text of turn 2 .assistant. does not appear"):
        tokenize([{"messages": convo}], HFTokenizer(chat_tokenizer(untagged(hiding))), 512)


def test_truncation_keeps_what_fits_and_refuses_a_conversation_with_no_reply_left():
    (sample,) = tokenize([{"messages": CONVO}], TOK, 52)  # the first reply starts at token 48
    assert len(sample.input_ids) == 52 and any(label != IGNORE_INDEX for label in sample.labels)
    with pytest.raises(DataError, match="row:7: no assistant token falls within --max-length 48"):
        tokenize([{"messages": CONVO, "_line": 7}], TOK, 48, source="row")


def test_tokenizer_without_chat_template_is_refused():
    with pytest.raises(DataError, match="has no chat template"):
        tokenize([{"messages": CONVO}], HFTokenizer(chat_tokenizer(template=None)), 512)


def test_train_on_conversations_then_generate_with_chat(tmp_path, capsys):
    rows = [{"messages": [{"role": "user", "content": f"word w{i}"}, {"role": "assistant", "content": f"W{i}"}]}
            for i in range(24)]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    args = parse_args(["--data", data, "--max-steps", "3", "--eval-steps", "3", "--output", str(tmp_path / "run"),
                       "--no-progress"])
    result = train(args)
    log = json.loads((result.output / "train_log.json").read_text())
    assert log["evals"] and all(e["eval_loss"] == e["eval_loss"] for e in log["evals"])  # eval rows tokenized
    assert cli.main(["generate", "--adapter", str(tmp_path / "run"), "--chat", "--system", "terse",
                     "--prompt", "word w3", "--max-new-tokens", "3"]) == 0
    assert "word w3" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="fastpeft generate: --system needs --chat"):
        cli.main(["generate", "--adapter", str(tmp_path / "run"), "--system", "terse", "--prompt", "x"])


@pytest.mark.parametrize("max_length", ["auto", "64"])
def test_a_conversation_the_template_refuses_names_the_line(tmp_path, capsys, max_length):
    """Templates refuse some conversations (Gemma's and Mistral's a system turn, Llama 2's roles that do not
    alternate): like other data errors, the message names the file and line and the command exits with 2."""
    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                 "{{ raise_exception('System role not supported') }}{% endif %}"
                 "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    model = tmp_path / "model"
    chat_tokenizer(no_system).save_pretrained(model)
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": CONVO[1:]}, {"messages": CONVO}])
    code = cli.main(["train", "--model", str(model), "--data", data, "--max-length", max_length,
                     "--output", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "d.jsonl:2: " in err and "System role not supported" in err


def test_generate_chat_names_what_the_template_refuses(tmp_path):
    transformers = pytest.importorskip("transformers")
    import fastpeft

    no_system = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                 "{{ raise_exception('System role not supported') }}{% endif %}"
                 "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = chat_tokenizer(no_system)
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    fastpeft.get_peft_model(base, fastpeft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "ad")
    tok.save_pretrained(tmp_path / "ad")
    with pytest.raises(SystemExit, match="fastpeft generate: --chat: .*System role not supported"):
        cli.main(["generate", "--adapter", str(tmp_path / "ad"), "--chat", "--system", "terse", "--prompt", "hi"])


def test_max_length_auto_and_tokenize_render_each_conversation_once():
    from fastpeft.data import auto_max_length

    tok = HFTokenizer(chat_tokenizer(untagged(CHATML)))
    renders = []
    original = tok._render
    tok._render = lambda *a, **k: (renders.append(1), original(*a, **k))[1]
    rows = [{"messages": CONVO, "_line": i + 1} for i in range(3)]
    samples = tokenize(rows, tok, auto_max_length(rows, tok))
    assert len(renders) == 3 * 4  # per conversation: context and reply renders of its two assistant turns
    assert samples[0] == tokenize([{"messages": CONVO}], HFTokenizer(chat_tokenizer(untagged(CHATML))), 512)[0]
    assert all("_segments" not in r for r in rows)  # the samples hold the tokens; the records do not keep them
