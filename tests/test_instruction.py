"""Instruction tuning: prompt/response data, chat and plain templates, loss on the response only."""

import copy
import json

import pytest
import torch

from fedtune.core.config import ConfigError, DataConfig, config_from_dict
from fedtune.data.batching import Tokenized, collate, tokenize
from fedtune.data.corpora import load_corpus
from fedtune.data.instruct import (
    PLAIN_PROMPT,
    PROMPT_COLUMN,
    RESPONSE_COLUMN,
    tokenize_pairs,
)
from fedtune.lora.attach import attach_lora, detach_lora, lora_layers
from fedtune.models.loading import cached_base_model
from fedtune.training.loss import chunked_causal_lm_loss

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
PAIRS = [
    {"instruction": "What is the capital of France?", "output": "Paris is the capital of France."},
    {"instruction": "Name a prime number.", "output": "Seven."},
    {"instruction": "Who wrote Hamlet?", "output": "William Shakespeare wrote Hamlet around 1600."},
]


def llama_cfg(**train):
    return config_from_dict({"model": {"name": "tiny-llama", "task": "causal-lm", "max_length": 32},
                             "lora": {"ranks": [4]},
                             "data": {"prompt_key": "instruction", "response_key": "output"},
                             "train": train})


@pytest.fixture(scope="module")
def base():
    cfg = llama_cfg()
    return cached_base_model(cfg.model, cfg.seed)


def write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture
def pairs_file(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


def pairs_data(base, path, max_length=32):
    ds = load_corpus(DataConfig(dataset=str(path), prompt_key="instruction", response_key="output"), "causal-lm")
    return tokenize(ds, base.tokenizer, "causal-lm", max_length)


def test_jsonl_with_custom_field_names_becomes_instruction_data(pairs_file, tmp_path):
    ds = load_corpus(DataConfig(dataset=str(pairs_file), prompt_key="instruction", response_key="output"),
                     "causal-lm")
    assert ds[PROMPT_COLUMN] == [r["instruction"] for r in PAIRS]
    assert ds[RESPONSE_COLUMN] == [r["output"] for r in PAIRS]
    assert ds["text"][0] == PLAIN_PROMPT.format(prompt=PAIRS[0]["instruction"]) + PAIRS[0]["output"]
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text("q,a\n" + "".join(f"\"{r['instruction']}\",\"{r['output']}\"\n" for r in PAIRS))
    ds_csv = load_corpus(DataConfig(dataset=str(csv_path), prompt_key="q", response_key="a"), "causal-lm")
    assert ds_csv[PROMPT_COLUMN] == ds[PROMPT_COLUMN] and ds_csv[RESPONSE_COLUMN] == ds[RESPONSE_COLUMN]
    # without the two keys the same file is plain text (and needs its text_key)
    with pytest.raises(ConfigError, match=r"data.text_key: column 'text' not in .*pairs.jsonl"):
        load_corpus(DataConfig(dataset=str(pairs_file)), "causal-lm")
    plain = load_corpus(DataConfig(dataset=str(pairs_file), text_key="output"), "causal-lm")
    assert PROMPT_COLUMN not in plain.column_names


def test_chatterbot_pairs_are_instruction_data_with_its_keys():
    cfg = DataConfig(dataset="chatterbot", prompt_key="question", response_key="answer")
    ds = load_corpus(cfg, "causal-lm")
    assert len(ds) == 2393 and ds[PROMPT_COLUMN][0] == ds["question"][0] and ds[RESPONSE_COLUMN][0] == ds["answer"][0]
    assert PROMPT_COLUMN not in load_corpus(DataConfig(dataset="chatterbot"), "causal-lm").column_names


def test_missing_fields_and_bad_keys_are_errors_naming_them(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], {"instruction": "No answer here"}])
    with pytest.raises(ConfigError, match=r"data.response_key: record 2 of .*bad.jsonl has no field 'output'"):
        load_corpus(DataConfig(dataset=str(bad), prompt_key="instruction", response_key="output"), "causal-lm")
    with pytest.raises(ConfigError, match=r"data.prompt_key: column 'prompt' not in chatterbot"):
        load_corpus(DataConfig(dataset="chatterbot", prompt_key="prompt", response_key="answer"), "causal-lm")
    with pytest.raises(ConfigError, match=r"data.prompt_key: .*model.task = 'causal-lm'"):
        load_corpus(DataConfig(dataset="chatterbot", prompt_key="question", response_key="answer"), "classification")
    with pytest.raises(ConfigError, match=r"data.response_key: .*set together"):
        config_from_dict({"data": {"prompt_key": "question"}})
    with pytest.raises(ConfigError, match=r"data.response_key: must differ"):
        config_from_dict({"data": {"prompt_key": "q", "response_key": "q"}})
    with pytest.raises(ConfigError, match=r"train.loss_on: must be one of response, all"):
        config_from_dict({"train": {"loss_on": "prompt"}})


def test_plain_template_without_a_chat_template(base, pairs_file):
    tok = base.tokenizer
    assert not getattr(tok, "chat_template", None)
    data = pairs_data(base, pairs_file)
    head = PLAIN_PROMPT.format(prompt=PAIRS[0]["instruction"])
    head_ids = tok(head)["input_ids"]
    n = data.prompt_lengths[0]
    # the prompt part is the template's question block: [CLS] ... "answer :" (the lone head's [SEP] is not)
    assert data.input_ids[0][:n] == head_ids[:-1] and n == len(head_ids) - 1
    assert tok.decode(data.input_ids[0][n:], skip_special_tokens=True) == PAIRS[0]["output"].lower()


def test_chat_template_formats_a_user_and_an_assistant_turn(base, pairs_file):
    tok = copy.deepcopy(base.tokenizer)
    tok.chat_template = CHATML
    ds = load_corpus(DataConfig(dataset=str(pairs_file), prompt_key="instruction", response_key="output"),
                     "causal-lm")
    data = tokenize(ds, tok, "causal-lm", 64)
    prompt, response = PAIRS[2]["instruction"], PAIRS[2]["output"]
    head = f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
    n = data.prompt_lengths[2]
    assert data.input_ids[2][:n] == tok(head, add_special_tokens=False)["input_ids"]  # no [CLS]: the template's own
    assert data.input_ids[2] == tok(head + response + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert tok.decode(data.input_ids[2][n:]).startswith(response.lower())
    plain = pairs_data(base, pairs_file, 64)
    assert plain.input_ids[2] != data.input_ids[2]


def test_packaged_smollm2_tokenizer_uses_its_chat_template():
    from transformers import AutoTokenizer

    from fedtune.core.assets import cache_root

    path = cache_root() / "models" / "smollm2-135m"
    if not (path / "tokenizer_config.json").is_file():
        pytest.skip("SmolLM2 not converted yet (fedtune converts it on first use)")
    tok = AutoTokenizer.from_pretrained(path)
    data = tokenize_pairs(["What is AI?"], ["A field of computer science."], tok, 64)
    n = data.prompt_lengths[0]
    assert tok.decode(data.input_ids[0][:n]).endswith("<|im_start|>assistant\n")
    assert tok.decode(data.input_ids[0][n:]) == "A field of computer science.<|im_end|>\n"


def test_labels_mask_prompt_and_padding_unless_loss_on_all(base, pairs_file):
    data = pairs_data(base, pairs_file)
    pad = base.tokenizer.pad_token_id
    batch = collate(data, [0, 1, 2], pad, "causal-lm")
    full = collate(data, [0, 1, 2], pad, "causal-lm", loss_on="all")
    for row in range(3):
        n, length = data.prompt_lengths[row], len(data.input_ids[row])
        labels = batch["labels"][row]
        assert (labels[:n] == -100).all() and (labels[length:] == -100).all()
        assert labels[n:length].tolist() == data.input_ids[row][n:]
        assert full["labels"][row, :length].tolist() == data.input_ids[row]
    plain = Tokenized(input_ids=data.input_ids, labels=None)  # not instruction data: every token
    torch.testing.assert_close(collate(plain, [0, 1, 2], pad, "causal-lm")["labels"], full["labels"])


@pytest.mark.parametrize("chunked", [False, True])
def test_prompt_tokens_receive_no_loss_and_no_gradient(base, pairs_file, chunked):
    """Loss and its gradient come from response tokens only, in transformers' loss and the chunked one."""
    data = pairs_data(base, pairs_file)
    batch = collate(data, [0, 1, 2], base.tokenizer.pad_token_id, "causal-lm")
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    peft_model = attach_lora(base, 4, llama_cfg().lora)
    inner = peft_model.base_model.model
    gen = torch.Generator().manual_seed(0)
    seen = {}

    def keep(module, args, out):
        out.retain_grad()
        seen["t"] = out

    # the tensor whose position t predicts token t+1: the logits, or the chunked loss's hidden states
    hook = (inner.model.norm if chunked else inner.lm_head).register_forward_hook(keep)
    try:
        for layer in lora_layers(peft_model).values():
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1, generator=gen)
        if chunked:
            loss = chunked_causal_lm_loss(inner, ids, mask, labels, chunk_tokens=5)
        else:
            loss = peft_model(input_ids=ids, attention_mask=mask, labels=labels).loss
        hook.remove()
        loss.backward()
        grad = seen["t"].grad
        # position t predicts token t + 1: a response token when prompt length <= t + 1 < length
        t = torch.arange(ids.shape[1])[None, :] + 1
        n_prompt = torch.tensor(data.prompt_lengths)[:, None]
        length = torch.tensor([len(x) for x in data.input_ids])[:, None]
        predicts_response = (t >= n_prompt) & (t < length)
        assert torch.count_nonzero(grad[~predicts_response]) == 0  # prompt and padding: exactly zero
        assert (grad[predicts_response].abs().sum(-1) > 0).all()  # every response position has one
        # the loss is the mean cross-entropy of the response tokens, whatever the prompt's labels say
        with torch.no_grad():
            logits = peft_model(input_ids=ids, attention_mask=mask).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1][predicts_response[:, :-1]],
                                               labels[:, 1:][predicts_response[:, :-1]])
        torch.testing.assert_close(loss.detach(), ce, rtol=1e-5, atol=1e-6)
        first = data.prompt_lengths[0] - 1  # a prompt position: its label is -100
        other = labels.clone()
        other[0, first] = int(ids[0, first + 1])  # a label there would change the loss...
        assert not torch.isclose(chunked_causal_lm_loss(inner, ids, mask, other, 5).detach(), ce)
        # ...but with the prompt masked, perturbing the logits at prompt positions cannot
        bumped = logits.clone()
        bumped[~predicts_response] += 10 * torch.randn(bumped[~predicts_response].shape, generator=gen)
        ce2 = torch.nn.functional.cross_entropy(bumped[:, :-1].reshape(-1, bumped.shape[-1]),
                                                labels[:, 1:].reshape(-1), ignore_index=-100)
        torch.testing.assert_close(ce2, ce, rtol=1e-6, atol=1e-6)
    finally:
        hook.remove()
        detach_lora(peft_model, base)


def test_server_evaluation_uses_the_same_masking(base, pairs_file):
    from fedtune.training.local import evaluate_global, lora_shapes, train_local
    from strategies import HetLoRA

    data = pairs_data(base, pairs_file)
    cfg = llama_cfg()
    strat = HetLoRA(cfg)
    state = strat.initial_state(lora_shapes(base, cfg), {})  # B = 0: the base model's own loss
    batch = collate(data, [0, 1, 2], base.tokenizer.pad_token_id, "causal-lm")
    with torch.no_grad():
        logits = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    results = {}
    for loss_on in ("response", "all"):
        c = llama_cfg(loss_on=loss_on)
        labels = collate(data, [0, 1, 2], base.tokenizer.pad_token_id, "causal-lm", loss_on)["labels"]
        expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        results[loss_on] = evaluate_global(base, state, data, c)["eval_loss"]
        assert results[loss_on] == pytest.approx(float(expected), rel=1e-5)
    assert results["response"] != pytest.approx(results["all"], rel=1e-3)
    # the chunked training loss trains on the same tokens
    res = train_local(base, strat.client_payload(state, 0, 4), 4, data, llama_cfg(loss_chunk_tokens=8, batch_size=3, local_steps=2), seed=0)
    assert res.steps == 2 and res.loss_start == pytest.approx(results["response"], rel=1e-4)


def test_truncation_keeps_the_prompt_and_part_of_the_response_or_drops_the_example(base):
    tok = base.tokenizer
    long_answer = " ".join(["word"] * 40)
    long_question = " ".join(["why"] * 40)
    data = tokenize_pairs(["Short question?", long_question, "Fine?"], [long_answer, "Yes.", ""], tok, 16)
    # the long answer is cut to 16 tokens, its prompt whole; the long prompt leaves no room: dropped;
    # an empty response (and this tokenizer has no end-of-sequence token) has nothing to learn: dropped
    assert data.dropped == 2 and len(data.input_ids) == 1
    n = data.prompt_lengths[0]
    assert len(data.input_ids[0]) == 16 and n < 16
    assert data.input_ids[0][:n] == tok(PLAIN_PROMPT.format(prompt="Short question?"))["input_ids"][:-1]
    assert set(data.input_ids[0][n:]) == set(tok("word", add_special_tokens=False)["input_ids"])
    ds = load_corpus(DataConfig(dataset="chatterbot", prompt_key="question", response_key="answer",
                                max_examples=200), "causal-lm")
    tokenized = tokenize(ds, tok, "causal-lm", 12)
    assert tokenized.dropped > 0 and len(tokenized) + tokenized.dropped == 200
    assert all(n < len(ids) <= 12 for n, ids in zip(tokenized.prompt_lengths, tokenized.input_ids))
