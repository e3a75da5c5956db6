"""Seq2seq training plumbing: data checks, tokenizer + model folders, costs, the loop's early stopping and
checkpoint resume, and MGS candidate scoring through the library's generate on a tiny BART."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from training.checkpoint import atomic_save
from training.costs import Decoded, get_cost
from training.parallel_text import encode_parallel, epoch_batches, make_batch, read_parallel
from training.decode import Hypotheses, decode
from training.evaluate import score_translations, translate
from training.loop import LoopConfig, load_best, train
from training.losses import mle_loss, teacher_forced_logits
from training.mgs import MGSConfig, MGSStep, candidate_costs
from training.seq2seq import Seq2SeqSize, build_seq2seq, load_seq2seq, save_seq2seq
from training.steps import MLEStep
from training.task import Seq2SeqTask
from training.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"
TINY = Seq2SeqSize(d_model=16, layers=1, heads=2, ffn_dim=32, dropout=0.1)


@pytest.fixture(scope="module")
def corpus():
    text = read_parallel(DATA / "train.de", DATA / "train.en").head(120)
    tokenizer = train_tokenizer(list(text.sources + text.targets), vocab_size=200)
    return text, tokenizer, encode_parallel(text, tokenizer, max_length=24)


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_read_parallel_rejects_empty_and_misaligned_files(tmp_path):
    good = write(tmp_path / "a.de", ["eins", "zwei"])
    with pytest.raises(ValueError, match="empty"):
        read_parallel(good, write(tmp_path / "empty.en", []))
    with pytest.raises(ValueError, match="misaligned.*2 lines.*3"):
        read_parallel(good, write(tmp_path / "three.en", ["one", "two", "three"]))
    with pytest.raises(ValueError, match="line 2 is blank"):
        read_parallel(good, write(tmp_path / "blank.en", ["one", " "]))
    with pytest.raises(FileNotFoundError):
        read_parallel(good, tmp_path / "missing.en")
    pairs = read_parallel(good, write(tmp_path / "b.en", ["one", "two"]))
    assert pairs.sources == ("eins", "zwei") and pairs.targets == ("one", "two")


def test_encoding_and_batches(corpus):
    text, tokenizer, data = corpus
    assert all(row[-1] == tokenizer.eos_token_id and len(row) <= 24 for row in data.target_ids)
    batches = epoch_batches(data, batch_size=16, epoch=3, seed=7)
    assert sorted(i for b in batches for i in b) == list(range(len(text)))
    assert batches == epoch_batches(data, batch_size=16, epoch=3, seed=7)
    assert batches != epoch_batches(data, batch_size=16, epoch=4, seed=7)
    batch = make_batch(data, batches[0])
    assert batch.source_ids.shape == batch.source_mask.shape and len(batch.references) == len(batches[0])
    assert batch.references[0] == text.targets[batches[0][0]]


def test_tokenizer_round_trip_and_model_folder(corpus, tmp_path):
    text, tokenizer, _ = corpus
    ids = tokenizer(text.targets[0], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text.targets[0]
    model = build_seq2seq(tokenizer, TINY)
    save_seq2seq(model, tokenizer, tmp_path / "m")
    loaded, loaded_tokenizer = load_seq2seq(tmp_path / "m")
    assert loaded_tokenizer(text.targets[0], add_special_tokens=False)["input_ids"] == ids
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_loading_another_architecture_fails_clearly(corpus, tmp_path):
    _, tokenizer, data = corpus
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=8, n_layer=1, n_head=2)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="gpt2.*expected an encoder-decoder"):
        load_seq2seq(tmp_path / "gpt2")
    small, wide = build_seq2seq(tokenizer, TINY), build_seq2seq(tokenizer, Seq2SeqSize(d_model=32, layers=1,
                                                                                         heads=2, ffn_dim=32))
    config = LoopConfig(batch_size=16, max_updates=1, progress=False)
    train(small, MLEStep(Seq2SeqTask(tokenizer)), data, torch.optim.AdamW(small.parameters()), config=config,
          checkpoint_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="another architecture"):
        train(wide, MLEStep(Seq2SeqTask(tokenizer)), data, torch.optim.AdamW(wide.parameters()),
              config=config, checkpoint_dir=tmp_path / "run")


def test_mle_loss_with_label_smoothing_by_hand(corpus):
    _, tokenizer, data = corpus
    model = build_seq2seq(tokenizer, TINY).eval()
    batch = make_batch(data, [0, 1, 2])
    logits = teacher_forced_logits(model, batch.source_ids, batch.source_mask, batch.target_ids,
                                   batch.target_mask)
    logp = torch.log_softmax(logits, -1)
    eps, total, count = 0.1, 0.0, 0
    for b in range(3):
        for t in range(int(batch.target_mask[b].sum())):
            token = batch.target_ids[b, t]
            total += -(1 - eps) * logp[b, t, token] - eps * logp[b, t].mean()
            count += 1
    got = mle_loss(model, batch.source_ids, batch.source_mask, batch.target_ids, batch.target_mask,
                   label_smoothing=eps)
    assert got.detach().item() == pytest.approx(float(total / count), rel=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        mle_loss(model, batch.source_ids, batch.source_mask, batch.target_ids, batch.target_mask,
                 label_smoothing=1.0)


def decoded(texts, refs, lengths, terminated, ref_lengths, tokens=None):
    tokens = torch.tensor(tokens) if tokens is not None else torch.zeros(len(texts), max(lengths), dtype=torch.long)
    return Decoded(Hypotheses(tokens, torch.tensor(lengths), torch.tensor(terminated)), texts, refs,
                   torch.tensor(ref_lengths))


def test_costs():
    sample = decoded(["a man rides a red bike .", "completely unrelated words here"],
                     ["a man rides a red bike .", "two dogs play in the snow ."], [6, 12], [True, False], [6, 6],
                     tokens=[[5, 6, 7, 8, 9, 2] + [0] * 6, [5, 6, 7, 8] * 3])
    assert get_cost("bleu")(sample).tolist() == pytest.approx([0.0, 1.0])
    assert get_cost("nontermination")(sample).tolist() == [0.0, 1.0]
    assert get_cost("length_ratio")(sample).tolist() == pytest.approx([0.0, 1.0])
    assert get_cost("repetition")(sample).tolist() == pytest.approx([0.0, 1 - 4 / 9])
    with pytest.raises(ValueError, match="unknown cost 'blue'.*bleu"):
        get_cost("blue")
    with pytest.raises(ValueError, match="unknown cost"):
        Seq2SeqTask(tokenizer=None, cost="chrf")


def test_decode_returns_generated_part_with_flags(corpus):
    _, tokenizer, data = corpus
    model = build_seq2seq(tokenizer, TINY).eval()
    batch = make_batch(data, [0, 1, 2, 3])
    hyps = decode(model, batch.source_ids, batch.source_mask, max_new_tokens=6,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    reference = model.generate(batch.source_ids, attention_mask=batch.source_mask, max_new_tokens=6,
                               do_sample=False, num_beams=1, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
    for row in range(4):
        n = int(hyps.lengths[row])
        assert hyps.tokens[row, :n].tolist() == reference[row, 1:1 + n].tolist()
        assert bool(hyps.terminated[row]) == (tokenizer.eos_token_id in hyps.tokens[row].tolist())


def test_mgs_candidates_through_generate_leave_base_untouched(corpus):
    _, tokenizer, data = corpus
    model = build_seq2seq(tokenizer, TINY)
    task = Seq2SeqTask(tokenizer, cost="bleu")
    batch = make_batch(data, list(range(4)))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    base_cost = task.decode_costs(model, batch, generator=None).mean()
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    loud = {n: torch.randn_like(p) * 5 for n, p in model.named_parameters()}
    costs = candidate_costs(model, task, batch, [zero, loud])
    assert costs[0].item() == pytest.approx(base_cost.item())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for importance in ("reference", "exact"):
        logs = MGSStep(task, MGSConfig(num_candidates=2, importance=importance))(model, batch, optimizer)
        assert 1.0 <= logs["ess"] <= 2.0 + 1e-9 and 0.0 <= logs["cost_before"] <= 1.0


class Interrupt(RuntimeError):
    pass


class DiesAfter:
    """An update step that is 'killed' (raises) on its n-th call."""

    def __init__(self, step, calls: int):
        self.step, self.left = step, calls

    def __call__(self, *args, **kwargs):
        self.left -= 1
        if self.left < 0:
            raise Interrupt
        return self.step(*args, **kwargs)

    def state_dict(self):
        return self.step.state_dict()

    def load_state_dict(self, state):
        self.step.load_state_dict(state)


def run(tokenizer, data, directory, *, step_wrapper=None, validate=None, max_updates=12):
    torch.manual_seed(0)
    model = build_seq2seq(tokenizer, TINY, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: min(1.0, (u + 1) / 5))
    step = MLEStep(Seq2SeqTask(tokenizer, label_smoothing=0.1))
    if step_wrapper is not None:
        step = step_wrapper(step)
    config = LoopConfig(batch_size=32, max_updates=max_updates, validate_every=4, checkpoint_every=3,
                        progress=False)
    result = train(model, step, data, optimizer, config=config, scheduler=scheduler, checkpoint_dir=directory,
                   validate=validate or (lambda m: -float(sum(p.abs().sum() for p in m.parameters()))))
    return model, optimizer, result


def test_resume_after_a_kill_matches_an_uninterrupted_run(corpus, tmp_path):
    _, tokenizer, data = corpus
    model, optimizer, result = run(tokenizer, data, tmp_path / "straight")
    with pytest.raises(Interrupt):
        run(tokenizer, data, tmp_path / "killed", step_wrapper=lambda s: DiesAfter(s, 7))
    torch.manual_seed(123)  # the resumed process starts with another global random state
    resumed, resumed_optimizer, resumed_result = run(tokenizer, data, tmp_path / "killed")
    assert resumed_result.updates == result.updates == 12 and resumed_result.epoch == result.epoch
    for (name, a), (_, b) in zip(model.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert [h["score"] for h in resumed_result.history] == [h["score"] for h in result.history]
    assert optimizer.state_dict()["state"][0]["step"] == resumed_optimizer.state_dict()["state"][0]["step"]
    again, _, again_result = run(tokenizer, data, tmp_path / "killed")   # finished: nothing redone
    assert again_result.updates == 12 and torch.equal(next(again.parameters()), next(resumed.parameters()))


def test_early_stopping_keeps_the_best_weights(corpus, tmp_path):
    _, tokenizer, data = corpus
    scores = iter([5.0, 3.0, 2.0, 1.0, 0.0])
    config = LoopConfig(batch_size=32, max_updates=100, validate_every=2, patience=2, progress=False)
    model = build_seq2seq(tokenizer, TINY, seed=0)
    first_weights = {}

    def validate(m):
        score = next(scores)
        if not first_weights:
            first_weights.update({n: t.clone() for n, t in m.state_dict().items()})
        return score

    result = train(model, MLEStep(Seq2SeqTask(tokenizer)), data, torch.optim.AdamW(model.parameters()),
                   config=config, validate=validate, checkpoint_dir=tmp_path)
    assert result.stop_reason == "patience" and result.updates == 6 and result.best_update == 2
    assert load_best(model, tmp_path)
    assert all(torch.equal(t, first_weights[n]) for n, t in model.state_dict().items())


def test_atomic_save_leaves_no_partial_file(tmp_path):
    atomic_save({"a": torch.ones(2)}, tmp_path / "x.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["x.pt"]
    assert torch.equal(torch.load(tmp_path / "x.pt")["a"], torch.ones(2))


def test_translate_and_score(corpus):
    text, tokenizer, _ = corpus
    model = build_seq2seq(tokenizer, TINY)
    translations = translate(model, tokenizer, text.sources[:5], num_beams=2, length_cap=8)
    scores = score_translations(translations, text.targets[:5])
    assert len(translations.texts) == 5 and all(n <= 8 for n in translations.lengths)
    assert 0.0 <= scores.nontermination <= 1.0 and scores.bleu_signature.startswith("nrefs:1")
    perfect = score_translations(type(translations)(list(text.targets[:5]), [True] * 5, [3] * 5),
                                 text.targets[:5])
    assert perfect.bleu == pytest.approx(100.0) and perfect.nontermination == 0.0
    with pytest.raises(ValueError, match="references"):
        score_translations(translations, text.targets[:4])


def test_per_row_cap_cuts_each_row_at_its_own_cap(corpus):
    text, tokenizer, _ = corpus
    model = build_seq2seq(tokenizer, TINY)
    eos, filler = tokenizer.eos_token_id, 7

    def wanted_length(source_row: list[int]) -> int:
        """The scripted 'translation' of a source of n tokens (eos included) has n - 1, n or n + 1 tokens."""
        n = len(source_row)
        return n + source_row[0] % 3 - 1

    def scripted(model, input_ids, attention_mask=None, *, max_new_tokens, pad_token_id, **options):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            length = wanted_length(ids[: sum(mask)])
            body = ([filler] * (length - 1) + [eos])[:max_new_tokens]
            rows.append([0] + body + [pad_token_id] * (max_new_tokens - len(body)))
        return torch.tensor(rows)

    sources = [s for s in text.sources if len(tokenizer(s, add_special_tokens=False)["input_ids"]) < 50][:40]
    per_row = translate(model, tokenizer, sources, length_factor=1.0, length_slack=0, per_row_cap=True,
                        batch_size=8, generate_fn=scripted)
    per_batch = translate(model, tokenizer, sources, length_factor=1.0, length_slack=0, batch_size=8,
                          generate_fn=scripted)
    encoded = [tokenizer(s, add_special_tokens=False)["input_ids"] + [eos] for s in sources]
    wanted = [wanted_length(row) for row in encoded]
    caps = [len(row) for row in encoded]                         # 1.0 x source tokens (eos counted)
    assert per_row.terminated == [w <= c for w, c in zip(wanted, caps)]
    assert per_row.lengths == [min(w, c) for w, c in zip(wanted, caps)]
    assert 0 < sum(per_row.terminated) < len(sources)            # both kinds of rows occur
    # the per-batch cap (the batch's longest source) lets most long rows finish
    assert sum(per_batch.terminated) > sum(per_row.terminated)
    with pytest.raises(ValueError, match="length_factor"):
        translate(model, tokenizer, sources, length_factor=0.0)


def test_loop_config_needs_a_budget():
    with pytest.raises(ValueError, match="max_updates"):
        LoopConfig()
