"""A small trained MoLE: the reference for LUT quantization quality (issue 26).

Text every machine has: the Python standard library's source (``*.py`` under ``sysconfig``'s
``stdlib`` path, ``test``/``idlelib``/``site-packages`` left out), files in sorted order; every
20th file is the validation split. Tokenizer: a byte-level BPE (``tokenizers``) of 4,096
entries trained on the training split (a subword vocabulary: flatter than a word-level one).
Model: MoLE with V = 4,096, D = 128, L = 4, E = 4, 4 heads, FFN 256, trained in float32 with
AdamW on 64-token windows (a few minutes on 2 CPU cores).

Everything is cached between runs under ``$MOLE_KERNELS_CACHE`` (default
``~/.cache/mole_kernels``) in ``reference_model-<recipe hash>/``: ``tokenizer.json``,
``model.pt`` (the train-form state dict), ``val.pt`` (the validation tokens), ``counts.pt`` (token
frequencies of the training split: what frequency-ranked mixed tables are keyed by), ``info.json``.
A change to the recipe below changes the hash, so a stale cache is never used.

    python bench/reference_model.py            # builds (or loads) it and prints its perplexity
"""
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from mole_kernels._progress import progress_bar  # noqa: E402
from mole_kernels.model import MoLEConfig, MoLEForCausalLM  # noqa: E402

# Sized for a loaded, shared 2-core machine: 1500 steps of 8 x 64 tokens on one thread (~15 minutes; on
# an oversubscribed machine two OpenMP threads ran 17x slower than one).
RECIPE = dict(vocab=4096, hidden=128, layers=4, experts=4, heads=4, ffn=256, seq=64, batch=8, steps=1500,
              lr=5e-3, warmup=30, seed=0, max_train_mb=8, val_every=20, version=1)


def cache_dir() -> Path:
    base = Path(os.environ.get("MOLE_KERNELS_CACHE", Path.home() / ".cache" / "mole_kernels"))
    tag = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    return base / f"reference_model-{tag}"


def _sources():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__"}
    files = sorted(p for p in stdlib.rglob("*.py") if not skip & set(p.relative_to(stdlib).parts))
    train, val = [], []
    for i, p in enumerate(files):
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        (val if i % RECIPE["val_every"] == 0 else train).append(text)
    budget = RECIPE["max_train_mb"] << 20
    kept, size = [], 0
    for t in train:
        if size >= budget:
            break
        kept.append(t)
        size += len(t)
    return kept, val


def _config() -> MoLEConfig:
    r = RECIPE
    return MoLEConfig(vocab_size=r["vocab"], hidden_size=r["hidden"], intermediate_size=r["ffn"],
                      num_hidden_layers=r["layers"], num_attention_heads=r["heads"], num_experts=r["experts"],
                      max_position_embeddings=r["seq"])


def _train_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=RECIPE["vocab"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _encode(tok, texts) -> torch.Tensor:
    ids = [i for enc in tok.encode_batch(texts) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.int32)


def build(progress: bool = True):
    """Trains the model (tokenizer, weights) into the cache; returns (model, val_tokens)."""
    r = RECIPE
    torch.manual_seed(r["seed"])
    train_texts, val_texts = _sources()
    tok = _train_tokenizer(train_texts)
    train_ids, val_ids = _encode(tok, train_texts), _encode(tok, val_texts)
    model = MoLEForCausalLM(_config())
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / r["warmup"]) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / r["steps"]))))
    gen = torch.Generator().manual_seed(r["seed"])
    S, B = r["seq"], r["batch"]
    t0 = time.time()
    model.train()
    with progress_bar(r["steps"], "training the reference MoLE", enabled=progress, unit="step") as bar:
        for _ in range(r["steps"]):
            starts = torch.randint(0, len(train_ids) - S - 1, (B,), generator=gen)
            x = torch.stack([train_ids[s:s + S] for s in starts.tolist()]).long()
            loss = model(x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}") if hasattr(bar, "set_postfix") else None
    model.eval()
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    torch.save(model.state_dict(), d / "model.pt")
    torch.save(val_ids, d / "val.pt")
    torch.save(torch.bincount(train_ids.long(), minlength=r["vocab"]), d / "counts.pt")
    info = dict(recipe=r, train_tokens=len(train_ids), val_tokens=len(val_ids), train_seconds=time.time() - t0,
                final_loss=loss.item(), torch=torch.__version__)
    (d / "info.json").write_text(json.dumps(info, indent=1))
    return model


def load(progress: bool = True):
    """(train-form model, validation tokens int32 [N], training-split token counts [V]) from the
    cache, built first when missing."""
    d = cache_dir()
    if not (d / "info.json").exists():
        build(progress)
    model = MoLEForCausalLM(_config())
    model.load_state_dict(torch.load(d / "model.pt", weights_only=True))
    model.eval()
    return model, torch.load(d / "val.pt", weights_only=True), torch.load(d / "counts.pt", weights_only=True)


def windows(val_ids: torch.Tensor, seq: int = RECIPE["seq"], max_tokens=None) -> torch.Tensor:
    """The validation tokens as non-overlapping [N, seq] windows (all of them unless max_tokens)."""
    n = len(val_ids) // seq
    if max_tokens is not None:
        n = min(n, max(1, max_tokens // seq))
    return val_ids[:n * seq].view(n, seq).long()


if __name__ == "__main__":
    torch.set_num_threads(1)
    m, val, _ = load()
    from mole_kernels.quality import perplexity

    print(f"cache: {cache_dir()}")
    print(f"validation tokens: {len(val)}; perplexity (train form, float32): "
          f"{perplexity(m, windows(val), progress=True):.3f}")
