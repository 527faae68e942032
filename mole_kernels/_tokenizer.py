"""A small byte-level BPE tokenizer built offline, for the demo's model folder: text in, text out
with nothing downloaded. Trained (``tokenizers``) on the docstrings of Python's standard library,
text every Python installation has; the same Python gives the same tokenizer."""
from __future__ import annotations

import inspect
import json
import os
import warnings

from ._files import atomic_write

EOS = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_MIN_VOCAB = 257  # 256 byte tokens and EOS
_CORPUS_MODULES = ("builtins", "os", "os.path", "re", "json", "collections", "itertools", "functools", "string",
                   "textwrap", "math", "random", "pathlib", "argparse", "subprocess", "typing", "dataclasses",
                   "shutil", "tempfile", "logging", "unittest", "inspect", "threading", "datetime", "decimal",
                   "email.message", "http.client", "urllib.parse", "csv", "io", "pickle", "zipfile", "tarfile",
                   "socket", "sqlite3", "statistics", "difflib", "heapq", "bisect", "contextlib", "enum", "abc")


def _corpus():
    """The standard library's docstrings (modules, classes, functions, methods), in a fixed order."""
    import importlib

    for name in _CORPUS_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a Python built without it (sqlite3, say)
            continue
        seen = set()
        stack = [mod]
        while stack:
            obj = stack.pop()
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = inspect.getdoc(obj) if not isinstance(obj, str) else None
            if doc:
                yield doc
            if inspect.ismodule(obj) or inspect.isclass(obj):
                members = sorted(vars(obj).items(), reverse=True)
                stack.extend(v for k, v in members if not k.startswith("_") and (inspect.isclass(v) or callable(v)))


def build_tokenizer(vocab_size: int):
    """A ``tokenizers.Tokenizer`` with at most ``vocab_size`` entries (ids ``[0, vocab_size)``, EOS = 0),
    or None when the vocabulary is too small for byte-level BPE (< 257)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < _MIN_VOCAB:
        return None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with warnings.catch_warnings():  # reading a deprecated member's docstring (typing.io) warns
        warnings.simplefilter("ignore")
        docs = list(_corpus())
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def save_tokenizer(folder: str, vocab_size: int) -> str:
    """Writes a tokenizer for a ``vocab_size`` model into ``folder`` (the files ``AutoTokenizer``
    reads); returns a line saying what was written, or why nothing was."""
    try:
        tok = build_tokenizer(vocab_size)
    except ImportError:
        return "no tokenizer written (pip install tokenizers to get one)"
    if tok is None:
        return f"no tokenizer written (a byte-level tokenizer needs a vocabulary of at least {_MIN_VOCAB})"
    os.makedirs(folder, exist_ok=True)
    with atomic_write(os.path.join(folder, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok.to_str())
    special = {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    config = dict(special, tokenizer_class="PreTrainedTokenizerFast", model_max_length=2048,
                  clean_up_tokenization_spaces=False)
    for name, content in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        with atomic_write(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, sort_keys=True)
    return (f"wrote a byte-level BPE tokenizer of {tok.get_vocab_size()} entries (trained on Python's docstrings) "
            f"to {folder}")
