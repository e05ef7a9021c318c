"""Chat JSONL reading/writing, tokenisation (plain and chat templates), truncation, collation, batching."""

import copy
import gzip
import json
import warnings

import pytest
import torch

from concept_influence.data import (
    Batch,
    ChatExample,
    DataError,
    TokenizedExample,
    collate,
    iter_batches,
    load_chat_jsonl,
    plain_prompt_text,
    read_chat_jsonl,
    tokenize_example,
    tokenize_examples,
    write_chat_jsonl,
)
from conftest import make_chats

# A simple Jinja template: every turn is "<role>content\n"; the generation prompt is "<assistant>".
SIMPLE_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _write_lines(path, lines):
    data = "".join(line + "\n" for line in lines)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


def _chat_line(prompt, response, **extra):
    return json.dumps({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], **extra})


@pytest.fixture
def templated_tokenizer(tokenizer):
    """A copy of the session tokenizer with a chat template (the session fixture stays untouched)."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = SIMPLE_TEMPLATE
    assert not getattr(tokenizer, "chat_template", None)
    return tok


# ---------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_read_jsonl_ids_blank_lines_and_content(tmp_path, suffix):
    path = _write_lines(
        tmp_path / f"chats{suffix}",
        [_chat_line("hi", "hello"), "", "   ", _chat_line("how are you", "fine thanks", source="x"), _chat_line("é ü 🙂", "ok")],
    )
    examples = list(read_chat_jsonl(path))
    name = path.name
    assert [e.id for e in examples] == [f"{name}:1", f"{name}:4", f"{name}:5"]
    assert [e.prompt for e in examples] == ["hi", "how are you", "é ü 🙂"]
    assert [e.response for e in examples] == ["hello", "fine thanks", "ok"]
    assert all(e.messages[-1]["role"] == "assistant" for e in examples)
    # ids are stable: reading again (also through load_chat_jsonl) gives the same ids and messages
    again = load_chat_jsonl(str(path))
    assert again == examples
    assert load_chat_jsonl(path, limit=2) == examples[:2]


def test_gz_and_plain_files_read_identically(tmp_path):
    lines = [_chat_line(f"prompt {i}", f"response {i}") for i in range(5)]
    plain = list(read_chat_jsonl(_write_lines(tmp_path / "d.jsonl", lines)))
    gz = list(read_chat_jsonl(_write_lines(tmp_path / "d.jsonl.gz", lines)))
    assert [e.messages for e in plain] == [e.messages for e in gz]
    assert [e.id.split(":")[1] for e in plain] == [e.id.split(":")[1] for e in gz] == ["1", "2", "3", "4", "5"]


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
def test_write_chat_jsonl_round_trip(tmp_path, suffix):
    chats = make_chats(7, seed=3)
    multi = ChatExample(
        "m:1",
        (
            {"role": "system", "content": "be nice"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c ü"},
            {"role": "assistant", "content": "d"},
        ),
    )
    examples = chats + [multi]
    path = write_chat_jsonl(examples, tmp_path / "sub" / f"out{suffix}")
    assert path.is_file()
    if suffix.endswith(".gz"):
        assert path.read_bytes()[:2] == b"\x1f\x8b"  # really gzip
    back = load_chat_jsonl(path)
    assert [e.messages for e in back] == [e.messages for e in examples]
    assert [e.id for e in back] == [f"{path.name}:{i + 1}" for i in range(len(examples))]


def _bad_lines():
    good = _chat_line("p", "r")
    return {
        "malformed json": (good + "\n{not json", 2, "invalid JSON"),
        "missing messages": (good + "\n" + json.dumps({"text": "hi"}), 2, "messages"),
        "messages not a list": (json.dumps({"messages": "hi"}), 1, "messages"),
        "empty messages": (good + "\n\n" + json.dumps({"messages": []}), 3, "messages"),
        "message without role": (json.dumps({"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}), 1, "role"),
        "message without content": (
            good + "\n" + json.dumps({"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}), 2, "content"),
        "non-string content": (
            json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}]}), 1, "content"),
        "no assistant turn": (
            good + "\n" + good + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}), 3, "no assistant"),
        "not an object": (json.dumps([1, 2]), 1, "messages"),
    }


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz"])
@pytest.mark.parametrize("case", sorted(_bad_lines()))
def test_bad_lines_raise_data_error_naming_file_and_line(tmp_path, case, suffix):
    text, line, needle = _bad_lines()[case]
    path = _write_lines(tmp_path / f"bad{suffix}", text.split("\n"))
    with pytest.raises(DataError) as info:
        load_chat_jsonl(path)
    msg = str(info.value)
    assert f"{path}:{line}" in msg
    assert needle in msg


def test_good_lines_before_an_error_are_streamed(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [_chat_line("a", "b"), _chat_line("c", "d"), "{oops"])
    it = read_chat_jsonl(path)
    assert next(it).response == "b"
    assert next(it).response == "d"
    with pytest.raises(DataError, match=r"d\.jsonl:3"):
        next(it)


def test_missing_file_raises_data_error_naming_it(tmp_path):
    path = tmp_path / "nowhere.jsonl"
    with pytest.raises(DataError, match="nowhere.jsonl"):
        load_chat_jsonl(path)
    with pytest.raises(DataError, match="nowhere.jsonl"):
        list(read_chat_jsonl(str(path)))


def test_corrupt_gzip_raises_data_error(tmp_path):
    path = tmp_path / "broken.jsonl.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(DataError, match="broken.jsonl.gz"):
        load_chat_jsonl(path)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------------- multi-turn


def test_multi_turn_response_is_last_assistant_turn(tmp_path):
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
    ]
    path = _write_lines(tmp_path / "multi.jsonl", [json.dumps({"messages": messages})])
    (ex,) = load_chat_jsonl(path)
    assert ex.response == "second answer"
    assert ex.messages == tuple(messages)
    assert ex.prompt_messages == tuple(messages[:4])
    assert ex.prompt == "second question"
    text = plain_prompt_text(ex.prompt_messages)
    assert "sys" in text and "first question" in text and "first answer" in text and "second question" in text
    assert "second answer" not in text


@pytest.mark.parametrize("messages, line, needle", [
    # a trailing turn after the last answer was silently cut away before; now the file and line are named
    ([("user", "q"), ("assistant", "a"), ("user", "trailing question with no answer")], 2,
     "ends with a 'user' turn after its last assistant turn"),
    ([("assistant", "an answer to nothing")], 3, "no prompt before the assistant's response"),
])
def test_chat_must_end_with_an_answer_after_a_prompt(tmp_path, messages, line, needle):
    bad = json.dumps({"messages": [{"role": r, "content": c} for r, c in messages]})
    lines = [_chat_line("p", "r")] * (line - 1) + [bad]
    path = _write_lines(tmp_path / "chats.jsonl", lines)
    with pytest.raises(DataError) as info:
        load_chat_jsonl(path)
    assert str(info.value).startswith(f"{path}:{line}: ") and needle in str(info.value)


def test_from_pair_and_prompt_without_user():
    ex = ChatExample.from_pair("x:1", "p", "r")
    assert ex.messages == ({"role": "user", "content": "p"}, {"role": "assistant", "content": "r"})
    assert (ex.prompt, ex.response, ex.id) == ("p", "r", "x:1")
    assert ChatExample("y", ({"role": "assistant", "content": "only"},)).prompt == ""


# ---------------------------------------------------------------------------------------------- plain template


def test_plain_prompt_text_format():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "U2"}]
    assert plain_prompt_text(msgs) == "System: S\nUser: U1\nAssistant: A1\nUser: U2\nAssistant: "
    assert plain_prompt_text([]) == "Assistant: "


@pytest.mark.parametrize("multi_turn", [False, True])
def test_plain_template_tokenization(tokenizer, multi_turn):
    assert not getattr(tokenizer, "chat_template", None)
    if multi_turn:
        ex = ChatExample(
            "mt:1",
            (
                {"role": "user", "content": "hello there"},
                {"role": "assistant", "content": "fine thanks"},
                {"role": "user", "content": "how are you doctor"},
                {"role": "assistant", "content": "rest and water"},
            ),
        )
    else:
        ex = ChatExample.from_pair("p:1", "how are you", "fine thanks doctor")
    tok = tokenize_example(ex, tokenizer, max_length=128)
    ids, start = list(tok.input_ids), tok.response_start
    assert tok.id == ex.id
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[1:start]) == plain_prompt_text(ex.prompt_messages)
    assert tokenizer.decode(ids[start:-1]) == ex.response
    assert ids[1:start] == tokenizer.encode(plain_prompt_text(ex.prompt_messages), add_special_tokens=False)
    assert tok.n_response_tokens == len(ids) - start == len(tokenizer.encode(ex.response, add_special_tokens=False)) + 1
    if multi_turn:
        assert "fine thanks" in tokenizer.decode(ids[:start])  # the earlier assistant turn is part of the prompt


# ---------------------------------------------------------------------------------------------- chat template


def test_chat_template_tokenization(templated_tokenizer):
    tok = templated_tokenizer
    ex = ChatExample(
        "ct:1",
        (
            {"role": "system", "content": "be careful"},
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "fine"},
            {"role": "user", "content": "sleep"},
            {"role": "assistant", "content": "rest quickly"},
        ),
    )
    te = tokenize_example(ex, tok, max_length=256)
    prompt_text = tok.apply_chat_template(list(ex.prompt_messages), add_generation_prompt=True, tokenize=False)
    full_text = tok.apply_chat_template(list(ex.messages), tokenize=False)
    assert prompt_text.endswith("<assistant>") and full_text.startswith(prompt_text)
    assert list(te.input_ids) == tok.encode(full_text, add_special_tokens=False)
    assert te.response_start == len(tok.encode(prompt_text, add_special_tokens=False))
    assert tok.decode(te.input_ids[: te.response_start]) == prompt_text
    assert tok.decode(te.input_ids[te.response_start :]) == "rest quickly\n"
    # the plain template is not used: no "User: " text, no bos
    assert "User:" not in tok.decode(te.input_ids)
    plain = tokenize_example(ex, _plain(tok), 256)
    assert plain.input_ids != te.input_ids


def _plain(tok):
    t = copy.deepcopy(tok)
    t.chat_template = None
    return t


def test_chat_template_prompt_not_a_prefix(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # the generation prompt says "<bot>" but assistant turns render as "<assistant>": not a prefix
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<bot>{% endif %}"
    )
    ex = ChatExample.from_pair("np:7", "hello", "fine")
    with pytest.raises(DataError, match="np:7.*prefix"):
        tokenize_example(ex, tok, 64)


def test_chat_template_empty_response(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    with pytest.raises(DataError, match="em:1.*empty"):
        tokenize_example(ChatExample.from_pair("em:1", "hello", ""), tok, 64)
    ok = tokenize_example(ChatExample.from_pair("em:2", "hello", "water"), tok, 64)
    assert tok.decode(ok.input_ids[ok.response_start :]) == "water"


# ---------------------------------------------------------------------------------------------- truncation


def test_truncation_keeps_first_max_length_tokens(tokenizer):
    ex = ChatExample.from_pair("t:1", "hello there how are you", "fine thanks doctor water sleep rest careful")
    full = tokenize_example(ex, tokenizer, max_length=10_000)
    n, start = len(full.input_ids), full.response_start
    assert n - start >= 4
    for max_length in (start + 1, start + 2, n - 1):
        cut = tokenize_example(ex, tokenizer, max_length=max_length)
        assert len(cut.input_ids) == max_length
        assert cut.input_ids == full.input_ids[:max_length]
        assert cut.response_start == start
        assert cut.n_response_tokens == max_length - start
    assert tokenize_example(ex, tokenizer, max_length=n) == full


def test_response_truncated_away(tokenizer, chats):
    long_prompt = " ".join(["hello there how are you"] * 8)
    bad = ChatExample.from_pair("long:3", long_prompt, "fine")
    start = tokenize_example(bad, tokenizer, 10_000).response_start
    max_length = start  # prompt fills the budget exactly: no response token survives
    ok_examples = [c for c in chats if tokenize_example(c, tokenizer, 10_000).response_start < max_length]
    assert len(ok_examples) >= 3
    with pytest.raises(DataError) as info:
        tokenize_example(bad, tokenizer, max_length)
    assert "long:3" in str(info.value) and "max_length" in str(info.value)
    data = ok_examples[:2] + [bad] + ok_examples[2:]
    with pytest.raises(DataError, match="long:3"):
        tokenize_examples(data, tokenizer, max_length=max_length)
    with pytest.warns(UserWarning, match="skipped 1 .*long:3"):
        kept = tokenize_examples(data, tokenizer, max_length=max_length, skip_truncated=True)
    assert [k.id for k in kept] == [c.id for c in ok_examples]
    assert all(len(k.input_ids) <= max_length for k in kept)


def test_all_truncated_means_no_usable_examples(tokenizer, chats):
    """The error names the file: given, or the one the examples' ids name."""
    with pytest.raises(DataError, match=r"^toy: no usable examples \(all 12 have their response cut away at max_length 2\)"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenize_examples(chats, tokenizer, max_length=2, skip_truncated=True)
    with pytest.raises(DataError, match=r"^data/eval.jsonl: no usable examples \(it has no examples\)"):
        tokenize_examples([], tokenizer, source="data/eval.jsonl")
    with pytest.raises(DataError, match="no examples were given"):
        tokenize_examples([], tokenizer)


def test_an_empty_answer_is_named(tokenizer, tmp_path):
    """A blank final answer is an error naming the file and line (read from a file) or the example (in memory)."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n" + json.dumps({"prompt": "q", "completion": " "}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: the assistant's answer \(the response that is scored\) is empty"):
        load_chat_jsonl(path)
    with pytest.raises(DataError, match="example toy:9: the assistant's answer"):
        tokenize_examples([ChatExample.from_pair("toy:9", "q", "")], tokenizer, skip_truncated=True)


def test_tokenize_examples_matches_tokenize_example(tokenizer, chats, tokenized):
    assert [t.id for t in tokenized] == [c.id for c in chats]
    for c, t in zip(chats, tokenized):
        assert t == tokenize_example(c, tokenizer, 64)


# ---------------------------------------------------------------------------------------------- collate / batches


@pytest.mark.parametrize("pad", [None, 7])
def test_collate_right_padding_and_masks(tokenizer, tokenized, pad):
    pad_id = tokenizer.pad_token_id if pad is None else pad
    examples = tokenized[:5]
    lengths = [len(e.input_ids) for e in examples]
    assert len(set(lengths)) > 1, "fixture should have varied lengths"
    batch = collate(examples, pad_token_id=pad_id)
    assert isinstance(batch, Batch) and len(batch) == 5
    assert batch.ids == [e.id for e in examples]
    assert batch.input_ids.shape == (5, max(lengths))
    assert batch.input_ids.dtype == torch.long
    assert batch.lengths.tolist() == lengths
    for i, e in enumerate(examples):
        n = lengths[i]
        assert batch.input_ids[i, :n].tolist() == list(e.input_ids)
        assert (batch.input_ids[i, n:] == pad_id).all()
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (max(lengths) - n)
        expected = [False] * e.response_start + [True] * (n - e.response_start) + [False] * (max(lengths) - n)
        assert batch.response_mask[i].tolist() == expected
        assert int(batch.last_prompt_index[i]) == e.response_start - 1
        assert batch.input_ids[i, batch.last_prompt_index[i]] == e.input_ids[e.response_start - 1]
    moved = batch.to("cpu")
    assert torch.equal(moved.input_ids, batch.input_ids) and moved.ids == batch.ids


def test_collate_hand_made_examples():
    a = TokenizedExample("a", (5, 6, 7, 8), 2)
    b = TokenizedExample("b", (9, 10), 1)
    batch = collate([a, b], pad_token_id=3)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 3, 3]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch.response_mask.tolist() == [[False, False, True, True], [False, True, False, False]]
    assert batch.last_prompt_index.tolist() == [1, 0]
    with pytest.raises(DataError, match="empty"):
        collate([])


def test_iter_batches_order_and_sizes(tokenized):
    batches = list(iter_batches(tokenized, 5, pad_token_id=1))
    assert [len(b) for b in batches] == [5, 5, 2]
    assert [i for b in batches for i in b.ids] == [t.id for t in tokenized]
    for b in batches:  # each batch is padded only to its own longest example
        assert b.input_ids.shape[1] == int(b.lengths.max())
    order = [11, 0, 5, 3, 2, 1, 4, 6, 7, 8, 9, 10]
    batches = list(iter_batches(tokenized, 4, pad_token_id=1, order=order))
    assert [len(b) for b in batches] == [4, 4, 4]
    assert [i for b in batches for i in b.ids] == [tokenized[j].id for j in order]
    single = list(iter_batches(tokenized, 100))
    assert len(single) == 1 and len(single[0]) == len(tokenized)
    subset = list(iter_batches(tokenized, 2, order=[3, 1, 4]))
    assert [b.ids for b in subset] == [[tokenized[3].id, tokenized[1].id], [tokenized[4].id]]


@pytest.mark.parametrize("bs", [0, -3])
def test_iter_batches_rejects_bad_batch_size(tokenized, bs):
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_batches(tokenized, bs))
