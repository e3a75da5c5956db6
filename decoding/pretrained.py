"""The old import path of :mod:`decoding.models.pretrained`: the same module object, so code that imports or
patches ``decoding.pretrained`` reaches the module the library uses."""

import sys

from .models import pretrained as _moved

sys.modules[__name__] = _moved
