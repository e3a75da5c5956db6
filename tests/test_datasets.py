"""benchmarks.datasets: locating, verifying and downloading files; tokenising; contexts; batches."""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import http.server
import shutil
import socket
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from benchmarks.common import CACHE_ENV
from benchmarks.datasets import (
    DATA_ENV,
    MULTI30K_SHA256,
    WIKITEXT2_SHA256,
    ChecksumError,
    DatasetNotFoundError,
    Source,
    Vocabulary,
    add_data_arguments,
    default_cache_dir,
    load_multi30k,
    load_wikitext,
    locate_dataset,
    prompt_batch,
    split_context,
    split_sentences,
    wikitext_sequences,
)

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
EOS = Vocabulary.EOS


@pytest.fixture(autouse=True)
def no_user_locations(monkeypatch, tmp_path):
    """No test reads $CONSISTENT_DECODING_DATA or writes to the real cache."""
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "default-cache"))


# ---------------------------------------------------------------------------------------------------------
# the real files


def test_real_files_pass_verification():
    folder = locate_dataset("wikitext-2", list(WIKITEXT2_SHA256), WIKITEXT2_SHA256, data_dir=SHARED_DATA)
    assert folder == SHARED_DATA / "wikitext-2"
    folder = locate_dataset("multi30k", list(MULTI30K_SHA256), MULTI30K_SHA256, data_dir=SHARED_DATA)
    assert sorted(p.name for p in folder.iterdir()) == sorted(MULTI30K_SHA256)


def test_environment_variable_locates_the_data(monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(SHARED_DATA))
    assert locate_dataset("wikitext-2", ["valid.txt"], WIKITEXT2_SHA256) == SHARED_DATA / "wikitext-2"


def test_tampered_copy_fails_and_names_the_file(tmp_path):
    folder = tmp_path / "wikitext-2"
    folder.mkdir()
    shutil.copyfile(SHARED_DATA / "wikitext-2" / "valid.txt", folder / "valid.txt")
    locate_dataset("wikitext-2", ["valid.txt"], WIKITEXT2_SHA256, data_dir=tmp_path)  # intact copy passes
    with open(folder / "valid.txt", "r+b") as handle:
        handle.seek(1000)
        byte = handle.read(1)
        handle.seek(1000)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(ChecksumError, match=r"valid\.txt has sha256 [0-9a-f]{64}, expected f0737ed3"):
        locate_dataset("wikitext-2", ["valid.txt"], WIKITEXT2_SHA256, data_dir=tmp_path)


def test_missing_files_in_data_dir_say_where_to_put_them(tmp_path):
    (tmp_path / "wikitext-2").mkdir()
    (tmp_path / "wikitext-2" / "test.txt").write_text("x")
    with pytest.raises(DatasetNotFoundError) as info:
        locate_dataset("wikitext-2", ["train.txt", "test.txt"], WIKITEXT2_SHA256, data_dir=tmp_path)
    message = str(info.value)
    assert "train.txt" in message and "test.txt" not in message.split("not found")[0]
    assert str(tmp_path / "wikitext-2") in message and "--data-dir" in message


def test_offline_cache_miss_says_where_to_put_the_files(tmp_path):
    cache = tmp_path / "cache"
    dead = Source(_dead_url() + "/{name}")
    with pytest.raises(DatasetNotFoundError) as info:
        locate_dataset("wikitext-2", ["valid.txt"], WIKITEXT2_SHA256, cache_dir=cache, sources=[dead])
    message = str(info.value)
    assert "valid.txt" in message and str(cache / "wikitext-2") in message
    assert "--data-dir" in message and DATA_ENV in message and "127.0.0.1" in message
    with pytest.raises(DatasetNotFoundError, match="downloading is off"):
        locate_dataset("wikitext-2", ["valid.txt"], WIKITEXT2_SHA256, cache_dir=cache, download=False)


def test_default_cache_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c" / "data"
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir() == Path.home() / ".cache" / "consistent-decoding" / "data"


def test_bad_locate_arguments():
    with pytest.raises(ValueError, match="no sha256"):
        locate_dataset("wikitext-2", ["other.txt"], WIKITEXT2_SHA256, data_dir=SHARED_DATA)
    with pytest.raises(ValueError, match="files is empty"):
        locate_dataset("wikitext-2", [], WIKITEXT2_SHA256, data_dir=SHARED_DATA)


def test_data_dir_argument():
    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    assert parser.parse_args(["--data-dir", "x"]).data_dir == "x"
    assert parser.parse_args([]).data_dir is None


# ---------------------------------------------------------------------------------------------------------
# downloads from a local HTTP server

FAKE = {"train.txt": b" = T = \n a b c .\n", "valid.txt": b" d e .\n", "test.txt": b" f g h .\n"}
FAKE_SHA256 = {name: hashlib.sha256(data).hexdigest() for name, data in FAKE.items()}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # record the request path, print nothing
        self.server.requested.append(self.path)


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving ``tmp_path/served``; yields (folder, base URL, requested paths)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.requested = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}", httpd.requested
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _dead_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _fetch_fake(cache: Path, *sources: Source, name: str = "wikitext-2") -> Path:
    return locate_dataset(name, list(FAKE), FAKE_SHA256, cache_dir=cache, sources=sources)


def _assert_cached(folder: Path) -> None:
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == FAKE  # no .part files left behind


def test_download_plain_files(server, tmp_path):
    root, url, requested = server
    for name, data in FAKE.items():
        (root / name).write_bytes(data)
    cache = tmp_path / "cache"
    folder = _fetch_fake(cache, Source(url + "/{name}"))
    assert folder == cache / "wikitext-2"
    _assert_cached(folder)
    assert sorted(requested) == ["/test.txt", "/train.txt", "/valid.txt"]
    # now cached: found again without any source
    assert locate_dataset("wikitext-2", list(FAKE), FAKE_SHA256, cache_dir=cache) == folder


def test_download_only_what_is_missing_and_fall_back_to_the_next_source(server, tmp_path):
    root, url, requested = server
    (root / "valid.txt").write_bytes(FAKE["valid.txt"])
    (root / "test.txt").write_bytes(FAKE["test.txt"])
    folder = tmp_path / "cache" / "wikitext-2"
    folder.mkdir(parents=True)
    (folder / "train.txt").write_bytes(FAKE["train.txt"])  # already cached, not on the server
    _fetch_fake(tmp_path / "cache", Source(_dead_url() + "/{name}"), Source(url + "/{name}"))
    _assert_cached(folder)
    assert sorted(requested) == ["/test.txt", "/valid.txt"]


def test_download_from_zip(server, tmp_path):
    root, url, _ = server
    members = {name: f"wikitext-2/wiki.{name.split('.')[0]}.tokens" for name in FAKE}
    with zipfile.ZipFile(root / "wikitext-2-v1.zip", "w") as bundle:
        for name, data in FAKE.items():
            bundle.writestr(members[name], data)
    source = Source(url + "/wikitext-2-v1.zip", archive="zip", members=members)
    folder = _fetch_fake(tmp_path / "cache", source)
    _assert_cached(folder)


def test_download_gzip_files(server, tmp_path):
    root, url, _ = server
    for name, data in FAKE.items():
        (root / f"{name}.gz").write_bytes(gzip.compress(data))
    source = Source(url + "/{name}.gz", archive="gzip")
    folder = _fetch_fake(tmp_path / "cache", source, name="multi30k")
    _assert_cached(folder)


def test_downloaded_file_with_wrong_checksum_is_not_installed(server, tmp_path):
    root, url, _ = server
    (root / "valid.txt").write_bytes(b" tampered .\n")
    cache = tmp_path / "cache"
    source = Source(url + "/{name}")
    with pytest.raises(ChecksumError, match=r"valid\.txt downloaded from http://127\.0\.0\.1:\d+/valid\.txt has sha"):
        locate_dataset("wikitext-2", ["valid.txt"], FAKE_SHA256, cache_dir=cache, sources=[source])
    assert list((cache / "wikitext-2").iterdir()) == []


# ---------------------------------------------------------------------------------------------------------
# tokenisation and vocabulary


def test_split_sentences():
    tokens = 'He met H. Smith , 2 @.@ 5 km away . " Go ! " she said . Why ? no end'.split()
    assert split_sentences(tokens) == [
        "He met H. Smith , 2 @.@ 5 km away .".split(),
        '" Go ! "'.split(),  # the closing quote stays with its sentence
        "she said .".split(),
        "Why ?".split(),
        "no end".split(),
    ]
    assert split_sentences('a . " b'.split()) == [["a", "."], ['"', "b"]]  # an opening quote starts the next


def test_wikitext_sequences_skip_headings_and_empty_lines():
    lines = [" \n", " = Title = \n", " = = Sub = = \n", " A b . C d .\n", " E f\n"]
    assert wikitext_sequences(lines, unit="line") == [["A", "b", ".", "C", "d", ".", EOS], ["E", "f", EOS]]
    sentences = [["A", "b", ".", EOS], ["C", "d", ".", EOS], ["E", "f", EOS]]
    assert wikitext_sequences(lines, unit="sentence") == sentences
    with pytest.raises(ValueError, match="unit must be"):
        wikitext_sequences(lines, unit="paragraph")


def test_load_wikitext_real_lines_and_sentences_agree():
    raw = (SHARED_DATA / "wikitext-2" / "valid.txt").read_text(encoding="utf-8").splitlines()[:300]
    paragraphs = [line.split() for line in raw if line.strip() and not line.strip().startswith("= ")]
    lines = load_wikitext(SHARED_DATA, unit="line", max_lines=300, splits=("valid",))["valid"]
    sentences = load_wikitext(SHARED_DATA, unit="sentence", max_lines=300, splits=("valid",))["valid"]
    assert [s[:-1] for s in lines] == paragraphs
    assert len(sentences) > 2 * len(lines)
    for sequences in (lines, sentences):
        assert all(s[-1] == EOS and EOS not in s[:-1] and len(s) > 1 for s in sequences)
    # splitting into sentences loses and reorders nothing
    assert [t for s in sentences for t in s[:-1]] == [t for s in lines for t in s[:-1]]
    assert sum(s[-2] in {".", "!", "?", '"'} for s in sentences) > 0.9 * len(sentences)


def test_load_wikitext_rejects_bad_arguments():
    with pytest.raises(ValueError, match="splits must be"):
        load_wikitext(SHARED_DATA, splits=("dev",))
    with pytest.raises(ValueError, match="max_lines"):
        load_wikitext(SHARED_DATA, max_lines=0)


def test_load_multi30k_real():
    german, english = load_multi30k(SHARED_DATA, split="test_2016_flickr", max_lines=50)
    assert len(german) == len(english) == 50
    assert all(line and not line.endswith("\n") for line in german + english)
    assert german[0] != english[0]
    with pytest.raises(ValueError, match="split must be one of"):
        load_multi30k(SHARED_DATA, split="dev")


def test_vocabulary_order_and_encoding():
    vocab = Vocabulary.build([["b", "a", "c", EOS], ["c", "a", "<unk>", EOS], ["c", "d"]])
    assert vocab.tokens == ("<pad>", "<unk>", "<eos>", "c", "a", "b", "d")  # by count, ties alphabetical
    assert (vocab.pad_id, vocab.unk_id, vocab.eos_id) == (0, 1, 2)
    assert vocab.encode(["a", "zzz", "<unk>", EOS]) == [4, 1, 1, 2]
    assert vocab.decode(torch.tensor([3, 2])) == ["c", EOS]
    assert Vocabulary.build([["a", "b", "a"]], min_count=2).tokens == Vocabulary.SPECIALS + ("a",)
    assert len(Vocabulary.build([["c", "c", "a", "b"]], max_size=4)) == 4
    assert Vocabulary(vocab.tokens).encode(["d"]) == [6]
    with pytest.raises(ValueError, match="max_size"):
        Vocabulary.build([], max_size=2)
    with pytest.raises(ValueError, match="start with"):
        Vocabulary(["a", "<pad>", "<unk>", "<eos>"])
    with pytest.raises(ValueError, match="duplicates"):
        Vocabulary(Vocabulary.SPECIALS + ("a", "a"))


def test_vocabulary_on_real_data_is_deterministic():
    train = load_wikitext(SHARED_DATA, max_lines=200, splits=("train",))["train"]
    vocab = Vocabulary.build(train)
    assert vocab.tokens == Vocabulary.build(list(reversed(train))).tokens
    assert vocab.tokens[3] == "the"
    encoded = vocab.encode(train[0])
    assert vocab.decode(encoded) == train[0] and encoded[-1] == vocab.eos_id


# ---------------------------------------------------------------------------------------------------------
# contexts and batches


def test_split_context():
    sequences = [list("abcdefghijkl") + [EOS], list("abcdefghij") + [EOS], list("abcdefghij")]
    contexts, references = split_context(sequences, context_len=10)
    assert contexts == [list("abcdefghij")] * 2
    assert references == [["k", "l", EOS], [EOS]]  # the third (10 tokens, no continuation) is dropped
    with pytest.raises(ValueError, match="context_len must be >= 1"):
        split_context(sequences, context_len=0)


def test_split_context_on_real_data():
    valid = load_wikitext(SHARED_DATA, max_lines=200, splits=("valid",))["valid"]
    contexts, references = split_context(valid, context_len=10)
    assert len(contexts) == len(references) == sum(len(s) >= 11 for s in valid) > 0
    assert all(len(c) == 10 and EOS not in c for c in contexts)
    assert all(r[-1] == EOS for r in references)


def test_prompt_batch_left_pads():
    batch = prompt_batch([[5, 6, 7], [8]], pad_id=0)
    assert torch.equal(batch.input_ids, torch.tensor([[5, 6, 7], [0, 0, 8]]))
    assert torch.equal(batch.attention_mask, torch.tensor([[1, 1, 1], [0, 0, 1]]))
    assert batch.input_ids.dtype == batch.attention_mask.dtype == torch.long
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        prompt_batch([[5], []], pad_id=0)
    with pytest.raises(ValueError, match="prompts is empty"):
        prompt_batch([], pad_id=0)
