"""Calibration data: sources, conversations through the chat template, domain mixes, bad input,
size checks before any process group, and one real 2-rank quantize run on the shipped conversations."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hydra import compose, initialize_config_dir

from hybridquant import calib, schema
from hybridquant.errors import UserError

schema.register()

CHAT = "package:chat.jsonl"
SMALL_MIX = {"math": 3, "terminal_agent": 2, "conversational_agent": 2, "safety": 1}


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_checkpoint))


def _rows(path="chat.jsonl"):
    return [row for _, row in calib.iter_jsonl(calib.PACKAGE_DATA / path)]


def _one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def _compose(repo, *overrides):
    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        return compose("quantize", overrides=["+quant=mamba_moe_fp8_conservative", *overrides])


# --- sizes are refused before any process group exists (quantize.plan runs before parallel.init)

@pytest.mark.parametrize("override,named", [
    ("calib.num_samples=-3", "calib.num_samples=-3"),
    ("calib.num_samples=0", "calib.num_samples=0"),
    ("calib.max_seq_len=0", "calib.max_seq_len=0"),
    ("calib.max_seq_len=-1", "calib.max_seq_len=-1"),
    ("probe_samples=0", "probe_samples=0"),
    ("++calib.mix={math:-1}", "calib.mix.math=-1"),
    ("++calib.mix={math:0}", "calib.mix leaves every domain out"),
    ("calib.path=/nonexistent/calib.jsonl", "/nonexistent/calib.jsonl"),
    ("calib=cascade2_mix", "calib.path is not set"),  # a preset for your data never falls back to the shipped text
])
def test_plan_refuses_bad_calibration_sizes(repo, override, named):
    from hybridquant.stages import quantize

    cfg = _compose(repo, override)
    with pytest.raises(UserError) as excinfo:
        quantize.plan(cfg)
    assert named in _one_line_error(excinfo)


def test_mix_fixes_the_sample_count(repo):
    cfg = _compose(repo, "calib=chat_mix")
    assert calib.validate(cfg.calib) == 32 == sum(cfg.calib.mix.values())
    assert calib.validate(_compose(repo, "calib=cascade2_mix", "calib.path=package:chat.jsonl").calib) == 4000
    with pytest.raises(UserError) as excinfo:
        calib.validate(_compose(repo, "calib=chat_mix", "calib.num_samples=30").calib)
    assert "calib.num_samples=30 contradicts calib.mix, which sums to 32" in _one_line_error(excinfo)
    assert calib.validate(_compose(repo, "calib=chat_mix", "calib.num_samples=32").calib) == 32
    with pytest.raises(UserError) as excinfo:
        calib.validate(_compose(repo, "calib.num_samples=null").calib)
    assert "calib.num_samples is null" in _one_line_error(excinfo)


# --- unreadable sources are one-line errors naming the file

def test_invalid_utf8_names_file_and_line(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(UserError) as excinfo:
        calib.load(str(bad), tok, 1, 64, 0)
    msg = _one_line_error(excinfo)
    assert f"{bad}:2" in msg and "not valid UTF-8" in msg


def test_broken_parquet_and_missing_dataset_are_one_line_errors(tmp_path, tok, monkeypatch):
    import datasets

    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UserError) as excinfo:
        calib.load(str(broken), tok, 1, 64, 0)
    assert str(broken) in _one_line_error(excinfo) and "Parquet" in str(excinfo.value)

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    offline = datasets.config.HF_HUB_OFFLINE
    with pytest.raises(UserError) as excinfo:
        calib.load("acme/no-such-calibration-set", tok, 1, 64, 0)
    msg = _one_line_error(excinfo)
    assert "acme/no-such-calibration-set" in msg and "local Hugging Face datasets cache" in msg
    assert datasets.config.HF_HUB_OFFLINE == offline  # offline only while reading calibration data
    with pytest.raises(UserError, match="text data not found"):  # held-out text readers take JSONL files only
        calib.resolve_path("acme/no-such-calibration-set")

    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(UserError, match="not a dataset written by datasets' save_to_disk"):
        calib.load(str(tmp_path / "plain_dir"), tok, 1, 64, 0)


def test_row_without_text_or_messages_names_file_and_row(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    bad = tmp_path / "rows.jsonl"
    bad.write_text('{"text": "fine text here"}\n\n{"id": 7, "domain": "math"}\n')
    with pytest.raises(UserError) as excinfo:
        calib.load(str(bad), tok, 1, 64, 0)
    assert f"{bad}:3" in _one_line_error(excinfo) and "neither a 'text' string nor a 'messages' list" in str(excinfo.value)
    pq.write_table(pa.Table.from_pylist([{"text": "fine text here"}, {"text": None}]), tmp_path / "rows.parquet")
    with pytest.raises(UserError) as excinfo:
        calib.load(str(tmp_path / "rows.parquet"), tok, 1, 64, 0)
    assert f"{tmp_path / 'rows.parquet'}: row 1 has neither" in _one_line_error(excinfo)


# --- the same rows give the same samples from every kind of source

def _hub_cache_copy(tmp_path, jsonl, name):
    """What datasets leaves in its cache after loading a Hub dataset once: prepared Arrow files under
    <cache>/<owner>___<name>/default/0.0.0/<hash>/ (built here from a local file, no network)."""
    import datasets

    cache = tmp_path / "hf-cache"
    datasets.load_dataset("json", data_files=str(jsonl), cache_dir=str(tmp_path / "build"), split="train")
    (built,) = (tmp_path / "build" / "json").glob("*/*/*/dataset_info.json")
    owner, dataset = name.split("/")
    target = cache / f"{owner}___{dataset}" / "default" / "0.0.0" / built.parent.name
    shutil.copytree(built.parent, target)
    info = json.loads((target / "dataset_info.json").read_text())
    info.update(config_name="default", builder_name=dataset, dataset_name=dataset)
    (target / "dataset_info.json").write_text(json.dumps(info))
    for f in target.glob("json-*.arrow"):
        f.rename(target / f.name.replace("json-", f"{dataset}-"))
    return cache


def test_jsonl_parquet_dataset_dir_and_hub_cache_give_the_same_samples(tmp_path, tok, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows()[:60] + [{"id": f"t{i}", "category": "math", "text": f"Problem {i}: {i} + {i} = {2 * i}."}
                           for i in range(6)]
    keys = sorted({k for r in rows for k in r})
    rows = [{k: r.get(k) for k in keys} for r in rows]  # one schema (datasets infers it from the first row)
    jsonl = tmp_path / "mix.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "mix.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "mix_dataset"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "mix_dict"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(_hub_cache_copy(tmp_path, jsonl, "acme/calib-mix")))

    mix = {"math": 4, "terminal_agent": 1, "conversational_agent": 1}
    loads = {src: calib.load(src, tok, None, 256, 5, mix=mix, domain_column="category")
             for src in [str(jsonl), str(tmp_path / "mix.parquet"), str(tmp_path / "mix_dataset"),
                         str(tmp_path / "mix_dict"), "acme/calib-mix"]}
    first = loads[str(jsonl)]
    assert first.domains == mix and sum(first.domain_tokens.values()) == first.tokens
    for src, data in loads.items():
        assert len(data.samples) == 6 and all(torch.equal(a, b) for a, b in zip(data.samples, first.samples)), src
        assert data.domain_tokens == first.domain_tokens, src
    assert len({d.sha256 for d in loads.values()}) == 5  # each source is hashed as what it is
    with pytest.raises(UserError, match="no split 'test'"):
        calib.load(str(tmp_path / "mix_dict"), tok, 1, 64, 0, split="test")


# --- conversations go through the checkpoint's chat template

def test_conversation_renders_with_the_tiny_chat_template(tok):
    row = {"reasoning": "on", "tools": [{"type": "function", "function": {"name": "run_shell"}}], "messages": [
        {"role": "user", "content": "Count the logs."},
        {"role": "assistant", "content": None, "reasoning_content": "List them first.",
         "tool_calls": [{"id": "c0", "type": "function", "function": {"name": "run_shell", "arguments": '{"cmd": "ls"}'}}]},
        {"role": "tool", "tool_call_id": "c0", "content": "a.log\nb.log"},
        {"role": "assistant", "content": "Two logs.", "reasoning_content": "a.log and b.log."}]}
    text = calib.row_text(row, tok)
    assert text == (
        "<|im_start|>system\n<tools>\n{\"function\": {\"name\": \"run_shell\"}, \"type\": \"function\"}\n</tools><|im_end|>\n"
        "<|im_start|>user\nCount the logs.<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nList them first.\n</think>\n\n"
        "<tool_call>\n{\"name\": \"run_shell\", \"arguments\": {\"cmd\": \"ls\"}}\n</tool_call><|im_end|>\n"
        "<|im_start|>tool\na.log\nb.log<|im_end|>\n"
        "<|im_start|>assistant\n<think>\na.log and b.log.\n</think>\nTwo logs.<|im_end|>\n")
    off = calib.row_text(row, tok, thinking=False)  # calib.thinking=false: no reasoning, the empty think block
    assert "List them first" not in off and off.endswith("<|im_start|>assistant\n<think></think>Two logs.<|im_end|>\n")
    assert calib.row_text(dict(row, reasoning="off"), tok) == off
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok.convert_tokens_to_ids("<think>") in ids


def test_templates_that_render_reasoning_and_tool_calls_are_used_as_they_are(tok):
    native = tok.__class__.from_pretrained(tok.name_or_path)
    native.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{% if m.reasoning_content and enable_thinking %}<think>{{ m.reasoning_content }}</think>{% endif %}"
        "{{ m.content }}{% for c in m.tool_calls or [] %}<call {{ c.function.name }} {{ c.function.arguments | tojson }}>"
        "{% endfor %}<|im_end|>\n{% endfor %}")
    support = calib.template_support(native)
    assert support.reasoning_content and support.tool_calls and not support.tools
    row = {"messages": [{"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a", "reasoning_content": "r",
                         "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}]}
    assert calib.row_text(row, native) == '<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>r</think>a<call f {"x": 1}><|im_end|>\n'


def test_shipped_conversations_carry_reasoning_and_tool_calls(tok):
    rows = _rows()
    assert {r["category"] for r in rows} == set(SMALL_MIX) | {"swe", "science", "chat", "instruction_following"}
    assert any(m.get("tool_calls") for r in rows for m in r["messages"])
    assert {r["reasoning"] for r in rows} == {"on", "off"}
    data = calib.load(CHAT, tok, 40, 4096, 0, domain_column="category")
    texts = [tok.decode(s[0]) for s in data.samples]
    assert all(t.startswith("<|im_start|>") for t in texts)
    assert any("<tool_call>" in t for t in texts) and any("<think>\n" in t for t in texts)


# --- domain mixes

def test_mix_takes_exact_counts_deterministically(tok):
    a = calib.load(CHAT, tok, None, 256, 0, mix=SMALL_MIX, domain_column="category")
    b = calib.load(CHAT, tok, None, 256, 0, mix=SMALL_MIX, domain_column="category")
    c = calib.load(CHAT, tok, None, 256, 1, mix=SMALL_MIX, domain_column="category")
    assert a.domains == SMALL_MIX == c.domains and len(a.samples) == 8
    assert set(a.domain_tokens) == set(SMALL_MIX) and sum(a.domain_tokens.values()) == a.tokens
    assert all(torch.equal(x, y) for x, y in zip(a.samples, b.samples))
    assert sorted(map(str, (s.tolist() for s in a.samples))) != sorted(map(str, (s.tolist() for s in c.samples)))
    assert all(s.shape[1] <= 256 for s in a.samples)
    # the mix is sharded over data parallel like any selection: every sample on exactly one rank
    shards = [calib.shard(a.samples, r, 2) for r in range(2)]
    assert sum(s.own for s in shards) == 8 and [len(s.batches) for s in shards] == [4, 4]


def test_too_few_samples_for_a_domain_names_it(tok):
    with pytest.raises(UserError) as excinfo:
        calib.load(CHAT, tok, None, 256, 0, mix={"math": 2, "safety": 31}, domain_column="category")
    msg = _one_line_error(excinfo)
    assert "'safety' has 30 usable of 30 rows, calib.mix asks 31" in msg and "'math'" not in msg.split("domains present")[0]
    with pytest.raises(UserError) as excinfo:
        calib.load(CHAT, tok, None, 256, 0, mix={"poetry": 1}, domain_column="category")
    assert "'poetry' has 0 usable of 0 rows" in _one_line_error(excinfo)
    with pytest.raises(UserError, match="calib.mix needs a 'domain' column"):
        calib.load(CHAT, tok, None, 256, 0, mix={"math": 1})


def test_model_card_lists_samples_and_tokens_per_domain():
    from hybridquant import model_card

    card = model_card.calibration_markdown(
        {"source": "s", "sha256": "0" * 64, "samples": 3, "tokens": 1500, "domains": {"math": 2, "chat": 1},
         "domain_tokens": {"math": 1200, "chat": 300}}, {"calib": {"max_seq_len": 1024, "seed": 0}})
    assert "- domains (samples, tokens): math 2 (1,200 tokens), chat 1 (300 tokens)" in card
    old = model_card.calibration_markdown(  # reports written before per-domain tokens existed
        {"source": "s", "sha256": "0" * 64, "samples": 3, "tokens": 9, "domains": {"math": 2, "chat": 1}},
        {"calib": {"max_seq_len": 8, "seed": 0}})
    assert "- domains (samples): math 2, chat 1" in old


# --- the real stage: conversations in a mix, two data-parallel ranks

@pytest.mark.distributed
def test_quantize_on_a_conversation_mix_at_two_ranks_reports_domains(quantized):
    mix = "{" + ",".join(f"{k}:{v}" for k, v in SMALL_MIX.items()) + "}"
    drop = ",".join(f"{k}:0" for k in ("swe", "science", "chat", "instruction_following"))
    run_dir = quantized("mamba_moe_fp8_conservative", "calib=chat_mix", f"++calib.mix={{{mix[1:-1]},{drop}}}",
                        "calib.max_seq_len=128", "parallel.tp=1", nproc=2)
    report = json.loads((run_dir / "report.json").read_text())
    cal = report["calibration"]
    assert report["layout"]["dp"] == 2
    assert cal["samples"] == 8 and cal["domains"] == SMALL_MIX
    assert set(cal["domain_tokens"]) == set(SMALL_MIX) and sum(cal["domain_tokens"].values()) == cal["tokens"]
    assert cal["source"].endswith("chat.jsonl")
