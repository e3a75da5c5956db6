"""The old import path of :mod:`decoding.models.adapters`: the same module object, so code that imports or
patches ``decoding.adapters`` reaches the module the library uses."""

import sys

from .models import adapters as _moved

sys.modules[__name__] = _moved
