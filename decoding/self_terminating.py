"""The old import path of the self-terminating code, now in two places: the math in :mod:`decoding.heads`,
the wrappers and their save/load in :mod:`decoding.models.self_terminating`."""

from .heads import (KINDS, Kind, check_eos_token_id, check_epsilon, check_kind, context_mask_from_labels,
                    initial_head_state, nmst_log_probs, self_terminating_log_probs, self_terminating_step,
                    st_log_probs, termination_bound)
from .models.self_terminating import (CONFIG_NAME, SelfTerminatingLM, SelfTerminatingState,
                                      SelfTerminatingStepModel, load_self_terminating, make_self_terminating,
                                      save_self_terminating)

__all__ = [
    "KINDS", "SelfTerminatingLM", "SelfTerminatingState", "SelfTerminatingStepModel", "context_mask_from_labels",
    "initial_head_state", "load_self_terminating", "make_self_terminating", "nmst_log_probs",
    "save_self_terminating", "self_terminating_log_probs", "self_terminating_step", "st_log_probs",
    "termination_bound",
]
