"""Device audit: the library creates every tensor on the model's (or input's) device.

Without a GPU, the check makes the *default* device differ from the model's: the model and its inputs stay
on the CPU while ``torch.device("meta")`` is the default, so a factory call without ``device=`` (a
``torch.zeros(n)``, ``torch.arange(n)``, ``torch.tensor(values)``...) lands on ``meta``. A meta tensor meeting
a CPU tensor raises, and :class:`_NoMetaOutputs` fails at the first operation that returns one anyway.
Host-side work that is meant to run on the CPU (batch collation, the data order) says ``device="cpu"``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from benchmarks.nontermination_cells import DECODERS, decode_cell
from benchmarks.smollm2 import Head, SmolLM2Bench, SmolSettings
from benchmarks.smollm2_frontier import ContinuationSettings, mgs_update
from decoding.generate import generate
from decoding.models import rnn_lm
from training.parallel_text import encode_parallel, read_parallel
from training.evaluate import translate
from training.lm import collate_lm_batch, model_loss, train_lm
from training.loop import LoopConfig, train
from training.mgs import MGSConfig, MGSStep
from training.seq2seq import Seq2SeqSize, build_seq2seq
from training.prompt_costs import Prompts, PromptTask, PromptTaskBatch, mean_cost
from training.steps import MRTStep, PGStep
from training.task import Seq2SeqTask
from training.tokenizer import train_tokenizer

from .tiny_models import EOS, PAD, VOCAB, left_padded_prompts, tiny_model, tiny_smol_data, tiny_smollm2


class _NoMetaOutputs(TorchFunctionMode):
    """Fails at the first torch operation that returns a tensor on the ``meta`` device."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor) and leaf.device.type == "meta":
                raise AssertionError(f"{getattr(func, '__name__', func)} made a tensor off the model's device")
        return out


@contextlib.contextmanager
def _default_device_elsewhere():
    """Checker below, ``meta`` as the default device above it (the default device is applied first)."""
    with _NoMetaOutputs(), torch.device("meta"):
        yield


def test_the_check_catches_a_factory_call_without_device():
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises((AssertionError, RuntimeError)), _default_device_elsewhere():
        ids.masked_fill(torch.arange(3)[None, :] >= 2, 0)
    with _default_device_elsewhere():  # the same with device= passes
        ids.masked_fill(torch.arange(3, device=ids.device)[None, :] >= 2, 0)


DECODES = {
    "greedy": {},
    "sample": {"do_sample": True, "top_k": 8, "top_p": 0.9},
    "consistent_sample": {"do_sample": True, "top_k": 8, "consistent": True},
    "beam": {"num_beams": 3, "num_return_sequences": 2},
    "refill": {"do_sample": True, "max_batch_size": 3},
}


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
@pytest.mark.parametrize("name", sorted(DECODES))
def test_generate_creates_no_tensor_off_the_models_device(kind, name):
    model = tiny_model(kind)
    ids, mask = left_padded_prompts(seed=1, batch=5, length=5)
    generator = torch.Generator().manual_seed(0)
    with _default_device_elsewhere():
        out = generate(model, ids, mask, max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD,
                       generator=generator, return_dict_in_generate=True, **DECODES[name])
    assert out.sequences.device == ids.device and out.sequences.shape[1] > 0


@pytest.mark.parametrize("head", ["st", "nmst"])
def test_self_terminating_lm_generates_and_trains_on_the_models_device(head):
    torch.manual_seed(0)
    model = rnn_lm(VOCAB, eos_token_id=EOS, pad_token_id=PAD, head=head, epsilon=1e-2, hidden_size=16)
    lines = [[int(t) for t in torch.randint(3, VOCAB, (n,))] + [EOS] for n in (4, 6, 5, 7)]
    batches = [collate_lm_batch(lines[:2], pad_token_id=PAD), collate_lm_batch(lines[2:], pad_token_id=PAD)]
    prompts = torch.randint(3, VOCAB, (3, 4))
    with _default_device_elsewhere():
        history = train_lm(model, batches, batches[:1], epochs=1, lr=1e-2, progress=False)
        out = generate(model.eval(), prompts, max_new_tokens=8, do_sample=True, eos_token_id=EOS,
                       pad_token_id=PAD, generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
    assert len(history.epochs) == 1 and out.sequences.shape[0] == 3


def test_mgs_step_creates_no_tensor_off_the_models_device():
    model = tiny_model("gpt2")
    lines = [[5, 6, 7, EOS], [8, 9, EOS], [10, 11, 12, 13, EOS]]
    batch = PromptTaskBatch(mle=collate_lm_batch(lines, pad_token_id=PAD),
                            prompts=Prompts(torch.tensor([[5, 6], [8, 9], [10, 11]]), torch.tensor([3, 2, 4])))
    task = PromptTask(loss=model_loss, eos_token_id=EOS, pad_token_id=PAD,
                      cost=mean_cost(["nontermination", "repetition", "length_ratio"]))
    step = MGSStep(task, MGSConfig(num_candidates=3, importance="exact"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.transformer.wte.weight.detach().clone()
    with _default_device_elsewhere():
        logs = step(model, batch, optimizer, generator=torch.Generator().manual_seed(0))
    assert 0.0 <= logs["cost_before"] <= 1.0
    assert not torch.equal(before, model.transformer.wte.weight)


MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


@pytest.mark.parametrize("method", ["mrt", "pg", "mgs"])
def test_seq2seq_training_loop_and_translation_stay_on_the_models_device(method):
    text = read_parallel(MULTI30K / "train.de", MULTI30K / "train.en").head(16)
    tokenizer = train_tokenizer(list(text.sources + text.targets), vocab_size=120)
    data = encode_parallel(text, tokenizer, max_length=12)
    model = build_seq2seq(tokenizer, Seq2SeqSize(d_model=16, layers=1, heads=2, ffn_dim=32), seed=0)
    task = Seq2SeqTask(tokenizer, cost="bleu", strategy="sample")
    step = {"mrt": MRTStep(task, mle_probability=0.0), "pg": PGStep(task, mle_probability=0.0),
            "mgs": MGSStep(task, MGSConfig(num_candidates=2))}[method]
    config = LoopConfig(batch_size=4, max_updates=2, seed=0, progress=False)
    with _default_device_elsewhere():
        result = train(model, step, data, torch.optim.SGD(model.parameters(), lr=0.1), config=config)
        translations = translate(model, tokenizer, list(text.sources[:3]), num_beams=2, per_row_cap=True)
    assert result.updates == 2 and len(translations.texts) == 3


def test_the_benchmarks_cell_decode_stays_on_the_models_device():
    torch.manual_seed(0)
    model = rnn_lm(VOCAB, eos_token_id=EOS, pad_token_id=PAD, head="nmst", epsilon=1e-2, hidden_size=16).eval()
    prompts = torch.randint(3, VOCAB, (4, 3))
    with _default_device_elsewhere():
        cell = decode_cell(model, prompts, model_name="rnn", decoder=DECODERS["consistent-top-k-2"], eos_token_id=EOS,
                           pad_token_id=PAD, max_new_tokens=6, reference_lengths=[3, 4, 5, 6], sample_sets=2,
                           seed=0, batch_size=3, progress=False)
    assert cell.prompts == 4 and cell.sample_sets == 2


def test_the_smollm2_bench_fine_tunes_scores_and_runs_mgs_on_the_models_device(tmp_path: Path):
    """Host-side data (token lists, prompts) are made before; the bench, its head, batches, fine-tune,
    perplexity and an MGS continuation (whose prompts are built on the host) must follow the model."""
    model, tokenizer = tiny_smollm2()
    data = tiny_smol_data()
    settings = SmolSettings(prompts=5, train_layers=1, epsilon=0.2, batch_tokens=128, checkpoint_every=2)
    with _default_device_elsewhere():
        bench = SmolLM2Bench(model, tokenizer, settings, data, folder=tmp_path, seed=0, progress=False)
        record = bench.finetune("ft-nmst", Head("nmst", 0.2))
        continuation = ContinuationSettings(mgs=MGSConfig(num_candidates=2), decode_rows=3, max_reference_tokens=40)
        mgs = bench.train_updates("mgs", start=bench.weights(), order=[0, 1], update=mgs_update(bench, continuation, seed=0))
    assert record["finetune_steps"] == bench.train_batch_count() and record["test_perplexity"] > 1.0
    assert mgs["steps"] == 2 and all(0.0 <= log["cost_before"] <= 1.0 for log in mgs["logs"])


def test_prompt_task_decodes_on_the_models_device_whatever_the_prompts_device(monkeypatch):
    """Prompts built on the host go to the model's device: a parameter on ``meta`` stands for a GPU."""
    from training import prompt_costs

    seen = []

    def recording_decode(model, input_ids, attention_mask, **kwargs):
        seen.append((input_ids.device, attention_mask.device))
        raise StopIteration  # the devices are what this test checks

    model = torch.nn.Linear(2, 2, device="meta")
    monkeypatch.setattr(prompt_costs, "decode", recording_decode)
    task = PromptTask(loss=model_loss, eos_token_id=EOS, pad_token_id=PAD)
    with pytest.raises(StopIteration):
        task.decode(model, Prompts(torch.tensor([[5, 6], [8, 9]]), torch.tensor([3, 2])))
    assert seen == [(torch.device("meta"), torch.device("meta"))]


def test_a_smollm2_checkpoint_from_another_device_type_resumes_with_a_fresh_stream(tmp_path: Path):
    """A CUDA generator's state cannot seed a CPU generator: resuming such a checkpoint keeps the weights
    and counts and reseeds the update stream from the updates made."""
    model, tokenizer = tiny_smollm2()
    settings = SmolSettings(prompts=5, train_layers=1, epsilon=0.2, batch_tokens=128, checkpoint_every=2)
    bench = SmolLM2Bench(model, tokenizer, settings, tiny_smol_data(), folder=tmp_path, seed=0, progress=False)
    update, start = bench.mle_update(Head()), bench.weights()
    bench.train_updates("run", start=start, order=[0, 1, 2], update=update)
    checkpoint = tmp_path / "run.ckpt.pt"
    saved = torch.load(checkpoint, weights_only=True)
    saved.update(generator=torch.zeros(16, dtype=torch.uint8), generator_device="cuda")  # a CUDA state's shape
    torch.save(saved, checkpoint)
    resumed = bench.train_updates("run", start=start, order=[0, 1, 2, 3], update=update)
    assert resumed["steps"] == 4 and len(resumed["logs"]) == 4  # three restored, one more made
