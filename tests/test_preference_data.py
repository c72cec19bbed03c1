"""Preference readers (lmforge/data/preference.py): every accepted format on small inline records, one-line errors
naming file, line and field, and the shared real files (skipped when ../shared is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.preference import hh_messages, parse_record, read_preference_file, split_hh
from lmforge.errors import LMForgeError

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "preference"


def _write(tmp_path, name, records, as_array=False):
    p = tmp_path / name
    if as_array:
        p.write_text(json.dumps(records, indent=2, ensure_ascii=False))
    else:
        p.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return p


def test_llamafactory_sharegpt_with_system_and_string_or_dict_replies():
    r = parse_record({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"},
                                        {"from": "human", "value": "2+2?"}],
                      "chosen": {"from": "gpt", "value": "4"}, "rejected": "5", "system": "be brief"})
    assert r.prompt == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    assert r.responses == ["4", "5"] and r.chosen == "4" and r.rejected == "5" and r.prompt_text is None


def test_alpaca_preference():
    r = parse_record({"instruction": "Translate", "input": "chat", "chosen": "cat", "rejected": "dog"})
    assert r.prompt == [{"role": "user", "content": "Translate\nchat"}] and r.responses == ["cat", "dog"]


def test_trl_flat_strings_join_as_plain_text():
    r = parse_record({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."})
    assert r.prompt == [{"role": "user", "content": "The sky is"}]
    assert r.plain_text(0) == ("The sky is", " blue.") and r.plain_text(1) == ("The sky is", " green.")


def test_trl_conversational_explicit_and_implicit_prompt():
    msgs = [{"role": "user", "content": "What color is the sky?"}]
    r = parse_record({"prompt": msgs, "chosen": [{"role": "assistant", "content": "Blue."}],
                      "rejected": [{"role": "assistant", "content": "Green."}]})
    assert r.prompt == msgs and r.responses == ["Blue.", "Green."]
    r2 = parse_record({"chosen": msgs + [{"role": "assistant", "content": "Blue."}],
                       "rejected": msgs + [{"role": "assistant", "content": "Green."}]})
    assert r2.prompt == msgs and r2.responses == ["Blue.", "Green."]
    with pytest.raises(ValueError, match="differ only in their last"):
        parse_record({"chosen": msgs + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
                      "rejected": msgs + [{"role": "assistant", "content": "c"}]})


def test_hh_transcript_split():
    chosen = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: how do I pick a lock?\n\nAssistant: I can't help with that."
    rejected = "\n\nHuman: hi\n\nAssistant: hello!\n\nHuman: how do I pick a lock?\n\nAssistant: I can help: first..."
    r = parse_record({"chosen": chosen, "rejected": rejected})
    assert r.prompt == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"},
                        {"role": "user", "content": "how do I pick a lock?"}]
    assert r.responses == ["I can't help with that.", "I can help: first..."]
    assert r.prompt_text == chosen[: chosen.rfind("\n\nAssistant:") + len("\n\nAssistant:")]
    assert "".join(r.plain_text(0)) == chosen and "".join(r.plain_text(1)) == rejected
    # replies that start alike, or that contain "Assistant:" themselves, keep the true split point
    p, a, b = split_hh("\n\nHuman: q\n\nAssistant: I think so\n\nAssistant: x", "\n\nHuman: q\n\nAssistant: I do")
    assert p == "\n\nHuman: q\n\nAssistant:" and a == " I think so\n\nAssistant: x" and b == " I do"
    empty = parse_record({"chosen": "\n\nHuman: swear at me\n\nAssistant: ", "rejected": "\n\nHuman: swear at me"
                                    "\n\nAssistant: no way, you idiot"})  # hh-rlhf has a few empty replies
    assert empty.responses == ["", "no way, you idiot"] and "".join(empty.plain_text(0)).endswith("Assistant: ")
    assert hh_messages("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]


def test_ranked_list():
    r = parse_record({"prompt": "Name a fruit", "responses": ["apple", {"role": "assistant", "content": "pear"},
                                                             [{"from": "gpt", "value": "rock"}]]})
    assert r.responses == ["apple", "pear", "rock"] and r.chosen == "apple" and r.rejected == "rock"
    r2 = parse_record({"conversations": [{"from": "human", "value": "x"}], "responses": ["a", "b"]})
    assert r2.prompt == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize("record,line_field", [
    ({"prompt": "p", "chosen": "a"}, "field 'rejected': missing"),
    ({"prompt": "p", "chosen": "", "rejected": "b"}, "field 'chosen': empty response"),
    ({"prompt": "p", "chosen": 3, "rejected": "b"}, "field 'chosen': expected a string"),
    ({"conversations": [{"from": "alien", "value": "x"}], "chosen": "a", "rejected": "b"},
     "field 'conversations[0]': unknown role 'alien'"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}], "chosen": "a",
      "rejected": "b"}, "field 'conversations': the prompt must end with a user turn"),
    ({"prompt": "p", "responses": ["only one"]}, "field 'responses': expected a list of at least 2"),
    ({"chosen": "no transcript", "rejected": "b"}, "field 'prompt': missing"),
    ({"messages": [{"role": "user", "content": "x"}], "label": True}, "unpaired (KTO)"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "field 'chosen': a response given as messages must be one assistant message"),
])
def test_one_line_errors_name_file_line_field(tmp_path, record, line_field):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path, "d.jsonl", [good, good, record])
    with pytest.raises(LMForgeError) as e:
        read_preference_file(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: ") and line_field in msg and "\n" not in msg


def test_json_array_reports_element_line(tmp_path):
    good = {"prompt": "p", "chosen": "a", "rejected": "b"}
    path = _write(tmp_path, "d.json", [good, {"prompt": "p", "chosen": "a"}], as_array=True)
    text = path.read_text().splitlines()
    line = next(i for i, s in enumerate(text, 1) if s.strip() == "{" and i > 2)
    with pytest.raises(LMForgeError, match=rf"d\.json:{line}: field 'rejected'"):
        read_preference_file(path)
    ok = _write(tmp_path, "ok.json", [good, good], as_array=True)
    recs = read_preference_file(ok)
    assert len(recs) == 2 and recs[1].source.endswith(":7")
    junk = tmp_path / "junk.json"  # an element that is not an object before the records: they were one line off
    junk.write_text('[\n  "junk",\n  {"prompt": "b", "chosen": "x", "rejected": "y"}\n]\n')
    with pytest.raises(LMForgeError, match=r"junk\.json:2: "):
        read_preference_file(junk)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": \n')
    with pytest.raises(LMForgeError, match=r"bad\.jsonl:2: malformed JSON"):
        read_preference_file(bad)


def _shared(name):
    p = SHARED / name
    if not p.is_file():
        pytest.skip(f"../shared/data/preference/{name} is absent")
    return p


@pytest.mark.parametrize("name,count", [("dpo_en_demo.json", 300), ("dpo_zh_demo.json", 300),
                                        ("dpo_zh_500.jsonl", 500)])
def test_shared_llamafactory_files(name, count):
    path = _shared(name)
    recs = read_preference_file(path)
    raw = json.loads(path.read_text()) if name.endswith(".json") else [
        json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    assert len(recs) == len(raw) == count
    for rec, r in zip(recs, raw):
        user_turns = [m["value"] for m in r["conversations"] if m["from"] == "human"]
        assert [m["content"] for m in rec.prompt if m["role"] == "user"] == user_turns
        c = r["chosen"] if isinstance(r["chosen"], str) else r["chosen"]["value"]
        assert rec.chosen == c and rec.prompt[-1]["role"] == "user"
        if r.get("system"):
            assert rec.prompt[0] == {"role": "system", "content": r["system"]}


def test_shared_hh_rlhf():
    path = _shared("hh_rlhf_harmless_train.jsonl")
    recs = read_preference_file(path)
    raw = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    assert len(recs) == len(raw) == 1500
    exact = 0
    for rec, r in zip(recs, raw):
        assert r["chosen"].startswith(rec.prompt_text) and r["rejected"].startswith(rec.prompt_text)
        assert rec.prompt_text.endswith("\n\nAssistant:") and rec.prompt[-1]["role"] == "user"
        assert rec.chosen.strip() == r["chosen"][len(rec.prompt_text) :].strip()
        exact += "".join(rec.plain_text(0)) == r["chosen"] and "".join(rec.plain_text(1)) == r["rejected"]
    assert exact > 0.95 * len(recs)  # the rest had extra spaces around the reply


def test_shared_kto_file_is_a_clear_error():
    path = _shared("kto_en_demo.json")
    with pytest.raises(LMForgeError, match=r"kto_en_demo\.json:\d+: field 'chosen': missing .*KTO"):
        read_preference_file(path)


# ---- encoding and batching ------------------------------------------------------------------------------------


def test_encode_plain_text_prompt_excluded(stories):
    from lmforge.data.preference import encode_response
    from lmforge.losses import IGNORE

    _, tok = stories
    rec = parse_record({"prompt": "Once upon a time", "chosen": " there was a cat.", "rejected": " a dog ran."})
    c, r = encode_response(tok, rec, 0), encode_response(tok, rec, 1)
    p_len = len(tok.encode("Once upon a time")) + 1  # BOS
    assert c["input_ids"][:p_len] == r["input_ids"][:p_len] == [tok.bos_id] + tok.encode("Once upon a time")
    assert c["labels"][:p_len] == [IGNORE] * p_len and IGNORE not in c["labels"][p_len:]
    assert c["input_ids"][p_len:] == tok.encode(" there was a cat.") + [tok.eos_id]
    assert c["labels"][p_len:] == c["input_ids"][p_len:]
    cut = encode_response(tok, rec, 0, max_len=8)
    assert len(cut["input_ids"]) == 8 and cut["input_ids"][0] == tok.bos_id
    assert sum(x != IGNORE for x in cut["labels"]) == 4  # prompt kept down to half the budget, response cut


def test_encode_chat_template_scores_only_the_last_reply(stories):
    from lmforge.data.preference import encode_response
    from lmforge.infer.chat import apply_template
    from lmforge.losses import IGNORE

    _, tok = stories
    rec = parse_record({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"},
                                          {"from": "human", "value": "Tell a story"}],
                        "chosen": "A cat sat.", "rejected": "No."})
    ex = encode_response(tok, rec, 0, template="chatml")
    n_resp = sum(x != IGNORE for x in ex["labels"])
    resp_ids = ex["input_ids"][-n_resp:]
    prompt = apply_template("chatml", rec.prompt, add_generation_prompt=True)
    full = apply_template("chatml", rec.prompt + [{"role": "assistant", "content": "A cat sat."}],
                          add_generation_prompt=False)
    assert tok.decode(resp_ids[:-1] if resp_ids[-1] == tok.eos_id else resp_ids).strip() == full[len(prompt):].strip()
    assert ex["labels"][: len(ex["labels"]) - n_resp] == [IGNORE] * (len(ex["labels"]) - n_resp)
    # the earlier assistant turn ("Hello") is prompt: not scored
    assert "Hello" in tok.decode(ex["input_ids"][: len(ex["input_ids"]) - n_resp])


def test_collate_groups_feeds_reward_and_dpo_losses(stories):
    import torch

    from lmforge.data.preference import collate_groups, encode_response
    from lmforge.losses import ranked_reward_loss, sequence_logprobs, token_logprobs
    from lmforge.model.heads import ScalarHeadModel

    model, tok = stories
    recs = [parse_record({"prompt": "Tom had a", "responses": [" red ball.", " big dog.", " hat"]}),
            parse_record({"prompt": "Lily", "chosen": " smiled.", "rejected": " cried and cried."})]
    groups = [[encode_response(tok, r, i) for i in range(len(r.responses))] for r in recs]
    b = collate_groups(groups, pad_id=0)
    assert b["group_sizes"] == [3, 2] and b["input_ids"].shape[0] == 5
    rm = ScalarHeadModel(model)
    scores = rm.score(b["input_ids"], b["attention_mask"])
    loss, met = ranked_reward_loss(scores, b["group_sizes"])
    assert torch.isfinite(loss) and 0 <= met["accuracy"] <= 1
    logps = sequence_logprobs(model(b["input_ids"]), b["input_ids"], b["loss_mask"])
    for row, ex in enumerate(g for grp in groups for g in grp):
        ids = torch.tensor([ex["input_ids"]])
        resp = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
        start = len(ex["input_ids"]) - len(resp)
        single = token_logprobs(model(ids)[0, start - 1 : -1], torch.tensor(resp)).sum()
        assert logps[row].item() == pytest.approx(single.item(), abs=1e-4)


def test_a_json_file_holding_one_record_with_a_list_of_messages_is_that_record(tmp_path):
    """A .json file of one preference record whose only list-of-objects field is its responses (or chosen) was taken
    for a {"data": [...]} wrapper ("field 'chosen': missing"); the same record as .jsonl read fine."""
    msgs = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    for rec in ({"prompt": "x", "responses": msgs}, {"prompt": "x", "chosen": msgs[:1], "rejected": "b"}):
        path = tmp_path / "one.json"
        path.write_text(json.dumps(rec))
        (tmp_path / "one.jsonl").write_text(json.dumps(rec) + "\n")
        assert len(read_preference_file(path)) == 1
        assert read_preference_file(path)[0].responses == read_preference_file(tmp_path / "one.jsonl")[0].responses
    path.write_text(json.dumps({"data": [{"prompt": "x", "chosen": "a", "rejected": "b"}] * 2}))  # a wrapper still
    assert len(read_preference_file(path)) == 2
