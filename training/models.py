"""The old import path of :mod:`training.seq2seq`: the same module object, so code that imports or patches
``training.models`` reaches the module the library uses."""

import sys

from . import seq2seq as _moved

sys.modules[__name__] = _moved
