"""Data for ``fastpeft train``: a byte-level tokenizer, the embedded default task, JSONL/text loading, the collator.

The recipe follows the seed notes: prompt and response are tokenized separately
(each truncated), ``input_ids = [bos] + prompt + response + [eos]``, and the
labels are -100 over the prompt and over the padding, so only the response is
learned. The collator pads to the longest sample of its batch.

Conversations (``{"messages": [{"role": "user", "content": ...}, ...]}``, or ShareGPT's
``{"conversations": [{"from": "human", "value": ...}, ...]}``) are laid out by the tokenizer's chat
template, and only the assistant turns are learned (their end-of-turn tokens included), as TRL's
``assistant_only_loss`` does.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

# transformers' marker of assistant tokens in a chat template: {% generation %} … {% endgeneration %}
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class _NotPrefix(Exception):
    """A chat template's renderings of growing prefixes of a conversation do not extend each other."""


# --------------------------------------------------------------------------- tokenizer
class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0–255) plus ``<pad>`` 256, ``<bos>`` 257, ``<eos>`` 258. Nothing to download.

    Example::

        tok = ByteTokenizer()
        tok.decode(tok.encode("héllo"))  # 'héllo'
    """

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    vocab_size = 259
    name = "fastpeft-bytes"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text`` (with ``<bos>`` first when ``add_special_tokens``)."""
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens are dropped (kept as ``<…>`` markers otherwise)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out, specials = bytearray(), {256: "<pad>", 257: "<bos>", 258: "<eos>"}
        for i in ids:
            if i < 256:
                out.append(int(i))
            elif not skip_special_tokens and i in specials:
                out.extend(specials[i].encode())
        return out.decode("utf-8", errors="replace")

    def chat_segments(self, messages: Sequence[dict], add_generation_prompt: bool = False
                      ) -> list[tuple[list[int], bool]]:
        """A conversation in the byte tokenizer's own plain template, as ``(ids, is_assistant_reply)`` pieces:
        ``<bos>`` then ``"<|role|>\n" + content + "\n"`` per turn, an assistant reply ending with ``<eos>``
        instead of the newline. ``add_generation_prompt`` appends ``"<|assistant|>\n"``."""
        out: list[tuple[list[int], bool]] = [([self.bos_token_id], False)]
        for m in messages:
            out.append((self.encode(f"<|{m['role']}|>\n"), False))
            if m["role"] == "assistant":
                out.append((self.encode(m["content"]) + [self.eos_token_id], True))
            else:
                out.append((self.encode(m["content"] + "\n"), False))
        if add_generation_prompt:
            out.append((self.encode("<|assistant|>\n"), False))
        return out

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write a small ``fastpeft_tokenizer.json`` marker so the folder records which tokenizer it used."""
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "fastpeft_tokenizer.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer": self.name, "vocab_size": self.vocab_size, "pad_token_id": self.pad_token_id,
                       "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id}, f, indent=2)


class HFTokenizer:
    """Adapter giving a transformers tokenizer the small interface the training code uses."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.pad_token_id = tokenizer.pad_token_id
        self.bos_token_id = tokenizer.bos_token_id
        self.eos_token_id = tokenizer.eos_token_id
        if self.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token; fastpeft appends one to every response")
        self.vocab_size = len(tokenizer)
        self.name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """The text's ids without the tokenizer's own special tokens; ``add_special_tokens`` prepends bos only."""
        ids = self.tok.encode(text, add_special_tokens=False)
        if add_special_tokens and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """The text of ``ids`` (special tokens dropped unless asked)."""
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def chat_segments(self, messages: Sequence[dict], add_generation_prompt: bool = False
                      ) -> list[tuple[list[int], bool]]:
        """A conversation laid out by the tokenizer's chat template, as ``(ids, is_assistant_reply)`` pieces.

        Which tokens are the assistant's, in this order of preference:

        1. a template that marks them with ``{% generation %}`` (what TRL's ``assistant_only_loss`` requires):
           transformers' own ``return_assistant_tokens_mask``;
        2. a template whose renderings of growing prefixes of the conversation extend each other (most of
           them): the text an assistant turn adds beyond the prefix with the generation prompt is the reply
           (what the template puts after it, such as an end-of-turn token, included), each piece tokenized on
           its own;
        3. a template that rewrites earlier turns as the conversation grows (Qwen3's drops the reasoning of
           replies before the last user turn): the conversation is rendered once, and each reply is what
           follows the generation prompt's header up to the end of the reply's text (found in the rendering,
           as written, stripped, or its answer after ``</think>``) and the end-of-turn text the template
           writes after a reply (both learned from one-turn probes); a warning says so once. A reply whose
           text cannot be found raises ``DataError``.
        """
        template = self._template()
        if self.tok.is_fast and _GENERATION_TAG.search(template):
            return self._masked_segments(messages, add_generation_prompt)
        try:
            return self._prefix_segments(messages, add_generation_prompt)
        except _NotPrefix:
            if not self._warned_rewrites:
                self._warned_rewrites = True
                warnings.warn(f"the chat template of {self.name!r} rewrites earlier turns as a conversation grows; "
                              "each assistant reply is found in the whole rendered conversation instead (learned: "
                              "what follows the generation prompt up to the reply's end-of-turn text)", stacklevel=3)
            return self._located_segments(messages, add_generation_prompt)

    _warned_rewrites = False

    def _template(self) -> str:
        template = getattr(self.tok, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one renders
            template = template.get("default")
        if not template:
            raise DataError(f"the tokenizer {self.name!r} has no chat template; conversation records need one "
                            "(use a chat/instruct model's tokenizer, or prompt/response records)")
        return template

    def _render(self, messages: Sequence[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)

    def _masked_segments(self, messages, add_generation_prompt):
        out = self.tok.apply_chat_template(list(messages), tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True,
                                           add_generation_prompt=add_generation_prompt)
        pieces: list[tuple[list[int], bool]] = []
        for token, mask in zip(out["input_ids"], out["assistant_masks"]):
            if pieces and pieces[-1][1] == bool(mask):
                pieces[-1][0].append(int(token))
            else:
                pieces.append(([int(token)], bool(mask)))
        return pieces

    def _prefix_segments(self, messages, add_generation_prompt):
        pieces: list[tuple[str, bool]] = []
        done = ""
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            context, full = self._render(messages[:k], True), self._render(messages[: k + 1], False)
            if not context.startswith(done) or not full.startswith(context):
                raise _NotPrefix
            pieces += [(context[len(done):], False), (full[len(context):], True)]
            done = full
        if add_generation_prompt or messages[-1]["role"] != "assistant":  # else the loop's last render is all
            tail = self._render(messages, add_generation_prompt)
            if not tail.startswith(done):
                raise _NotPrefix
            pieces.append((tail[len(done):], False))
        return self._encode_pieces(pieces)

    def _encode_pieces(self, pieces: list[tuple[str, bool]]) -> list[tuple[list[int], bool]]:
        return [(self.tok.encode(text, add_special_tokens=False), reply) for text, reply in pieces if text]

    def _probe(self) -> tuple[str, str]:
        """(the generation prompt's text, the text after a reply) of this template, from one-turn probes;
        empty strings where the template refuses the probe or the probe shows nothing."""
        if not hasattr(self, "_probed"):
            reply = "fastpeft-probe-reply"
            header = suffix = ""
            try:
                user = [{"role": "user", "content": "fastpeft-probe-question"}]
                with_prompt, without = self._render(user, True), self._render(user, False)
                if with_prompt.startswith(without):
                    header = with_prompt[len(without):]
                one_turn = self._render(user + [{"role": "assistant", "content": reply}], False)
                if reply in one_turn:
                    suffix = one_turn[one_turn.rindex(reply) + len(reply):]
            except Exception:  # noqa: BLE001 — a template that needs a system turn, other roles, ...
                pass
            self._probed = (header, suffix)
        return self._probed

    def _located_segments(self, messages, add_generation_prompt):
        header, suffix = self._probe()
        full = self._render(messages, add_generation_prompt)
        pieces: list[tuple[str, bool]] = []
        cursor = 0
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = full.find(header, cursor) + len(header) if header and header in full[cursor:] else cursor
            content = m["content"]
            # the reply as written, stripped, or (a template dropping earlier reasoning) its answer after </think>
            for text in (content, content.strip(), content.rpartition("</think>")[2].strip()):
                at = full.find(text, start) if text else -1
                if at >= 0:
                    break
            else:
                raise DataError(f"the chat template of {self.name!r} rewrites earlier turns, and the text of turn {k} "
                                "(assistant) does not appear in the rendered conversation; fastpeft cannot tell "
                                "which tokens are the reply (a template marking them with {% generation %} can)")
            end = at + len(text)
            if suffix and full.startswith(suffix, end):
                end += len(suffix)
            elif suffix.strip() and full.startswith(suffix.strip(), end):
                end += len(suffix.strip())
            if not header or start == cursor:  # no header found: the reply is its text
                start = at
            pieces += [(full[cursor:start], False), (full[start:end], True)]
            cursor = end
        pieces.append((full[cursor:], False))
        return self._encode_pieces(pieces)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Save the wrapped transformers tokenizer to ``directory``."""
        self.tok.save_pretrained(directory)


# --------------------------------------------------------------------------- the embedded task
DEFAULT_TASK_NAME = "uppercase-words"


def default_task(n_train: int = 4000, n_eval: int = 200, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """The embedded task: spell a lowercase word of 3–6 letters in capitals (``"upper: train ="`` → ``" TRAIN"``).

    Train and held-out words are disjoint, so held-out exact-match accuracy measures a learned rule (copy each
    letter, mapped to its capital), not memorization: 0 before training, near 1 after a minute or two on 2 CPU
    cores. (Reversing the word, tried first, learned too slowly on a random base to show in minutes.)
    """
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < n_train + n_eval:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(3, 6))))
    ordered = sorted(words)
    rng.shuffle(ordered)

    def row(w: str) -> dict:
        return {"prompt": f"upper: {w} =", "response": f" {w.upper()}"}

    return [row(w) for w in ordered[:n_train]], [row(w) for w in ordered[n_train:]]


# --------------------------------------------------------------------------- loading
class DataError(ValueError):
    """A problem with the training data, naming the file and line."""


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "model": "assistant", "system": "system", "tool": "tool", "function": "tool"}


def _conversation(turns, where: str) -> list[dict]:
    """``messages`` (role/content) or ShareGPT turns (from/value) as role/content dicts, checked."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: a conversation must be a non-empty list of turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise DataError(f"{where}: turn {i} is a {type(t).__name__}, not an object")
        if "role" in t:
            role, content = t["role"], t.get("content")
        elif "from" in t:
            role, content = _SHAREGPT_ROLES.get(t["from"], t["from"]), t.get("value")
        else:
            raise DataError(f"{where}: turn {i} needs 'role' and 'content' (or ShareGPT's 'from' and 'value'); "
                            f"found {sorted(t)}")
        if role not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: turn {i} has role {role!r}; expected system, user, assistant or tool")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {i} ({role}) has no string content")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DataError(f"{where}: the conversation has no assistant reply to learn")
    return out


# Stanford Alpaca's prompt (github.com/tatsu-lab/stanford_alpaca), for records with instruction/input/output
ALPACA_PROMPT = ("Below is an instruction that describes a task{with_input}. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Stanford Alpaca prompt of an instruction (and its input, when not empty); the response follows it."""
    if input_text.strip():
        return ALPACA_PROMPT.format(with_input=", paired with an input that provides further context",
                                    instruction=instruction, input_block=f"### Input:\n{input_text}\n\n")
    return ALPACA_PROMPT.format(with_input="", instruction=instruction, input_block="")


def _read_utf8(path: str) -> str:
    """The file's text; undecodable UTF-8 is a DataError naming the line (and the byte in the file)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{lineno}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def _lines(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of ``text``'s non-blank lines, line ends removed."""
    for lineno, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if line.strip():
            yield lineno, line


def _json_objects(path: str) -> Iterator[tuple[object, str, int]]:
    """(object, where, line) for each record of a JSONL file, or of a ``.json`` file holding one JSON array
    (where: ``path:line`` for JSONL, ``path: item N`` for an array)."""
    text = _read_utf8(path)
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        for i, obj in enumerate(items):
            yield obj, f"{path}: item {i}", i + 1
        return
    for lineno, line in _lines(text):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        yield obj, f"{path}:{lineno}", lineno


def read_records(path: str | os.PathLike, prompt_field: str = "prompt", response_field: str = "response",
                 text_field: str = "text", messages_field: str = "messages") -> list[dict]:
    """Read a JSONL file (or a ``.json`` file holding one JSON array of records) or a plain-text file (one sample
    a line). Records are prompt/response pairs (TRL's ``completion`` is read as the response when there is no
    ``response``), ``{"text": ...}``, Alpaca's ``instruction``/``input``/``output`` (laid out with Stanford
    Alpaca's prompt), or conversations: ``messages_field`` (default ``"messages"``, role/content turns) or
    ShareGPT's ``"conversations"`` (from/value turns).

    Errors name the file and line (or array item): undecodable UTF-8, invalid JSON, a record without the
    fields, a malformed conversation, an empty file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"data file {path!r} does not exist")
    records: list[dict] = []
    if not path.endswith((".jsonl", ".json")):
        records = [{"text": line, "_line": lineno} for lineno, line in _lines(_read_utf8(path))]
        if not records:
            raise DataError(f"data file {path!r} has no samples")
        return records
    for obj, where, lineno in _json_objects(path):
        if not isinstance(obj, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        turns = obj.get(messages_field, obj.get("conversations"))
        response_key = response_field
        if response_field == "response" and "response" not in obj and "completion" in obj:
            response_key = "completion"  # TRL's prompt-completion records
        if turns is not None:
            records.append({"messages": _conversation(turns, where), "_line": lineno, "_where": where})
        elif prompt_field in obj or response_key in obj:
            missing = [k for k in (prompt_field, response_key) if not isinstance(obj.get(k), str)]
            if missing:
                raise DataError(f"{where}: field(s) {missing} missing or not a string (fields present: {sorted(obj)})")
            records.append({"prompt": obj[prompt_field], "response": obj[response_key], "_line": lineno,
                            "_where": where})
        elif "instruction" in obj and "output" in obj:
            fields = {k: obj.get(k, "") for k in ("instruction", "input", "output")}
            wrong = [k for k, v in fields.items() if not isinstance(v, str)]
            if wrong:
                raise DataError(f"{where}: Alpaca field(s) {wrong} not a string")
            records.append({"prompt": alpaca_prompt(fields["instruction"], fields["input"]),
                            "response": fields["output"], "_line": lineno, "_where": where})
        elif isinstance(obj.get(text_field), str):
            if not obj[text_field].strip():
                raise DataError(f"{where}: empty text sample (field {text_field!r})")
            records.append({"text": obj[text_field], "_line": lineno, "_where": where})
        else:
            raise DataError(f"{where}: needs string fields {prompt_field!r} and {response_field!r} "
                            f"(or {text_field!r}, Alpaca's instruction/output, or a {messages_field!r} "
                            f"conversation); found {sorted(obj)} (set --prompt-field/--response-field/"
                            "--messages-field)")
    if not records:
        raise DataError(f"data file {path!r} has no samples")
    return records


@dataclass
class Sample:
    """One tokenized sample: ``input_ids`` and ``labels`` (-100 over the prompt). A row of packed samples
    (``pack``) also has ``position_ids``, restarting at 0 where each of its samples starts."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None = None


def pack(samples: Sequence[Sample], length: int) -> list[Sample]:
    """Samples packed into rows of at most ``length`` tokens (best-fit decreasing; deterministic).

    Each row's ``position_ids`` restart at 0 where a sample starts, which transformers reads as separate
    sequences: with no attention mask, each token attends only to its own sample (``--packing`` checks the
    model does). The first label of each sample is -100: its first token is never predicted (as in an unpacked
    batch, where position 0 has nothing before it), so no sample learns from the one packed before it.
    Rows come out longest first; ``batches`` shuffles them.
    """
    if length < 1:
        raise ValueError(f"pack: length must be ≥ 1, got {length}")
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free tokens, row), sorted: the best fit is the first with enough room
    for i in order:
        n = len(samples[i].input_ids)
        if n > length:
            raise ValueError(f"pack: a sample of {n} tokens does not fit in rows of {length}")
        k = bisect.bisect_left(room, (n, -1))
        if k < len(room):
            free, row = room.pop(k)
        else:
            free, row = length, len(rows)
            rows.append([])
        rows[row].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, row))
    out = []
    for members in rows:
        ids, labels, positions = [], [], []
        for i in members:
            s = samples[i]
            ids += s.input_ids
            labels += [IGNORE_INDEX, *s.labels[1:]]
            positions += range(len(s.input_ids))
        out.append(Sample(ids, labels, positions))
    return out


def auto_max_length(records: list[dict], tokenizer, cap: int = 4096, source: str = "data",
                    quantile: float | None = None) -> int:
    """The seed notes' rule: 1.5 × the mean sample length, outliers (above the 98th percentile) removed; with
    ``quantile`` (``--packing``: 0.98), that quantile of the lengths instead, so nearly every sample stays whole.
    ``source`` names the file in errors (a conversation the chat template refuses)."""
    lengths = sorted(len(_full_ids(r, tokenizer, _where(r, source, i))) for i, r in enumerate(records))
    if quantile is not None:
        return int(min(cap, max(8, lengths[min(len(lengths) - 1, int(len(lengths) * quantile))])))
    keep = lengths[: max(1, int(len(lengths) * 0.98))]
    return int(min(cap, max(8, round(1.5 * sum(keep) / len(keep)))))


def chat_segments(tokenizer, messages: Sequence[dict], where: str, add_generation_prompt: bool = False
                  ) -> list[tuple[list[int], bool]]:
    """``tokenizer.chat_segments`` of a conversation; whatever stops the chat template (its ``raise_exception``,
    e.g. a system turn or roles that do not alternate) is a DataError naming ``where``."""
    try:
        return tokenizer.chat_segments(messages, add_generation_prompt=add_generation_prompt)
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 — jinja2's TemplateError, transformers' ValueError, ...
        raise DataError(f"{where}: the tokenizer's chat template refuses this conversation "
                        f"({type(exc).__name__}: {exc})") from exc


def _where(r: dict, source: str, i: int) -> str:
    """Where record ``r`` (the ``i``-th) came from, for errors: its file and line (or array item)."""
    return r.get("_where") or f"{source}:{r.get('_line', i + 1)}"


def _record_segments(r: dict, tokenizer, where: str) -> list[tuple[list[int], bool]]:
    """A conversation record's segments, kept in the record for the next call with the same tokenizer
    (``--max-length auto`` measures them before ``tokenize`` uses them: the template renders once)."""
    cached = r.get("_segments")
    if cached is None or cached[0] is not tokenizer:
        cached = r["_segments"] = (tokenizer, chat_segments(tokenizer, r["messages"], where))
    return cached[1]


def _full_ids(r: dict, tokenizer, where: str = "data") -> list[int]:
    if "messages" in r:
        return [i for ids, _ in _record_segments(r, tokenizer, where) for i in ids]
    if "text" in r:
        return tokenizer.encode(r["text"], add_special_tokens=True) + [tokenizer.eos_token_id]
    return (tokenizer.encode(r["prompt"], add_special_tokens=True) + tokenizer.encode(r["response"])
            + [tokenizer.eos_token_id])


def tokenize(records: list[dict], tokenizer, max_length: int, source: str = "data") -> list[Sample]:
    """Tokenize as the recipe says; a row whose prompt leaves no room for its response is an error naming it."""
    out = []
    for i, r in enumerate(records):
        where = _where(r, source, i)
        if "messages" in r:
            ids, labels = [], []
            for piece, reply in _record_segments(r, tokenizer, where):
                ids += piece
                labels += piece if reply else [IGNORE_INDEX] * len(piece)
            del r["_segments"]  # the sample holds the tokens now
            ids, labels = ids[:max_length], labels[:max_length]
            if all(t == IGNORE_INDEX for t in labels[1:]):  # position 0 is never predicted
                raise DataError(f"{where}: no assistant token falls within --max-length {max_length}; nothing "
                                "of this conversation would be trained (raise --max-length or shorten it)")
            out.append(Sample(ids, labels))
            continue
        if "text" in r:
            if not r["text"].strip():
                raise DataError(f"{where}: empty text sample")
            ids = tokenizer.encode(r["text"], add_special_tokens=True)
            # a text cut at max_length gets no eos: the model must not learn to stop mid-text
            ids = ids[:max_length] if len(ids) >= max_length else ids + [tokenizer.eos_token_id]
            if len(ids) < 2:
                raise DataError(f"{where}: empty text sample")
            out.append(Sample(ids, list(ids)))
            continue
        prompt = tokenizer.encode(r["prompt"], add_special_tokens=True)
        response = tokenizer.encode(r["response"]) + [tokenizer.eos_token_id]
        if len(prompt) >= max_length:
            raise DataError(f"{where}: the prompt alone has {len(prompt)} tokens ≥ --max-length {max_length}; "
                            "nothing of the response would be trained (raise --max-length or shorten the row)")
        response = response[: max_length - len(prompt)]
        out.append(Sample(prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    return out


class Collator:
    """Pads a batch to its longest sample: ``input_ids`` with pad, ``labels`` with -100, ``attention_mask``.

    Samples are sorted by length (longest first) inside the batch, as the seed recipe does. A batch of packed
    rows (``pack``) gets ``position_ids`` instead of ``attention_mask`` (transformers then keeps the packed
    samples apart); a row's padding continues as a sequence of its own (positions from 0, labels -100).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, batch: Sequence[Sample]) -> dict[str, torch.Tensor]:
        if not batch:
            raise ValueError("empty batch")
        batch = sorted(batch, key=lambda s: len(s.input_ids), reverse=True)
        length = len(batch[0].input_ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        ids = torch.full((len(batch), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        packed = batch[0].position_ids is not None
        if packed != all(s.position_ids is not None for s in batch):
            raise ValueError("a batch mixes packed rows and unpacked samples")
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        positions = torch.arange(length).repeat(len(batch), 1)
        for i, s in enumerate(batch):
            n = len(s.input_ids)
            ids[i, :n] = torch.tensor(s.input_ids)
            labels[i, :n] = torch.tensor(s.labels)
            mask[i, :n] = 1
            if packed:
                positions[i, :n] = torch.tensor(s.position_ids)
                positions[i, n:] = torch.arange(length - n)
        if packed:
            return {"input_ids": ids, "labels": labels, "position_ids": positions}
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(samples: list[Sample], batch_size: int, seed: int, epoch: int,
            group_by_length: bool = False) -> Iterator[list[Sample]]:
    """The batches of one epoch, in a deterministic order (seed, epoch); optionally grouped by length."""
    order = list(range(len(samples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    if group_by_length:
        chunk = batch_size * 50
        order = [i for k in range(0, len(order), chunk)
                 for i in sorted(order[k:k + chunk], key=lambda j: -len(samples[j].input_ids))]
        groups = [order[k:k + batch_size] for k in range(0, len(order), batch_size)]
        random.Random(seed + epoch).shuffle(groups)
        order = [i for g in groups for i in g]
    for k in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
        yield [samples[i] for i in order[k:k + batch_size]]
