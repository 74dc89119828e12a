"""Datasets over MiniMind's jsonl files, and batching.

A file is indexed once (byte offset and length of every non-blank line, validated as it goes) and items
are read back by seeking, so memory stays flat however large the file is: 12 bytes per line (16 once
token_lengths has been asked for).
"""
import json
import os
from array import array
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
DEMO_DIR = Path(__file__).resolve().parent / "demo"


class DataError(ValueError):
    pass


def is_chat_file(path) -> bool:
    """Whether a jsonl file holds conversations (else pretraining texts), told by its first line."""
    with open(path, "rb") as f:
        first = next((line for line in f if line.strip()), b"")
    return b'"conversations"' in first


class JsonlDataset(Dataset):
    """Base class: one JSON object per line; subclasses say what a valid record is and how to tokenize it."""

    def __init__(self, data_path, tokenizer, max_length, skip_bad_lines=False):
        self.path = Path(data_path)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.skip_bad_lines = skip_bad_lines
        if not self.path.is_file():
            hint = "; make the demo data with: python dataset/make_demo_data.py" \
                if self.path.resolve().parent == DEMO_DIR else ""
            raise DataError(f"{self.path}: no such file{hint}")
        self._stamp = self._file_stamp()
        self.offsets, self.line_bytes, self.n_skipped = self._index()
        if len(self.offsets) == 0:
            raise DataError(f"{self.path}: no usable rows ({self.n_skipped} bad lines skipped)")
        self._file, self._file_pid = None, None
        self._token_lengths = None

    def _index(self):
        offsets, lengths, n_skipped, pos = array("q"), array("i"), 0, 0
        with open(self.path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                start, pos = pos, pos + len(line)
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    problem = self.check(record) if isinstance(record, dict) else "not a JSON object"
                except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                    problem = f"not valid JSON ({e})"
                if problem:
                    if not self.skip_bad_lines:
                        raise DataError(f"{self.path}:{lineno}: {problem}; "
                                        f"fix the line or pass --skip_bad_lines to skip it")
                    n_skipped += 1
                    continue
                offsets.append(start)
                lengths.append(len(line))
        return np.frombuffer(offsets, dtype=np.int64), np.frombuffer(lengths, dtype=np.int32), n_skipped

    def check(self, record):
        """Return what is wrong with a parsed line, or None."""
        raise NotImplementedError

    def prompt_length(self, i) -> int:
        """Tokens of sample i before its first target token: max_length must exceed it to train on the sample."""
        raise NotImplementedError

    def length_text(self, record) -> tuple:
        """(text, extra): the sample's token count is the tokenizer's count for text, plus extra."""
        raise NotImplementedError

    def token_lengths(self, chunk=4096):
        """Token count of every sample (capped at max_length), computed once with the tokenizer's batch encoder.
        Line bytes are a rough stand-in when languages mix: a Chinese character is 3 bytes and about one token."""
        if self._token_lengths is None:
            counts = np.empty(len(self), dtype=np.int32)
            for start in range(0, len(self), chunk):
                pairs = [self.length_text(self.record(i)) for i in range(start, min(start + chunk, len(self)))]
                counts[start: start + len(pairs)] = [n + extra for n, (_, extra) in
                                                     zip(self.tokenizer.count_tokens([t for t, _ in pairs]), pairs)]
            self._token_lengths = np.minimum(counts, self.max_length)
        return self._token_lengths

    def check_targets(self, limit=10_000):
        """Raise DataError when max_length cuts every sample (of the first `limit`) before its first target token,
        which would train on nothing. Stops at the first sample that keeps one, so a sound file costs one sample."""
        n, shortest = min(len(self), limit), None
        for i in range(n):
            k = self.prompt_length(i)
            if k < self.max_length:
                return
            shortest = k if shortest is None else min(shortest, k)
        which = f"any of the {n} samples" if n == len(self) else f"the first {n} of the {len(self)} samples"
        raise DataError(f"--max_seq_len {self.max_length} leaves no answer token in {which} of {self.path} "
                        f"(the shortest prompt is {shortest} tokens); raise --max_seq_len")

    def cut_counts(self, limit=20_000) -> tuple:
        """(samples checked, samples max_length cuts, samples it leaves without a target token) of the first
        `limit`, for the trainers' plan line: both are silent otherwise (the loss just skips what is cut)."""
        n = min(len(self), limit)
        pairs = [self.length_text(self.record(i)) for i in range(n)]
        full = [k + extra for k, (_, extra) in zip(self.tokenizer.count_tokens([t for t, _ in pairs]), pairs)]
        no_target = sum(self.prompt_length(i) >= self.max_length for i, k in enumerate(full) if k > self.max_length)
        return n, sum(k > self.max_length for k in full), no_target

    def __len__(self):
        return len(self.offsets)

    def record(self, i):
        # One handle per process: DataLoader workers forked from us must not share a file position.
        if self._file_pid != os.getpid():
            self._file, self._file_pid = open(self.path, "rb"), os.getpid()
        self._file.seek(int(self.offsets[i]))
        line = self._file.read(int(self.line_bytes[i]))
        try:
            return json.loads(line)
        except ValueError:
            if self._file_stamp() != self._stamp:
                raise DataError(f"{self.path} changed after it was indexed; restart to re-index it") from None
            raise

    def _file_stamp(self):
        stat = self.path.stat()
        return stat.st_size, stat.st_mtime_ns

    def __getstate__(self):  # picklable for spawned DataLoader workers
        return {**self.__dict__, "_file": None, "_file_pid": None}


class PretrainDataset(JsonlDataset):
    """{"text": ...} -> (input_ids, labels) = [bos] + text + [eos], truncated to max_length; labels = input_ids."""

    def __init__(self, data_path, tokenizer, max_length=512, skip_bad_lines=False):
        super().__init__(data_path, tokenizer, max_length, skip_bad_lines)

    def check(self, record):
        if not isinstance(record.get("text"), str):
            return 'missing "text" string field'
        return None

    def prompt_length(self, i) -> int:
        return 1  # <bos>; every later token is a target

    def length_text(self, record) -> tuple:
        return record["text"], 2  # + <bos> and <eos>

    def __getitem__(self, i):
        ids = self.tokenizer.encode(self.record(i)["text"], add_special_tokens=True)[: self.max_length]
        input_ids = torch.tensor(ids, dtype=torch.long)
        return input_ids, input_ids.clone()


class PackedDataset(Dataset):
    """Pretraining documents packed end to end, as nanoGPT does: each epoch shuffles the documents ([bos] text
    [eos], whole: give `documents` a max_length no text reaches), joins them into one stream and cuts it into rows
    of max_length tokens, so no step computes on padding (length-grouped batches of the demo's pretraining are 19%
    pads). A row may hold the end of one document and the start of the next; attention crosses the boundary, as in
    GPT-2's pretraining. The stream's last partial row is dropped. Call set_epoch before each epoch (the trainer
    does)."""

    def __init__(self, documents: PretrainDataset, max_length, seed=0):
        # Documents longer than a row are not cut at max_length: they run on into the next row.
        self.documents, self.max_length, self.seed = documents, max_length, seed
        self.lengths = documents.token_lengths().astype(np.int64)
        if int(self.lengths.sum()) < self.max_length:
            raise DataError(f"{documents.path}: {int(self.lengths.sum())} tokens in all, fewer than one packed row "
                            f"of --max_seq_len {self.max_length}; lower --max_seq_len or turn off --pack")
        self.set_epoch(0)

    def set_epoch(self, epoch):
        self.order = np.random.default_rng((self.seed, epoch, 1)).permutation(len(self.lengths))
        self.ends = np.cumsum(self.lengths[self.order])  # stream position where each shuffled document ends

    def __len__(self):
        return int(self.lengths.sum()) // self.max_length

    def __getitem__(self, k):
        start, stop = k * self.max_length, (k + 1) * self.max_length
        j = int(np.searchsorted(self.ends, start, side="right"))  # the document that holds token `start`
        pieces = []
        while start < stop:
            ids = self.documents[int(self.order[j])][0]
            doc_start = int(self.ends[j]) - len(ids)
            pieces.append(ids[start - doc_start: stop - doc_start])
            start, j = doc_start + len(ids), j + 1
        input_ids = torch.cat(pieces)
        return input_ids, input_ids.clone()


class SFTDataset(JsonlDataset):
    """{"conversations": [{"role", "content"}, ...]} -> ChatML tokens; loss only on each assistant
    message's content and its <|im_end|> (header and the "\\n" after <|im_end|> are masked)."""

    def __init__(self, data_path, tokenizer, max_length=1024, skip_bad_lines=False):
        super().__init__(data_path, tokenizer, max_length, skip_bad_lines)

    def check(self, record):
        conversation = record.get("conversations")
        if not isinstance(conversation, list) or not conversation:
            return 'missing "conversations" list'
        for n, message in enumerate(conversation, 1):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                return f'message {n} has no "content" string'
            if message.get("role") not in ROLES:
                return f"message {n} has role {message.get('role')!r}, expected one of {', '.join(ROLES)}"
        if not any(m["role"] == "assistant" for m in conversation):
            return "conversation has no assistant message"
        return None

    def _tokens(self, i, max_length=None):
        """Token ids of sample i (the first max_length) and whether each carries loss."""
        ids, labeled, _, _ = self.tokens_with_text(i, max_length)
        return ids, labeled

    def tokens_with_text(self, i, max_length=None):
        """(ids, labeled, chat text, each token's character span in it) of sample i, cut at max_length."""
        tok = self.tokenizer
        text, spans = "", []  # spans: character ranges that carry loss
        for message in self.record(i)["conversations"]:
            piece = tok.apply_chat_template([message])  # header + content + eos + "\n"
            if message["role"] == "assistant":
                end = len(text) + piece.rindex(tok.eos_token) + len(tok.eos_token)
                spans.append((end - len(tok.eos_token) - len(message["content"]), end))
            text += piece
        # Tokenize the whole string once so ids equal tok.apply_chat_template(..., tokenize=True) exactly,
        # then label a token when it starts inside a span. (Content that begins with two or more
        # whitespace characters can share its first token with the header's "\n"; that token stays masked.)
        ids, offsets = tok.encode_with_offsets(text)
        ids, offsets = ids[: max_length], offsets[: max_length]
        starts = np.array([s for s, _ in offsets], dtype=np.int64)
        labeled = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            labeled |= (starts >= start) & (starts < end)
        return ids, labeled, text, offsets

    def length_text(self, record) -> tuple:
        return self.tokenizer.apply_chat_template(record["conversations"]), 0

    def prompt_length(self, i) -> int:
        labeled = self._tokens(i)[1]
        return int(labeled.argmax()) if labeled.any() else len(labeled)

    def __getitem__(self, i):
        ids, labeled = self._tokens(i, self.max_length)
        input_ids = torch.tensor(ids, dtype=torch.long)
        labels = torch.where(torch.from_numpy(labeled), input_ids, IGNORE_INDEX)
        return input_ids, labels


class ReplayMix(Dataset):
    """A task's chat samples plus general conversations replayed beside them, so an adapter learns its task
    without unlearning what the base answered (the demo's adapters lose 9-17 points of held-out general
    answers without replay). Each epoch draws round(ratio * len(task)) replay samples afresh from the replay
    file (without replacement while it has enough; whole passes, then a draw, when it has fewer), seeded by
    (seed, epoch). Call set_epoch before each epoch (the trainer does)."""

    def __init__(self, task: SFTDataset, replay: SFTDataset, ratio: float, seed=0, pool=None):
        self.task, self.replay, self.ratio, self.seed = task, replay, ratio, seed
        self.pool = np.arange(len(replay)) if pool is None else np.asarray(pool, dtype=np.int64)  # rows it may draw
        if len(self.pool) == 0:
            raise DataError(f"{replay.path}: no replay rows left to draw from")
        self.n_replay = round(ratio * len(task))
        self.path, self.max_length, self.tokenizer = task.path, task.max_length, task.tokenizer
        self.n_skipped = task.n_skipped
        self.set_epoch(0)

    def set_epoch(self, epoch):
        rng = np.random.default_rng((self.seed, epoch, 2))
        whole, rest = divmod(self.n_replay, len(self.pool))
        self.chosen = self.pool[np.concatenate([rng.permutation(len(self.pool)) for _ in range(whole)]
                                               + [rng.permutation(len(self.pool))[:rest]]).astype(np.int64)]

    @property
    def line_bytes(self):  # the length-grouped sampler reads this each epoch
        return np.concatenate([self.task.line_bytes, self.replay.line_bytes[self.chosen]])

    def check_targets(self):
        self.task.check_targets()
        self.replay.check_targets()

    def cut_counts(self, limit=20_000) -> tuple:
        a, b = self.task.cut_counts(limit), self.replay.cut_counts(min(limit, max(self.n_replay, 1)))
        return tuple(x + y for x, y in zip(a, b))

    def __len__(self):
        return len(self.task) + self.n_replay

    def __getitem__(self, i):
        return self.task[i] if i < len(self.task) else self.replay[int(self.chosen[i - len(self.task)])]


class PadCollator:
    """Right-pads a batch of (input_ids, labels) to its longest sample, or to max_length when given.
    Right padding under a causal mask needs no attention mask: real tokens never see the pads after them."""

    def __init__(self, pad_id, max_length=None):
        self.pad_id, self.max_length = pad_id, max_length

    def __call__(self, batch):
        length = self.max_length or max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, lab) in enumerate(batch):
            input_ids[row, : len(ids)] = ids[:length]
            labels[row, : len(lab)] = lab[:length]
        return {"input_ids": input_ids, "labels": labels}


class LengthGroupedBatchSampler:
    """Shuffled batches of similar length, which cuts padding. The length is the line's bytes (free, from the
    index) unless `lengths` is given: the training loop keeps bytes because grouping by token_lengths (2% pads
    against 19% in the demo's pretraining) trained bases that answered eval_general 85.0% / 83.0% against
    90.5% / 90.5% (one thread, seeds 42 / 1); see docs/DEMO_RECIPE.md.
    Deterministic given seed and epoch; with world_size > 1 each rank takes every world_size-th batch of the
    same list (equal counts per rank, so DDP never waits on a missing batch)."""

    def __init__(self, dataset, batch_size, seed=0, group_size=64, rank=0, world_size=1, lengths=None):
        self.dataset, self.given_lengths = dataset, None if lengths is None else np.asarray(lengths)
        self.n = len(dataset) if lengths is None else len(self.given_lengths)
        self.batch_size, self.seed = batch_size, seed
        self.group = batch_size * group_size
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _batches(self):
        lengths = self.dataset.line_bytes if self.given_lengths is None else self.given_lengths  # a ReplayMix's
        rng = np.random.default_rng((self.seed, self.epoch))                                  # move each epoch
        order = rng.permutation(self.n)
        batches = []
        for g in range(0, len(order), self.group):
            group = order[g: g + self.group]
            group = group[np.argsort(-lengths[group], kind="stable")]
            batches += [group[b: b + self.batch_size].tolist() for b in range(0, len(group), self.batch_size)]
        batches = [batches[k] for k in rng.permutation(len(batches))]
        usable = len(batches) // self.world_size * self.world_size
        return batches[:usable][self.rank:: self.world_size]

    def __iter__(self):
        return iter(self._batches())

    def __len__(self):
        return -(-self.n // self.batch_size) // self.world_size


def pad_fraction(dataset, batch_size, batch_sampler=None, max_samples=None):
    """Fraction of pad tokens when batching `dataset`, padding to the longest sample per batch versus
    padding every sample to dataset.max_length. Batches come from batch_sampler, else in file order."""
    n = len(dataset) if max_samples is None else min(max_samples, len(dataset))
    batches = list(batch_sampler) if batch_sampler is not None else \
        [list(range(b, min(b + batch_size, n))) for b in range(0, n, batch_size)]
    batches = [[i for i in batch if i < n] for batch in batches]
    length = {i: len(dataset[i][0]) for batch in batches for i in batch}
    real = sum(length.values())
    padded_longest = sum(len(batch) * max(length[i] for i in batch) for batch in batches if batch)
    return {"longest": 1 - real / padded_longest, "max_length": 1 - real / (len(length) * dataset.max_length)}


def show_mask(dataset, rows=3, colour=False, out=print):
    """Print the first `rows` samples token by token as the loss sees them: tokens that are targets marked
    (green on a terminal, [brackets] otherwise), then the count of trained / total tokens. Pretraining: every
    token after <bos> is a target; chat: each assistant reply and its <|im_end|> (labels shift by one in the loss,
    so a marked token is one the model is trained to predict)."""
    mark = (lambda t: f"\033[42;30m{t}\033[0m") if colour else (lambda t: f"[{t}]")
    for i in range(min(rows, len(dataset))):
        if isinstance(dataset, SFTDataset):
            ids, labeled, text, offsets = dataset.tokens_with_text(i, dataset.max_length)
            full = len(dataset.tokens_with_text(i)[0])
        else:
            text = dataset.record(i)["text"]
            body, offsets = dataset.tokenizer.encode_with_offsets(text)
            tok = dataset.tokenizer
            text = tok.bos_token + text + tok.eos_token
            shift = len(tok.bos_token)
            offsets = [(0, shift)] + [(s + shift, e + shift) for s, e in offsets] + [(len(text) - len(tok.eos_token),
                                                                                     len(text))]
            ids = [tok.bos_token_id, *body, tok.eos_token_id]
            full = len(ids)
            ids, offsets = ids[: dataset.max_length], offsets[: dataset.max_length]
            labeled = np.arange(len(ids)) > 0
        pieces, shown = [], 0
        for (start, end), on in zip(offsets, labeled):
            piece = text[max(start, shown): end]  # a character split over byte tokens is shown once
            shown = max(shown, end)
            piece = piece.replace("\n", "\\n")
            pieces.append((mark(piece) if on else piece) + ("\n" if piece.endswith("\\n") else ""))
        cut = f", {full - len(ids)} more cut by --max_seq_len {dataset.max_length}" if full > len(ids) else ""
        out(f"--- {dataset.path.name} row {i + 1}: {int(labeled.sum())} of {len(ids)} tokens trained{cut}")
        out("".join(pieces).rstrip("\n"))


def main(argv=None):
    import argparse
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from model.tokenizer import Tokenizer
    p = argparse.ArgumentParser(description="Show which tokens of a jsonl file carry the loss.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--show_mask", required=True, metavar="FILE",
                   help='a pretraining ({"text"}) or chat ({"conversations"}) jsonl file')
    p.add_argument("--rows", type=int, default=3, help="how many samples to print, from the top of the file")
    p.add_argument("--max_seq_len", type=int, default=256, help="cut each sample here, as the trainers do")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder or tokenizer.json (default: model/)")
    args = p.parse_args(argv)
    if args.rows < 1 or args.max_seq_len < 2:
        p.error("--rows must be at least 1 and --max_seq_len at least 2")
    tokenizer = Tokenizer(args.tokenizer)
    try:
        kind = SFTDataset if is_chat_file(args.show_mask) else PretrainDataset
        dataset = kind(args.show_mask, tokenizer, args.max_seq_len)
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    show_mask(dataset, args.rows, colour=sys.stdout.isatty())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
