"""Test-wide settings."""

import torch

# The models in the tests are tiny: a second intra-op thread only adds synchronisation (30x slower LSTM
# training on a busy 2-core machine). Results do not depend on this; parity tests compare within a process.
torch.set_num_threads(1)
