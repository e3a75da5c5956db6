"""The old import path of :mod:`training.parallel_text`: the same module object, so code that imports or
patches ``training.data`` reaches the module the library uses."""

import sys

from . import parallel_text as _moved

sys.modules[__name__] = _moved
