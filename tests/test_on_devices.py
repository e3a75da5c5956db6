"""The same short checks on every device this machine has: the CPU always, CUDA when there is one.

On a GPU machine this file is the prepared device check (a GPU decode against ``model.generate``, seeded
sampling, a self-terminating head's bound, a few bfloat16 training steps of MLE, MGS and the SmolLM2
bench)::

    python -m pytest tests/test_on_devices.py -v

Without CUDA the ``cuda`` cases are skipped and the ``cpu`` ones keep the code paths tested.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.smollm2 import Head, SmolLM2Bench, SmolSettings
from decoding.generate import generate
from decoding.heads import termination_bound
from decoding.models import rnn_lm
from training.lm import collate_lm_batch, model_loss, train_lm
from training.mgs import MGSConfig, MGSStep
from training.prompt_costs import Prompts, PromptTask, PromptTaskBatch, mean_cost

from .tiny_models import EOS, PAD, VOCAB, left_padded_prompts, tiny_model, tiny_smol_data, tiny_smollm2

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.mark.parametrize("options", [{}, {"num_beams": 4}], ids=["greedy", "beam4"])
def test_generate_matches_model_generate_on_the_device(device, options):
    model = tiny_model("gpt2").to(device)
    ids, mask = (t.to(device) for t in left_padded_prompts(seed=3, batch=4, length=6))
    settings = {"max_new_tokens": 12, "eos_token_id": EOS, "pad_token_id": PAD, **options}
    ours = generate(model, ids, mask, **settings)
    theirs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **settings)
    assert ours.device.type == device.type
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_seeded_sampling_repeats_on_the_device_with_a_host_or_device_generator(device):
    model = tiny_model("gpt2").to(device)
    ids, mask = (t.to(device) for t in left_padded_prompts(seed=4, batch=6, length=5))

    def draw(generator_device: torch.device) -> torch.Tensor:
        generator = torch.Generator(generator_device).manual_seed(11)
        return generate(model, ids, mask, do_sample=True, top_p=0.9, consistent=True, max_new_tokens=10,
                        eos_token_id=EOS, pad_token_id=PAD, generator=generator)  # fmt: skip

    for generator_device in {torch.device("cpu"), device}:
        first, second = draw(generator_device), draw(generator_device)
        assert torch.equal(first, second) and first.device.type == device.type


@pytest.mark.parametrize("head", ["st", "nmst"])
def test_a_self_terminating_head_stops_greedy_within_its_bound_on_the_device(device, head):
    torch.manual_seed(0)
    epsilon = 0.1
    model = rnn_lm(VOCAB, eos_token_id=EOS, pad_token_id=PAD, head=head, epsilon=epsilon, hidden_size=16).to(device)
    prompts = torch.randint(3, VOCAB, (8, 3), device=device)
    out = generate(model.eval(), prompts, max_new_tokens=200, eos_token_id=EOS, pad_token_id=PAD,
                   return_dict_in_generate=True)  # fmt: skip
    new = out.sequences[:, prompts.shape[1] :]
    ended = (new == EOS).any(dim=1)
    first_eos = (new == EOS).int().argmax(dim=1) + 1
    assert bool(ended.all()) and int(first_eos.max()) <= termination_bound(epsilon)


def test_a_few_bfloat16_mle_epochs_lower_the_validation_perplexity_on_the_device(device):
    torch.manual_seed(0)
    model = rnn_lm(VOCAB, eos_token_id=EOS, pad_token_id=PAD, hidden_size=32).to(device)
    pattern = [[3 + (start + k) % 20 for k in range(8)] + [EOS] for start in range(20)]  # a learnable cycle
    batches = [collate_lm_batch(pattern[i : i + 5], pad_token_id=PAD) for i in range(0, 20, 5)]
    history = train_lm(model, batches, batches[:2], epochs=3, lr=1e-2, patience=5, progress=False,
                       autocast_dtype=torch.bfloat16)  # fmt: skip
    perplexities = [record.valid_perplexity for record in history.epochs]
    assert len(perplexities) == 3 and perplexities[-1] < perplexities[0]
    assert next(model.parameters()).device.type == device.type


def test_an_mgs_step_moves_the_weights_on_the_device(device):
    model = tiny_model("gpt2").to(device)
    lines = [[5, 6, 7, EOS], [8, 9, EOS], [10, 11, 12, 13, EOS]]
    batch = PromptTaskBatch(mle=collate_lm_batch(lines, pad_token_id=PAD),
                            prompts=Prompts(torch.tensor([[5, 6], [8, 9], [10, 11]]), torch.tensor([3, 2, 4])))
    task = PromptTask(loss=lambda m, b: model_loss(m, {k: v.to(device) for k, v in b.items()}),
                      eos_token_id=EOS, pad_token_id=PAD, cost=mean_cost(["nontermination", "repetition"]))
    step = MGSStep(task, MGSConfig(num_candidates=3))
    before = model.transformer.wte.weight.detach().clone()
    logs = step(model, batch, torch.optim.SGD(model.parameters(), lr=0.1),
                generator=torch.Generator(device).manual_seed(0))  # fmt: skip
    assert 0.0 <= logs["cost_before"] <= 1.0 and not torch.equal(before, model.transformer.wte.weight)


def test_the_smollm2_bench_fine_tunes_in_bfloat16_and_resumes_on_the_device(device, tmp_path: Path):
    model, tokenizer = tiny_smollm2(device=device)
    settings = SmolSettings(prompts=5, train_layers=1, epsilon=0.2, batch_tokens=128, checkpoint_every=2,
                            train_bf16=True)  # fmt: skip
    bench = SmolLM2Bench(model, tokenizer, settings, tiny_smol_data(), folder=tmp_path, seed=0, progress=False)
    before = bench.perplexity(Head("nmst", 0.2))
    record = bench.finetune("ft-nmst", Head("nmst", 0.2))
    assert record["test_perplexity"] < before and record["finetune_steps"] == bench.train_batch_count()
    saved = torch.load(tmp_path / "ft-nmst.pt", weights_only=True)
    assert all(value.device.type == device.type for value in bench.weights().values())
    assert all(torch.equal(saved[name].to(device), value) for name, value in bench.weights().items())
