"""Calibration data: rows -> text -> token batches, identical on every layout, sharded over data parallel.

Sources (``calib.path``, see ``locate``): ``package:NAME`` (a corpus shipped in the package), a JSONL
file, a Parquet file, a directory written by ``datasets``' ``save_to_disk``, or a Hugging Face Hub
dataset id that is already in the local ``datasets`` cache (read offline: nothing is downloaded).
JSONL is read by this module line by line (errors name the line; nothing is cached); Parquet,
``save_to_disk`` directories and Hub datasets are read through ``datasets``/Arrow, memory-mapped.

Rows are either plain text (``calib.text_column``, default ``text``) or conversations
(``calib.messages_column``, default ``messages``: a list of ``{role, content}`` with optional
``reasoning_content`` and ``tool_calls``, and optional per-row ``tools``). Conversations are rendered
with the checkpoint's own chat template (``render_conversation``), in thinking mode or not as the row
or ``calib.thinking`` says.

Samples keep their natural length (no padding: a padded position would contribute to activation
amax), truncated to ``max_seq_len``. The selection depends only on the data, the seed, the sample
count and the mix, so every layout calibrates on the same tokens: the rows are shuffled with
``random.Random(seed)`` and taken in that order, skipping samples shorter than ``min_seq_len``
tokens; with ``calib.mix`` (domain -> samples, domains read from ``calib.domain_column``) a row is
taken while its domain still needs samples, so the chosen samples keep the shuffled order and
interleave the domains. Data-parallel rank ``r`` of ``dp`` takes samples ``r, r+dp, ...`` (ModelOpt
then takes the max of amax over DP ranks).

Every DP rank must run the same number of forward passes: with expert parallelism the MoE
all-to-all spans data-parallel ranks, and a rank that stops early leaves its peers waiting in the
collective forever. Ranks with fewer samples therefore repeat samples until all have
``ceil(n / dp)``. A repeat is neutral for max calibration (amax is a max over tokens, synchronised
over DP/EP, and the repeated tokens were already seen), and expert coverage counts only a rank's own
samples.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from hybridquant.errors import UserError

PACKAGE_DATA = Path(__file__).resolve().parent / "data" / "corpus"
PARQUET_SUFFIXES = (".parquet", ".pq")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass
class CalibSet:
    samples: list[torch.Tensor]  # each [1, seq]
    sha256: str                  # of the source (file bytes; every file of a dataset)
    source: str
    domains: dict[str, int]      # samples per domain
    domain_tokens: dict[str, int] = field(default_factory=dict)  # tokens per domain

    @property
    def tokens(self) -> int:
        return sum(s.numel() for s in self.samples)


# ---------------------------------------------------------------------------------------------------
# Configuration checks (no data, no process group)

def require_positive(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name}={value} is invalid: it must be an integer >= {minimum}")


def mix_of(conf) -> dict[str, int] | None:
    """``calib.mix`` as a plain dict; None when there is no mix ({} or null)."""
    mix = conf.get("mix") if hasattr(conf, "get") else getattr(conf, "mix", None)
    if not mix:
        return None
    from omegaconf import DictConfig, OmegaConf

    return dict(OmegaConf.to_container(mix) if isinstance(mix, DictConfig) else mix)


def check_mix(mix: dict[str, int] | None, num_samples: int | None) -> int:
    """Validate sizes; return the number of samples to calibrate on. A mix fixes it: num_samples
    must then be null or the mix's sum. A count of 0 leaves a domain out."""
    if mix:
        for domain, count in mix.items():
            require_positive(f"calib.mix.{domain}", count, minimum=0)
        total = sum(mix.values())
        if total == 0:
            raise UserError("calib.mix leaves every domain out: give at least one domain a count >= 1")
        if num_samples is not None and num_samples != total:
            raise UserError(f"calib.num_samples={num_samples} contradicts calib.mix, which sums to {total} "
                            f"samples: set calib.num_samples={total} or null")
        return total
    if num_samples is None:
        raise UserError("calib.num_samples is null: give a sample count, or a calib.mix of domain: samples")
    require_positive("calib.num_samples", num_samples)
    return num_samples


def validate(conf) -> int:
    """Everything about ``calib.*`` that can be checked without reading the data (the quantize stage
    runs this before any process group exists). Returns the sample count."""
    require_positive("calib.max_seq_len", conf.max_seq_len, minimum=2)  # a sample needs >= 2 tokens
    count = check_mix(mix_of(conf), conf.num_samples)
    if conf.get("thinking") not in (None, True, False):
        raise UserError(f"calib.thinking={conf.thinking} is invalid: use null (as each row says), true or false")
    if conf.path is None:
        raise UserError("calib.path is not set: point it at your calibration data (calib.path=<file, directory "
                        "or Hub dataset id>)")
    locate(conf.path)
    return count


# ---------------------------------------------------------------------------------------------------
# Sources

@dataclass(frozen=True)
class Location:
    kind: str       # jsonl | parquet | dataset_dir | hub
    where: str      # a path, or a Hub dataset id


def locate(path: str) -> Location:
    """Where ``calib.path`` points; a missing local file fails here (a Hub id is looked up on load)."""
    if path.startswith("package:"):
        p = PACKAGE_DATA / path.split(":", 1)[1]
        if not p.is_file():
            raise UserError(f"calibration data not found: {p}")
        return Location("jsonl", str(p))
    p = Path(path).expanduser()
    if p.is_dir():
        if not any((p / name).is_file() for name in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise UserError(f"calibration data {p} is a directory but not a dataset written by datasets' "
                            "save_to_disk (no dataset_info.json / dataset_dict.json)")
        return Location("dataset_dir", str(p))
    if p.is_file():
        return Location("parquet" if p.suffix.lower() in PARQUET_SUFFIXES else "jsonl", str(p))
    if p.suffix.lower() not in (".jsonl", ".json", *PARQUET_SUFFIXES) and HUB_ID.match(path) and "/" in path:
        return Location("hub", path)
    raise UserError(f"calibration data not found: {p}")


def resolve_path(path: str) -> Path:
    """A JSONL file (``package:NAME`` is a corpus shipped in the package); for the readers of held-out text."""
    loc = locate(path)
    if loc.kind == "hub":
        raise UserError(f"text data not found: {Path(path).expanduser()}")
    if loc.kind != "jsonl":
        raise UserError(f"{path}: a JSONL file is needed here, this is a {loc.kind.replace('_', ' ')}")
    return Path(loc.where)


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line; bad bytes or JSON name the line."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise UserError(f"{path}: cannot read calibration data ({exc.strerror or _one_line(exc)})") from exc
    with f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column "
                                f"{exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a plain-text JSONL file (each an object with a 'text' string)."""
    rows = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise UserError(f"{path}:{lineno}: each line must be an object with a 'text' string")
        rows.append(row)
    if not rows:
        raise UserError(f"{path}: no samples")
    return rows


class Rows:
    """Rows of a source, by index, with a name for each in error messages."""

    def __init__(self, label: str, sha256: str, get, n: int, where, column):
        self.label, self.sha256, self._get, self.n, self.where, self.column = label, sha256, get, n, where, column

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self._get(i)


def _jsonl_rows(path: Path, text_column: str, messages_column: str) -> Rows:
    rows, lines = [], []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise UserError(f"{path}:{lineno}: each line must be a JSON object")
        if not (isinstance(row.get(text_column), str) or _is_conversation(row.get(messages_column))):
            raise UserError(f"{path}:{lineno}: the row has neither a '{text_column}' string nor a "
                            f"'{messages_column}' list")
        rows.append(row)
        lines.append(lineno)
    if not rows:
        raise UserError(f"{path}: no samples")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return Rows(str(path), digest, rows.__getitem__, len(rows), lambda i: f"{path}:{lines[i]}",
                lambda name: [r.get(name) for r in rows] if any(name in r for r in rows) else None)


def _is_conversation(value) -> bool:
    return isinstance(value, list) and len(value) > 0


def _sha256_files(files: list[Path], root: Path | None = None) -> str:
    h = hashlib.sha256()
    for f in sorted(files, key=lambda f: str(f.relative_to(root)) if root else f.name):
        h.update((str(f.relative_to(root)) if root else f.name).encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _pick_split(ds, split: str | None, label: str):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None:
            if len(names) == 1 or "train" in names:
                split = names[0] if len(names) == 1 else "train"
            else:
                raise UserError(f"{label} has splits {', '.join(names)}: choose one with calib.split")
        if split not in ds:
            raise UserError(f"{label} has no split {split!r} (splits: {', '.join(names)})")
        return ds[split], f"{label} [{split}]"
    if split is not None and split != (str(ds.split) if ds.split is not None else None):
        raise UserError(f"{label} is a single dataset without splits: leave calib.split null")
    return ds, label


def _open_dataset(loc: Location, split: str | None, subset: str | None):
    """(datasets.Dataset, label, sha256) of a Parquet file, a save_to_disk directory or a cached Hub id."""
    import datasets

    if loc.kind == "parquet":
        import pyarrow.parquet as pq

        path = Path(loc.where)
        try:
            table = pq.read_table(path, memory_map=True)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for one cause
            raise UserError(f"{path}: not a readable Parquet file ({_one_line(exc)})") from None
        if split is not None:
            raise UserError(f"{path} is a single Parquet file without splits: leave calib.split null")
        return datasets.Dataset(table), str(path), hashlib.sha256(path.read_bytes()).hexdigest()
    if loc.kind == "dataset_dir":
        path = Path(loc.where)
        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:  # noqa: BLE001 - corrupt state/arrow files surface as various errors
            raise UserError(f"{path}: not a readable dataset directory ({_one_line(exc)})") from None
        ds, label = _pick_split(ds, split, str(path))
        return ds, label, _sha256_files([f for f in path.rglob("*") if f.is_file()], root=path)
    # A Hub id: only the local datasets cache, never the network.
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        ds = datasets.load_dataset(loc.where, subset, split=split)
    except Exception as exc:  # noqa: BLE001 - not cached / no such config / split: all one answer here
        raise UserError(f"calibration data {loc.where}" + (f" ({subset})" if subset else "")
                        + " is no file or directory, and no dataset in the local Hugging Face datasets cache "
                        f"({datasets.config.HF_DATASETS_CACHE}; nothing is downloaded): {_one_line(exc)[:300]}") from None
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved
    ds, label = _pick_split(ds, None, loc.where + (f" [{split}]" if split else ""))
    files = [Path(f["filename"]) for f in ds.cache_files]
    return ds, label, _sha256_files(files) if files else ds._fingerprint


def _dataset_rows(ds, label: str, digest: str, text_column: str, messages_column: str) -> Rows:
    import pyarrow as pa
    import pyarrow.compute as pc

    if ds._indices is not None:
        ds = ds.flatten_indices()
    columns = ds.column_names
    if text_column not in columns and messages_column not in columns:
        raise UserError(f"{label} has neither a '{text_column}' nor a '{messages_column}' column "
                        f"(columns: {', '.join(columns)}); set calib.text_column / calib.messages_column")
    if len(ds) == 0:
        raise UserError(f"{label}: no samples")
    table = ds.data.table
    ok = pa.array([False] * len(ds))
    types = {f.name: f.type for f in table.schema}
    if text_column in types and (pa.types.is_string(types[text_column]) or pa.types.is_large_string(types[text_column])):
        ok = pc.or_(ok, pc.is_valid(table.column(text_column)).combine_chunks())
    if messages_column in types and (pa.types.is_list(types[messages_column])
                                     or pa.types.is_large_list(types[messages_column])):
        lengths = pc.fill_null(pc.list_value_length(table.column(messages_column)), 0).combine_chunks()
        ok = pc.or_(ok, pc.greater(lengths, 0))
    bad = pc.indices_nonzero(pc.invert(ok))
    if len(bad):
        raise UserError(f"{label}: row {bad[0].as_py()} has neither a '{text_column}' string nor a "
                        f"'{messages_column}' list")

    def column(name):
        return table.column(name).to_pylist() if name in columns else None

    return Rows(label, digest, lambda i: ds[i], len(ds), lambda i: f"{label} row {i}", column)


def open_rows(path: str, *, split: str | None = None, subset: str | None = None, text_column: str = "text",
              messages_column: str = "messages") -> Rows:
    loc = locate(path)
    if loc.kind == "jsonl":
        if split is not None:
            raise UserError(f"{loc.where} is a single JSONL file without splits: leave calib.split null")
        return _jsonl_rows(Path(loc.where), text_column, messages_column)
    ds, label, digest = _open_dataset(loc, split, subset)
    return _dataset_rows(ds, label, digest, text_column, messages_column)


# ---------------------------------------------------------------------------------------------------
# Conversations

SENTINEL = "hq-probe-7f3a"


@dataclass(frozen=True)
class TemplateSupport:
    """What the tokenizer's chat template renders itself (probed once per tokenizer)."""
    reasoning_content: bool
    tool_calls: bool
    tools: bool


_SUPPORT: dict[str, TemplateSupport] = {}


def template_support(tokenizer) -> TemplateSupport:
    key = tokenizer.chat_template
    if key not in _SUPPORT:
        def renders(marker: str, messages: list, **kwargs) -> bool:
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False, enable_thinking=True, **kwargs)
            except Exception:  # noqa: BLE001 - a template that refuses the probe does not support it
                return False
            return marker in text

        user = {"role": "user", "content": "q"}
        call = {"type": "function", "function": {"name": SENTINEL + "-call", "arguments": {}}}
        tool = {"type": "function", "function": {"name": SENTINEL + "-tools", "description": "d",
                                                 "parameters": {"type": "object", "properties": {}}}}
        _SUPPORT[key] = TemplateSupport(
            reasoning_content=renders(SENTINEL + "-r", [user, {"role": "assistant", "content": "a",
                                                               "reasoning_content": SENTINEL + "-r"}]),
            tool_calls=renders(SENTINEL + "-call", [user, {"role": "assistant", "content": "", "tool_calls": [call]}]),
            tools=renders(SENTINEL + "-tools", [user], tools=[tool]))
    return _SUPPORT[key]


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(p.get("text") or "" if isinstance(p, dict) else str(p) for p in content)
    return json.dumps(content, ensure_ascii=False)


def _drop_none(value):
    """Arrow stores rows of one column with one struct type, so keys of other rows come back as None
    (a tool's parameters gain the other tools' properties): drop them, as the rows were written."""
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _tool_call(call: dict) -> dict:
    """OpenAI form {type: function, function: {name, arguments: dict}}; arguments given as JSON text
    (the wire format, and what keeps Arrow from unifying argument structs) are parsed."""
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    args = _drop_none(fn.get("arguments"))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return {"type": "function", "function": {"name": fn.get("name"), "arguments": {} if args is None else args}}


def row_thinking(row: dict, messages: list, forced: bool | None) -> bool:
    """Thinking mode of a conversation: ``calib.thinking`` if set; else the row's ``enable_thinking``
    (bool) or ``reasoning`` ("on"/"off", as NVIDIA's post-training data marks it); else whether the
    conversation carries reasoning content."""
    if forced is not None:
        return bool(forced)
    flag = row.get("enable_thinking")
    if isinstance(flag, bool):
        return flag
    flag = row.get("reasoning")
    if isinstance(flag, bool):
        return flag
    if isinstance(flag, str) and flag.lower() in ("on", "off"):
        return flag.lower() == "on"
    return any(isinstance(m, dict) and m.get("reasoning_content") for m in messages)


def render_conversation(tokenizer, messages: list, *, thinking: bool, tools: list | None = None) -> str:
    """The conversation as the checkpoint's chat template writes it (``tokenize=False``, no generation
    prompt). What the template does not render itself is written the way Nemotron SFT data holds it:

    - reasoning (thinking on): ``<think>\\n{reasoning}\\n</think>\\n`` before the assistant content;
      thinking off drops reasoning and starts the last assistant turn with ``<think></think>``
      (the template's own non-thinking marker).
    - tool calls: after the assistant content, one ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``
      per call; tool definitions (the row's ``tools``): a ``<tools>`` block, one JSON per line, in the
      system message (a new one if the conversation has none).
    """
    support = template_support(tokenizer)
    msgs: list[dict] = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise UserError("each message must be an object with a 'role' string")
        out = {k: v for k, v in m.items() if v is not None and k not in ("reasoning_content", "tool_calls")}
        out["content"] = _content_text(m.get("content"))
        if m["role"] == "assistant":
            reasoning = _content_text(m.get("reasoning_content")).strip()
            if thinking and reasoning:
                if support.reasoning_content:
                    out["reasoning_content"] = reasoning
                else:
                    out["content"] = f"<think>\n{reasoning}\n</think>\n{out['content']}"
            calls = [_tool_call(c) for c in m.get("tool_calls") or [] if isinstance(c, dict)]
            if calls and support.tool_calls:
                out["tool_calls"] = calls
            elif calls:
                written = ["<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                          "arguments": c["function"]["arguments"]},
                                                         ensure_ascii=False) + "\n</tool_call>" for c in calls]
                out["content"] = "\n".join([out["content"], *written] if out["content"] else written)
        msgs.append(out)
    if not thinking and not support.reasoning_content:
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is not None and not msgs[last]["content"].startswith("<think>"):
            msgs[last]["content"] = "<think></think>" + msgs[last]["content"]
    kwargs = {}
    if tools:
        if support.tools:
            kwargs["tools"] = tools
        else:
            block = "<tools>\n" + "\n".join(json.dumps(t, ensure_ascii=False, sort_keys=True) for t in tools) + "\n</tools>"
            if msgs and msgs[0]["role"] == "system":
                msgs[0]["content"] = f"{msgs[0]['content']}\n\n{block}" if msgs[0]["content"] else block
            else:
                msgs.insert(0, {"role": "system", "content": block})
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False,
                                         enable_thinking=thinking, **kwargs)


def row_text(row: dict, tokenizer, *, text_column: str = "text", messages_column: str = "messages",
             thinking: bool | None = None, where: str = "row") -> str:
    """The text a row calibrates on: its conversation rendered with the chat template, else its text."""
    messages = row.get(messages_column)
    if _is_conversation(messages):
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{where}: a conversation, but the checkpoint's tokenizer has no chat template")
        tools = _drop_none(row.get("tools")) if isinstance(row.get("tools"), list) else None
        try:
            return render_conversation(tokenizer, messages, thinking=row_thinking(row, messages, thinking),
                                       tools=tools or None)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - jinja raises TemplateError, TypeError, ... for bad rows
            raise UserError(f"{where}: the chat template cannot render this conversation ({_one_line(exc)[:200]})") from None
    text = row.get(text_column)
    if not isinstance(text, str):
        raise UserError(f"{where}: the row has neither a '{text_column}' string nor a '{messages_column}' list")
    return text


# ---------------------------------------------------------------------------------------------------
# Selection

def from_config(conf, tokenizer) -> CalibSet:
    """``load`` with every ``calib.*`` setting (the quantize stage's entry point)."""
    return load(conf.path, tokenizer, conf.num_samples, conf.max_seq_len, conf.seed, mix=mix_of(conf),
                split=conf.get("split"), subset=conf.get("subset"), text_column=conf.get("text_column", "text"),
                messages_column=conf.get("messages_column", "messages"),
                domain_column=conf.get("domain_column", "domain"), thinking=conf.get("thinking"))


def load(path: str, tokenizer, num_samples: int | None, max_seq_len: int, seed: int, min_seq_len: int = 2, *,
         mix: dict[str, int] | None = None, split: str | None = None, subset: str | None = None,
         text_column: str = "text", messages_column: str = "messages", domain_column: str = "domain",
         thinking: bool | None = None) -> CalibSet:
    require_positive("calib.max_seq_len", max_seq_len, minimum=2)
    total = check_mix(mix or None, num_samples)
    mix = {d: n for d, n in mix.items() if n} if mix else None  # 0 leaves a domain out
    rows = open_rows(path, split=split, subset=subset, text_column=text_column, messages_column=messages_column)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    domain_of = rows.column(domain_column)
    if mix is not None and domain_of is None:
        raise UserError(f"{rows.label}: calib.mix needs a '{domain_column}' column naming each row's domain "
                        "(set calib.domain_column)")
    domain_of = [("unknown" if d is None else str(d)) for d in domain_of] if domain_of else ["unknown"] * len(rows)
    need = dict(mix) if mix is not None else None
    samples, domains, tokens = [], {}, {}
    for i in order:
        if len(samples) == total:
            break
        domain = domain_of[i]
        if need is not None and need.get(domain, 0) == 0:
            continue
        text = row_text(rows[i], tokenizer, text_column=text_column, messages_column=messages_column,
                        thinking=thinking, where=rows.where(i))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_seq_len]
        if len(ids) < min_seq_len:
            continue
        samples.append(torch.tensor([ids], dtype=torch.long))
        domains[domain] = domains.get(domain, 0) + 1
        tokens[domain] = tokens.get(domain, 0) + len(ids)
        if need is not None:
            need[domain] -= 1
    if need is not None and any(need.values()):
        rows_per_domain: dict[str, int] = {}
        for d in domain_of:
            rows_per_domain[d] = rows_per_domain.get(d, 0) + 1
        short = [f"'{d}' has {domains.get(d, 0)} usable of {rows_per_domain.get(d, 0)} rows, calib.mix asks {mix[d]}"
                 for d in mix if need[d]]
        known = ", ".join(sorted(rows_per_domain)[:12])
        raise UserError(f"{rows.label}: too few samples for calib.mix by '{domain_column}': {'; '.join(short)} "
                        f"(domains present: {known})")
    if len(samples) < total:
        raise UserError(f"{rows.label} has only {len(samples)} usable samples, calib.num_samples={total}")
    return CalibSet(samples=samples, sha256=rows.sha256, source=rows.label, domains=dict(sorted(domains.items())),
                    domain_tokens=dict(sorted(tokens.items())))


@dataclass
class Shard:
    batches: list[torch.Tensor]  # this rank's own samples, then repeats
    own: int                     # how many of ``batches`` are this rank's own samples


def shard(samples: list[torch.Tensor], dp_rank: int, dp_size: int) -> Shard:
    if not samples:
        raise UserError("no calibration samples")
    own = samples[dp_rank::dp_size]
    per_rank = -(-len(samples) // dp_size)
    fill = own or [samples[dp_rank % len(samples)]]
    batches = own + [fill[i % len(fill)] for i in range(per_rank - len(own))]
    return Shard(batches=batches, own=len(own))
