"""Data for the benchmarks: locate (or download) WikiText-2 and Multi30k, tokenise, batch.

Where the files come from, first match wins:

1. ``data_dir`` (the benchmarks' ``--data-dir``): a directory that contains ``wikitext-2/`` or
   ``multi30k/``; e.g. ``../shared/data`` from the repository root.
2. ``$CONSISTENT_DECODING_DATA``: the same kind of directory.
3. The cache ``$CONSISTENT_DECODING_CACHE/data`` (default ``~/.cache/consistent-decoding/data``). Files
   missing there are downloaded from :data:`WIKITEXT2_SOURCES` / :data:`MULTI30K_SOURCES`.

Locations 1 and 2 are never written to: missing files there are an error. Every file is checked against
its sha256 (from ``shared/data/README.md``) before use. Downloads use only ``urllib``, show a tqdm bar and
are written to a temporary file, verified, then copied into place atomically
(:func:`training.checkpoint.atomic_copy`).

Example::

    data = load_wikitext("../shared/data", unit="sentence", splits=("train", "valid"))
    vocab = Vocabulary.build(data["train"], min_count=1)
    contexts, references = split_context(data["valid"], context_len=10)
    batch = prompt_batch([vocab.encode(c) for c in contexts[:32]], pad_id=vocab.pad_id)
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import itertools
import os
import shutil
import tempfile
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple, TypeVar

import torch
from tqdm import tqdm

from benchmarks.common import cache_root
from training.checkpoint import atomic_copy
from training.padding import pad_rows

__all__ = [
    "DATA_ENV",
    "Source",
    "ChecksumError",
    "DatasetNotFoundError",
    "WIKITEXT2_SHA256",
    "WIKITEXT2_SOURCES",
    "MULTI30K_SHA256",
    "MULTI30K_SOURCES",
    "default_cache_dir",
    "sha256_file",
    "locate_dataset",
    "add_data_arguments",
    "Vocabulary",
    "split_sentences",
    "wikitext_sequences",
    "load_wikitext",
    "load_multi30k",
    "split_context",
    "pad_context",
    "PromptBatch",
    "prompt_batch",
]

DATA_ENV = "CONSISTENT_DECODING_DATA"

T = TypeVar("T")


@dataclass(frozen=True)
class Source:
    """One place to download a dataset's files from.

    Attributes:
        url: for ``archive="none"`` or ``"gzip"`` a template with ``{name}`` (the local file name); for
            ``"zip"`` the archive's URL. Any URL ``urllib`` opens (``https://``, ``http://``, ``file://``).
        archive: ``"none"``: one plain file per URL; ``"gzip"``: one ``.gz`` file per URL;
            ``"zip"``: one archive holding all files.
        members: for ``"zip"``, local file name -> path inside the archive.
    """

    url: str
    archive: Literal["none", "gzip", "zip"] = "none"
    members: Mapping[str, str] = field(default_factory=dict)


class ChecksumError(ValueError):
    """A data file does not have the expected sha256."""


class DatasetNotFoundError(FileNotFoundError):
    """Data files are missing and could not be downloaded."""


WIKITEXT2_SHA256 = {
    "train.txt": "9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f",
    "valid.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "test.txt": "d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0",
}
# The tokenised files (wiki.*.tokens) as PyTorch's word_language_model example ships them, renamed to
# train/valid/test.txt; then Salesforce's original archive, mirrored by its author.
WIKITEXT2_SOURCES = (
    Source(
        "https://raw.githubusercontent.com/pytorch/examples/main/word_language_model/data/wikitext-2/{name}"
    ),
    Source(
        "https://wikitext.smerity.com/wikitext-2-v1.zip",
        archive="zip",
        members={f"{split}.txt": f"wikitext-2/wiki.{split}.tokens" for split in ("train", "valid", "test")},
    ),
)

MULTI30K_SHA256 = {
    "train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    "train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    "val.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
    "val.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "test_2016_flickr.de": "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
    "test_2016_flickr.en": "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
    "test_2017_flickr.de": "c3078bc3b36808bf9d20eb2347ed6137016179ef59ec0d2b9b8ecc3fb2880081",
    "test_2017_flickr.en": "ce1450ddc5ab0834502579d77a170849952e15a2938b34cc503bdc25ebb4fb98",
    "test_2017_mscoco.de": "58277df3c75f92f7145a11b910b553d1cf82c439249d4dc237c899609eafac22",
    "test_2017_mscoco.en": "43051fdfa86fd5395182e718a94ca67b1b227b9f7c79596ff0f6b813216981d2",
    "test_2018_flickr.de": "39fcc8b3331d76fb42d648d019c6898b0d5e58baac87bc2a0bb93f44ec8db207",
    "test_2018_flickr.en": "4e585c2dd525911a6ea7730e9d0b516239af3f1b1ffae6a2130223cfb639f25e",
}
# The WMT 2016 multimodal task 1 release (raw, true-cased text), gzipped per file.
MULTI30K_SOURCES = (
    Source(
        "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/{name}.gz", archive="gzip"
    ),
)


# ---------------------------------------------------------------------------------------------------------
# locating and downloading


def default_cache_dir() -> Path:
    """``$CONSISTENT_DECODING_CACHE/data``, default ``~/.cache/consistent-decoding/data``."""
    return cache_root() / "data"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def locate_dataset(
    name: str,
    files: Sequence[str],
    checksums: Mapping[str, str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    sources: Sequence[Source] = (),
    download: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Return the folder ``<root>/<name>`` holding ``files``, all verified against ``checksums``.

    Args:
        name: the dataset's folder name, e.g. ``"wikitext-2"``.
        files: file names needed inside that folder.
        checksums: file name -> hex sha256; every name in ``files`` needs one.
        data_dir: a directory containing ``name/``; overrides ``$CONSISTENT_DECODING_DATA``. Never
            written to.
        cache_dir: the cache used when neither ``data_dir`` nor the variable is set; default
            :func:`default_cache_dir`. Missing files are downloaded into ``cache_dir/name``.
        sources: download locations tried in order; a network error moves on to the next one.
        download: ``False`` raises instead of downloading.
        timeout: seconds for each network operation.

    Raises:
        DatasetNotFoundError: files missing and not downloadable; the message says where to put them.
        ChecksumError: a file (present or downloaded) has a different sha256; the message names it.
    """
    if not files:
        raise ValueError("files is empty: name at least one file")
    unknown = [file for file in files if file not in checksums]
    if unknown:
        raise ValueError(f"checksums has no sha256 for {unknown}")
    root, origin = _explicit_root(data_dir)
    if root is not None:
        folder = root / name
        missing = _missing(folder, files)
        if missing:
            raise DatasetNotFoundError(
                f"{name}: {', '.join(missing)} not found in {folder} (from {origin}). Put the files "
                f"there, or point {origin} at a directory that contains {name}/."
            )
    else:
        folder = Path(cache_dir).expanduser() / name if cache_dir is not None else default_cache_dir() / name
        missing = _missing(folder, files)
    for file in files:
        if file not in missing:
            _verify(folder / file, checksums[file])
    if missing:  # only in the cache; downloads are verified before they are moved into place
        _download(name, folder, missing, checksums, sources if download else (), timeout)
    return folder


def _explicit_root(data_dir: str | os.PathLike[str] | None) -> tuple[Path | None, str]:
    if data_dir is not None:
        return Path(data_dir).expanduser(), "--data-dir"
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser(), f"${DATA_ENV}"
    return None, ""


def _missing(folder: Path, files: Sequence[str]) -> list[str]:
    return [file for file in files if not (folder / file).is_file()]


def _verify(path: Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise ChecksumError(
            f"{path} has sha256 {actual}, expected {expected}: the file is corrupt or a different version. "
            "Delete it (a cached copy is then downloaded again) or replace it with the original."
        )


def _download(
    name: str,
    folder: Path,
    missing: list[str],
    checksums: Mapping[str, str],
    sources: Sequence[Source],
    timeout: float,
) -> None:
    """Fetch ``missing`` into ``folder`` from the first source that works."""
    failures = []
    for source in sources:
        todo = _missing(folder, missing)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if source.archive == "zip":
                _fetch_from_zip(source, folder, todo, checksums, timeout)
            else:
                _fetch_files(source, folder, todo, checksums, timeout)
            return
        except (OSError, zipfile.BadZipFile, KeyError) as error:  # URLError and timeouts are OSErrors
            failures.append(f"  {source.url}: {error}")
    tried = "\n".join(failures) if failures else "  (downloading is off or no source is configured)"
    raise DatasetNotFoundError(
        f"{name}: {', '.join(_missing(folder, missing))} not in the cache {folder} and could not be "
        f"downloaded:\n{tried}\nPut the files into {folder}, or into <dir>/{name}/ and pass "
        f"--data-dir <dir> or set {DATA_ENV}=<dir>."
    )


@contextlib.contextmanager
def _temporary_path(folder: Path, stem: str) -> Iterator[Path]:
    """A fresh path in ``folder`` for a download in progress, removed afterwards."""
    handle, name = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=".part")
    os.close(handle)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _fetch(url: str, dest: Path, *, timeout: float, desc: str) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "consistent-decoding"})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(dest, "wb") as out:
        with tqdm(total=response.length, unit="B", unit_scale=True, desc=desc) as bar:
            for chunk in iter(lambda: response.read(1 << 16), b""):
                out.write(chunk)
                bar.update(len(chunk))


def _install(tmp: Path, dest: Path, expected: str, *, url: str) -> None:
    """Move a downloaded ``tmp`` to ``dest`` if its sha256 is ``expected``."""
    actual = sha256_file(tmp)
    if actual != expected.lower():
        raise ChecksumError(
            f"{dest.name} downloaded from {url} has sha256 {actual}, expected {expected}: the source serves "
            f"a different file; nothing was written to {dest.parent}."
        )
    atomic_copy(tmp, dest)


def _fetch_files(
    source: Source, folder: Path, files: list[str], checksums: Mapping[str, str], timeout: float
) -> None:
    for file in files:
        url = source.url.format(name=file)
        with _temporary_path(folder, file) as raw, _temporary_path(folder, file) as plain:
            _fetch(url, raw, timeout=timeout, desc=file)
            if source.archive == "gzip":
                with gzip.open(raw, "rb") as src, open(plain, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            _install(plain if source.archive == "gzip" else raw, folder / file, checksums[file], url=url)


def _fetch_from_zip(
    source: Source, folder: Path, files: list[str], checksums: Mapping[str, str], timeout: float
) -> None:
    absent = [file for file in files if file not in source.members]
    if absent:
        raise KeyError(f"the zip source names no archive member for {absent}")
    with _temporary_path(folder, "archive") as archive:
        _fetch(source.url, archive, timeout=timeout, desc=Path(source.url).name)
        with zipfile.ZipFile(archive) as bundle:
            for file in files:
                with _temporary_path(folder, file) as tmp:
                    with bundle.open(source.members[file]) as src, open(tmp, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    _install(tmp, folder / file, checksums[file], url=f"{source.url}!{source.members[file]}")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--data-dir`` to a benchmark's argument parser (pass ``args.data_dir`` to the loaders)."""
    parser.add_argument(
        "--data-dir",
        default=None,
        help=f"directory containing wikitext-2/ and multi30k/ (e.g. ../shared/data); default ${DATA_ENV}, "
        f"else the cache {default_cache_dir()} (downloaded when missing)",
    )


# ---------------------------------------------------------------------------------------------------------
# vocabulary


class Vocabulary:
    """Word-level token <-> id map; ids 0, 1, 2 are ``<pad>``, ``<unk>``, ``<eos>``.

    Built words follow by descending train count, ties in alphabetical order, so the ids depend only on
    the counts, never on dict or file order. Unknown words encode to ``<unk>`` (WikiText-2 also contains
    the literal token ``<unk>``, which maps there too).
    """

    PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
    SPECIALS = (PAD, UNK, EOS)

    def __init__(self, tokens: Sequence[str]) -> None:
        """Args: tokens: every token in id order, starting with :attr:`SPECIALS`; no duplicates."""
        tokens = tuple(tokens)
        if tokens[: len(self.SPECIALS)] != self.SPECIALS:
            raise ValueError(f"tokens must start with {self.SPECIALS}, got {tokens[:3]}")
        self._ids = {token: index for index, token in enumerate(tokens)}
        if len(self._ids) != len(tokens):
            raise ValueError("tokens contains duplicates")
        self._tokens = tokens

    @classmethod
    def build(
        cls, sequences: Iterable[Sequence[str]], *, max_size: int | None = None, min_count: int = 1
    ) -> Vocabulary:
        """Build from token sequences (the train split).

        Args:
            sequences: token lists; the special tokens in them are not counted.
            max_size: at most this many entries, the 3 specials included; ``None`` for no limit.
            min_count: keep words seen at least this often (``>= 1``).
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size < len(cls.SPECIALS):
            raise ValueError(f"max_size must be >= {len(cls.SPECIALS)} (the special tokens), got {max_size}")
        counts = Counter(token for sequence in sequences for token in sequence)
        words = sorted(
            (word for word, count in counts.items() if count >= min_count and word not in cls.SPECIALS),
            key=lambda word: (-counts[word], word),
        )
        limit = None if max_size is None else max_size - len(cls.SPECIALS)
        return cls(cls.SPECIALS + tuple(words[:limit]))

    def __len__(self) -> int:
        return len(self._tokens)

    def __contains__(self, token: object) -> bool:
        return token in self._ids

    @property
    def tokens(self) -> tuple[str, ...]:
        """All tokens in id order (what :meth:`__init__` takes back)."""
        return self._tokens

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def unk_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    def encode(self, tokens: Iterable[str]) -> list[int]:
        """Token ids; unknown tokens become :attr:`unk_id`."""
        return [self._ids.get(token, 1) for token in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens for ``ids`` (ints or a 1-D tensor)."""
        return [self._tokens[index] for index in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]


# ---------------------------------------------------------------------------------------------------------
# WikiText-2 and Multi30k

WIKITEXT2_SPLITS = ("train", "valid", "test")
SENTENCE_END = frozenset({".", "!", "?"})


def split_sentences(tokens: Sequence[str]) -> list[list[str]]:
    """Split a tokenised WikiText paragraph after each ``.``, ``!`` or ``?`` token.

    Decimal points are ``@.@`` and abbreviations keep their dot (``H.``), so a lone ``.`` ends a
    sentence. A ``"`` right after the end closes a quote opened in the sentence and stays with it.
    Tokens after the last end form a final sentence.
    """
    sentences, start, quotes = [], 0, 0
    for index, token in enumerate(tokens):
        if index < start:  # a closing quote already taken by the previous sentence
            continue
        quotes += token == '"'
        if token in SENTENCE_END:
            end = index + 1
            if quotes % 2 == 1 and end < len(tokens) and tokens[end] == '"':
                end += 1
            sentences.append(list(tokens[start:end]))
            start, quotes = end, 0
    if start < len(tokens):
        sentences.append(list(tokens[start:]))
    return sentences


def wikitext_sequences(
    lines: Iterable[str], *, unit: Literal["sentence", "line"] = "sentence"
) -> list[list[str]]:
    """Token sequences from raw WikiText lines, each ending in ``<eos>``.

    Empty lines and section headings (`` = Title = ``, `` = = Sub = = ``) are skipped. ``unit="line"``
    keeps each paragraph whole; ``"sentence"`` splits it with :func:`split_sentences`.
    """
    if unit not in ("sentence", "line"):
        raise ValueError(f"unit must be 'sentence' or 'line', got {unit!r}")
    sequences = []
    for line in lines:
        tokens = line.split()
        if not tokens or (tokens[0] == "=" and tokens[-1] == "="):
            continue
        pieces = split_sentences(tokens) if unit == "sentence" else [tokens]
        sequences.extend(piece + [Vocabulary.EOS] for piece in pieces)
    return sequences


def _read_lines(path: Path, max_lines: int | None) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return list(itertools.islice(handle, max_lines))


def load_wikitext(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    unit: Literal["sentence", "line"] = "sentence",
    max_lines: int | None = None,
    splits: Sequence[str] = WIKITEXT2_SPLITS,
) -> dict[str, list[list[str]]]:
    """WikiText-2 (tokenised, word level) as token sequences per split, each ending in ``<eos>``.

    Sequences are sentences by default: the non-termination setup this library reproduces (Welleck et
    al. 2020, "Consistency of a recurrent language model with respect to incomplete decoding") decodes
    sentence-level WikiText-2, so 10 context tokens leave a reference of sentence length (sentences
    average 27 tokens with eos) and ``r_L`` measures a model that should stop within a sentence.
    ``unit="line"`` gives whole paragraphs (115 tokens on average, up to 700) as in the NMST code
    (Choi et al. 2023). Words that occur only in headings (46 in train) are then unknown to a vocabulary
    built from these sequences.

    Args:
        data_dir: directory containing ``wikitext-2/``; see :func:`locate_dataset` for the fallbacks.
        unit: ``"sentence"`` or ``"line"`` (see :func:`wikitext_sequences`).
        max_lines: read at most this many raw lines per split (empty lines and headings included).
        splits: which of ``"train"``, ``"valid"``, ``"test"`` to load.
    """
    bad = [split for split in splits if split not in WIKITEXT2_SPLITS]
    if bad or not splits:
        raise ValueError(f"splits must be a non-empty subset of {WIKITEXT2_SPLITS}, got {tuple(splits)}")
    if max_lines is not None and max_lines < 1:
        raise ValueError(f"max_lines must be >= 1 or None, got {max_lines}")
    files = [f"{split}.txt" for split in splits]
    folder = locate_dataset(
        "wikitext-2", files, WIKITEXT2_SHA256, data_dir=data_dir, sources=WIKITEXT2_SOURCES
    )
    return {
        split: wikitext_sequences(_read_lines(folder / file, max_lines), unit=unit)
        for split, file in zip(splits, files)
    }


def load_multi30k(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    split: str = "train",
    max_lines: int | None = None,
) -> tuple[list[str], list[str]]:
    """Multi30k German -> English: ``(german, english)`` raw sentences of one split, aligned.

    Args:
        data_dir: directory containing ``multi30k/``; see :func:`locate_dataset` for the fallbacks.
        split: ``"train"``, ``"val"``, ``"test_2016_flickr"`` (the usual test set), ``"test_2017_flickr"``,
            ``"test_2017_mscoco"`` or ``"test_2018_flickr"``.
        max_lines: read at most this many lines.
    """
    files = [f"{split}.de", f"{split}.en"]
    if any(file not in MULTI30K_SHA256 for file in files):
        splits = sorted({file.rsplit(".", 1)[0] for file in MULTI30K_SHA256})
        raise ValueError(f"split must be one of {splits}, got {split!r}")
    folder = locate_dataset("multi30k", files, MULTI30K_SHA256, data_dir=data_dir, sources=MULTI30K_SOURCES)
    german, english = (
        [line.rstrip("\n") for line in _read_lines(folder / file, max_lines)] for file in files
    )
    if len(german) != len(english):
        raise ValueError(f"multi30k {split}: {len(german)} German lines but {len(english)} English lines")
    return german, english


# ---------------------------------------------------------------------------------------------------------
# contexts and batches


def split_context(
    sequences: Sequence[Sequence[T]], *, context_len: int = 10
) -> tuple[list[list[T]], list[list[T]]]:
    """Split sequences into contexts (the first ``context_len`` tokens) and reference continuations.

    Sequences shorter than ``context_len + 1`` are dropped, so every reference holds at least the final
    eos and no context contains it. Works on tokens or ids.

    Returns:
        ``(contexts, references)``, aligned lists.
    """
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")
    kept = [list(sequence) for sequence in sequences if len(sequence) > context_len]
    return [s[:context_len] for s in kept], [s[context_len:] for s in kept]


def pad_context(sequences: Sequence[Sequence[T]], *, context_len: int, pad: T) -> list[list[T]]:
    """Left-pad sequences shorter than ``context_len + 1`` with ``pad`` to exactly that length.

    The self-terminating papers' protocol: a sentence shorter than the context keeps its place in the data,
    padded on the left with a context-pad token, so its context is ``context_len`` tokens and its reference
    continuation is the final eos alone. Longer sequences are returned unchanged (as lists).
    """
    if context_len < 1:
        raise ValueError(f"context_len must be >= 1, got {context_len}")
    need = context_len + 1
    return [[pad] * (need - len(s)) + list(s) if len(s) < need else list(s) for s in sequences]


class PromptBatch(NamedTuple):
    """Left-padded prompts, as :meth:`decoding.protocol.StepModel.prefill` takes them."""

    input_ids: torch.Tensor  # [B, T] long, padding on the left
    attention_mask: torch.Tensor  # [B, T] long, 1 on real tokens


def _check_rows(rows: Sequence[Sequence[int]], name: str) -> None:
    if not rows:
        raise ValueError(f"{name} is empty")
    empty = [index for index, row in enumerate(rows) if len(row) == 0]
    if empty:
        raise ValueError(f"{name}[{empty[0]}] is empty: every row needs at least one token")


def prompt_batch(prompts: Sequence[Sequence[int]], *, pad_id: int) -> PromptBatch:
    """Left-pad token-id prompts to one ``[B, T]`` batch (``T`` = longest prompt)."""
    _check_rows(prompts, "prompts")
    return PromptBatch(*pad_rows(prompts, pad_token_id=pad_id, side="left"))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m benchmarks.datasets [--data-dir D] [NAME ...]``: locate (download) datasets, print folders."""
    known = {
        "wikitext-2": (WIKITEXT2_SHA256, WIKITEXT2_SOURCES),
        "multi30k": (MULTI30K_SHA256, MULTI30K_SOURCES),
    }
    parser = argparse.ArgumentParser(description="Locate or download the benchmark data and verify it.")
    add_data_arguments(parser)
    parser.add_argument(
        "names", nargs="*", metavar="NAME", help=f"datasets among {list(known)} (default: all)"
    )
    args = parser.parse_args(argv)
    for name in args.names or list(known):
        if name not in known:
            parser.error(f"unknown dataset {name!r}; choose from {list(known)}")
        checksums, sources = known[name]
        print(locate_dataset(name, list(checksums), checksums, data_dir=args.data_dir, sources=sources))


if __name__ == "__main__":
    main()
