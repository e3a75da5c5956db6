"""Training: MLE, MLE-guided parameter search (MGS), minimum risk training and policy gradient.

Example, fine-tuning a translation model against BLEU with MGS::

    from training import (LoopConfig, MGSConfig, MGSStep, Seq2SeqTask, encode_parallel, load_seq2seq,
                          read_parallel, train)

    model, tokenizer = load_seq2seq("my-mle-model")
    data = encode_parallel(read_parallel("train.de", "train.en"), tokenizer)
    step = MGSStep(Seq2SeqTask(tokenizer, cost="bleu"), MGSConfig(num_candidates=4, sigma=1.0, alpha=100.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    train(model, step, data, optimizer, config=LoopConfig(batch_size=32, max_seconds=600),
          checkpoint_dir="runs/mgs")
"""

from .checkpoint import (atomic_copy, atomic_folder, atomic_save, atomic_write_bytes, atomic_write_text, load_checkpoint,
                         model_signature)
from .costs import COSTS, Decoded, get_cost
from .parallel_text import (Batch, EncodedParallel, ParallelText, encode_parallel, epoch_batches, make_batch,
                            read_parallel)
from .decode import Hypotheses, decode, eos_lengths
from .evaluate import TranslationScores, Translations, score_translations, translate
from .lm import collate_lm_batch, evaluate_perplexity, train_lm
from .loop import LoopConfig, LoopPosition, Progress, TrainResult, gradient_step, load_best, run_loop, train
from .losses import MovingAverageBaseline, length_normalised, mle_loss, mrt_loss, pg_loss, teacher_forced_logprobs
from .mgs import MGSConfig, MGSStep, candidate_costs, importance_log_weights, log_proposal_density
from .self_terminating_finetune import (EpsilonChoice, choose_epsilon, finetune_self_terminating, fit_eos_row,
                                        perplexity_tax, sampled_nontermination_bound)
from .seq2seq import Seq2SeqSize, build_seq2seq, load_seq2seq, save_seq2seq
from .padding import pad_rows
from .plateau import PlateauRule
from .steps import MLEStep, MRTStep, PGStep, UpdateStep
from .task import Seq2SeqTask, SequenceTask
from .tokenizer import train_tokenizer

__all__ = [
    "atomic_copy", "atomic_folder", "atomic_save", "atomic_write_bytes", "atomic_write_text", "load_checkpoint",
    "model_signature",
    "COSTS", "Decoded", "get_cost",
    "Batch", "EncodedParallel", "ParallelText", "encode_parallel", "epoch_batches", "make_batch",
    "read_parallel",
    "Hypotheses", "decode", "eos_lengths",
    "TranslationScores", "Translations", "score_translations", "translate",
    "LoopConfig", "LoopPosition", "Progress", "TrainResult", "gradient_step", "load_best", "run_loop", "train",
    "collate_lm_batch", "evaluate_perplexity", "train_lm",
    "MovingAverageBaseline", "length_normalised", "mle_loss", "mrt_loss", "pg_loss", "teacher_forced_logprobs",
    "MGSConfig", "MGSStep", "candidate_costs", "importance_log_weights", "log_proposal_density",
    "EpsilonChoice", "choose_epsilon", "finetune_self_terminating", "fit_eos_row", "perplexity_tax",
    "sampled_nontermination_bound",
    "Seq2SeqSize", "build_seq2seq", "load_seq2seq", "save_seq2seq",
    "pad_rows",
    "PlateauRule",
    "MLEStep", "MRTStep", "PGStep", "UpdateStep",
    "Seq2SeqTask", "SequenceTask",
    "train_tokenizer",
]
