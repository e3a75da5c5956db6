"""The old import path of :mod:`decoding.models.kv_cache`: the same module object, so code that imports or
patches ``decoding.kv_cache`` reaches the module the library uses."""

import sys

from .models import kv_cache as _moved

sys.modules[__name__] = _moved
