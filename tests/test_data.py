import json

import pytest
import torch

from lorakit.data import IGNORE, DataError, Example, collate, encode_all, encode_example, read_jsonl, to_rows
from lorakit.models import build_demo_model, build_demo_tokenizer
from lorakit.training import causal_lm_loss


@pytest.fixture(scope="module")
def tok():
    return build_demo_tokenizer()


def _jsonl(tmp_path, records, name="d.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return path


CHAT = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}


def test_formats_are_detected_per_file(tmp_path):
    samples, _ = read_jsonl(_jsonl(tmp_path, [CHAT]))
    assert [m["role"] for m in samples[0].messages] == ["user", "assistant", "user", "assistant"]
    samples, _ = read_jsonl(_jsonl(tmp_path, [{"messages": CHAT["conversations"]}]))
    assert samples[0].messages == CHAT["conversations"]
    samples, _ = read_jsonl(_jsonl(tmp_path, [{"instruction": "Add", "input": "1+1", "output": "2", "system": "be brief"}]))
    assert samples[0].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Add\n\n1+1"},
                                   {"role": "assistant", "content": "2"}]
    samples, _ = read_jsonl(_jsonl(tmp_path, [{"text": "plain"}]))
    assert samples[0].text == "plain" and samples[0].source.endswith("d.jsonl:1")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"conversations": [', "invalid JSON"),
        ('{"conversations": [{"role": "user"}]}', "turn 0 has no 'content'"),
        ('{"conversations": [{"content": "x"}]}', "turn 0 has no 'role'"),
        ('{"conversations": []}', "empty conversation"),
        ('{"conversations": [{"role": "user", "content": "x"}]}', "no assistant turn"),
        ('{"conversations": [{"role": "bot", "content": "x"}]}', "role 'bot'"),
        ('[1, 2]', "expected a JSON object"),
    ],
)
def test_malformed_line_stops_with_path_and_line(tmp_path, line, message):
    path = _jsonl(tmp_path, [CHAT, "", line])
    with pytest.raises(DataError, match=rf"d.jsonl:3: .*{message}"):
        read_jsonl(path)


def test_skip_invalid_counts(tmp_path):
    samples, skipped = read_jsonl(_jsonl(tmp_path, [CHAT, "{bad", {"conversations": []}, CHAT]), skip_invalid=True)
    assert len(samples) == 2 and skipped == 2


def test_empty_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no usable samples"):
        read_jsonl(_jsonl(tmp_path, [""]))
    with pytest.raises(DataError, match=r"no usable samples \(1 invalid lines skipped\)"):
        read_jsonl(_jsonl(tmp_path, ["{bad"]), skip_invalid=True)
    with pytest.raises(DataError, match="no such data file"):
        read_jsonl(tmp_path / "missing.jsonl")


def _expected_encoding(tok, pieces):
    """Hand-built ids and labels: ``pieces`` are (text, trained) in order; trained text gets labels.

    The demo tokenizer is byte-level with no merges, so encoding the pieces one by one and
    concatenating gives the ids of the whole text; the first position is never a target.
    """
    ids, labels = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE] * len(piece)
    labels[0] = IGNORE
    return ids, labels


def test_labels_cover_exactly_the_assistant_tokens(tok):
    enc = encode_example(tok, Example("x:1", messages=CHAT["conversations"]), max_seq_len=1024)
    # ChatML written out by hand: each assistant turn trains its content, <|im_end|> and the newline after.
    ids, labels = _expected_encoding(tok, [
        ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False), ("yo<|im_end|>\n", True),
        ("<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n", False), ("ok<|im_end|>\n", True),
    ])
    assert enc.input_ids == ids
    assert enc.labels == labels
    assert enc.num_labels == len("yo\nok\n") + 2  # the two <|im_end|> are one token each


def test_truncation_and_samples_without_labels_dropped(tok):
    sample = Example("x:1", messages=[{"role": "user", "content": "a" * 50}, {"role": "assistant", "content": "b"}])
    encoded, dropped = encode_all(tok, [sample], max_seq_len=20)
    assert encoded == [] and dropped == 1
    encoded, _ = encode_all(tok, [Example("t:1", text="hello world")], max_seq_len=5)
    assert len(encoded[0].input_ids) == 5


def test_packing_keeps_samples_apart(tok):
    torch.manual_seed(0)
    model = build_demo_model(len(tok) + 5).eval()
    samples = [Example(f"s:{i}", messages=[{"role": "user", "content": q}, {"role": "assistant", "content": a}])
               for i, (q, a) in enumerate([("hi", "hello there"), ("2+2?", "4"), ("name?", "Kit")])]
    encoded, _ = encode_all(tok, samples, 256)
    rows = to_rows(encoded, 256, packing=True)
    assert len(rows) == 1 and rows[0].position_ids.count(0) == 3
    packed = collate(rows, tok.pad_token_id, packed=True)
    assert "attention_mask" not in packed
    separate = collate(to_rows(encoded, 256, packing=False), tok.pad_token_id, packed=False)
    with torch.no_grad():
        loss_packed, n_packed = causal_lm_loss(model, packed)
        loss_sep, n_sep = causal_lm_loss(model, separate)
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits[0]
        offset = 0
        for i, e in enumerate(encoded):
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            torch.testing.assert_close(packed_logits[offset:offset + len(e.input_ids)], alone, atol=1e-5, rtol=1e-5)
            offset += len(e.input_ids)
    assert n_packed == n_sep == sum(e.num_labels for e in encoded)
    torch.testing.assert_close(loss_packed, loss_sep, atol=1e-4, rtol=1e-5)


def test_chunked_head_loss_equals_full_logits_loss_and_grads(tok):
    torch.manual_seed(0)
    model = build_demo_model(len(tok) + 5)
    for p in model.parameters():
        p.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    samples = [Example(f"t:{i}", text="lorakit " * (i + 3)) for i in range(4)]
    encoded, _ = encode_all(tok, samples, 64)
    batch = collate(to_rows(encoded, 64, False), tok.pad_token_id, packed=False)
    loss, n = causal_lm_loss(model, batch)
    loss.backward()
    ours = model.model.norm.weight.grad.clone()
    model.model.norm.weight.grad = None
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    targets = batch["labels"][:, 1:]
    ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    ref.backward()
    assert n == int((targets != IGNORE).sum())
    torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ours, model.model.norm.weight.grad, atol=1e-5, rtol=1e-4)


def test_labels_stay_on_the_assistant_with_a_template_that_rewrites_history(tok):
    # Qwen3-style: only the last assistant turn gets a <think></think> block, so renders are not prefixes
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
                "{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = build_demo_tokenizer()
    tok.chat_template = template
    messages = [{"role": "user", "content": "Say Hello!"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Hello!"}]
    enc = encode_example(tok, Example("x:1", messages=messages), 512)
    ids, labels = _expected_encoding(tok, [
        ("<|im_start|>user\nSay Hello!<|im_end|>\n<|im_start|>assistant\n", False), ("Hello!<|im_end|>", True),
        ("\n<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>\n\n</think>\n\nHello!<|im_end|>\n", True),
    ])
    assert enc.input_ids == ids
    assert enc.labels == labels


def test_a_template_that_refuses_the_data_is_a_data_error(tok):
    tok = build_demo_tokenizer()
    tok.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    sample = Example("d.jsonl:4", messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                                           {"role": "assistant", "content": "a"}])
    with pytest.raises(DataError, match=r"d.jsonl:4: the chat template cannot render this conversation: System role"):
        encode_all(tok, [sample], 64)
