"""Everything that turns a model into a step model (:mod:`decoding.protocol`) for the decode loop.

- :mod:`~decoding.models.adapters`: transformers causal LMs and encoder-decoders, fed exactly what
  ``model.generate`` feeds them.
- :mod:`~decoding.models.kv_cache`: the KV-cache layer that writes into reserved storage and merges rows
  (continuous batching).
- :mod:`~decoding.models.recurrent`: the library's word-level RNN/LSTM LMs, with a vanilla, ST or NMST head.
- :mod:`~decoding.models.self_terminating`: an ST / NMST head (:mod:`decoding.heads`) on any step model or
  transformers model, with save and load.
- :mod:`~decoding.models.pretrained`: local models loaded offline (a folder, a GGUF file, SmolLM2).

The package exports the RNN/LSTM LMs, as ``decoding.models`` did when it was one module.
"""

from .recurrent import (CELLS, HEADS, RecurrentLM, RecurrentLMConfig, RecurrentLMOutput, RecurrentStepModel,
                        load_recurrent_lm, lstm_lm, rnn_lm, save_recurrent_lm)

__all__ = ["CELLS", "HEADS", "RecurrentLM", "RecurrentLMConfig", "RecurrentLMOutput", "RecurrentStepModel",
           "load_recurrent_lm", "lstm_lm", "rnn_lm", "save_recurrent_lm"]
