"""Text from a character-level language model: continue a prompt one character at a time.

A model that takes ids ``i64[N,T]`` and returns logits ``[N,T,V]`` for the next character at
every position (``examples/char_transformer.py``) and a vocabulary of V characters (the
artifact's ``vocabulary.npy``) are all it needs: ``gradfuse sample ARTIFACT --prompt "..."``.
"""

from __future__ import annotations

import numpy as np

from gradfuse.errors import GradfuseError


def sample(compiled, vocabulary, prompt: str, chars: int = 300, temperature: float = 0.8, seed: int = 0) -> str:
    """``prompt`` and ``chars`` characters after it, each drawn from softmax(logits / temperature)
    at the last position of the window (the model's causal mask makes it the right place); the
    window is the model's context length T, padded with spaces."""
    (name, ids_type), *more = compiled.inputs.items()
    out = compiled.prediction
    if more or ids_type.dtype.name != "i64" or ids_type.rank != 2 or not isinstance(ids_type.shape[1], int) \
            or out.rank != 3 or out.shape[2] != len(vocabulary):
        raise GradfuseError(f"model {compiled.name} takes {', '.join(f'{k}: {t}' for k, t in compiled.inputs.items())} "
                            f"and returns {out}: sampling needs ids i64[N,T] in and logits [N,T,{len(vocabulary)}] out "
                            f"(one per character of the vocabulary)")
    if temperature <= 0:
        raise GradfuseError(f"--temperature {temperature}: it must be above 0")
    length = ids_type.shape[1]
    vocabulary = [str(c) for c in np.asarray(vocabulary).tolist()]
    index = {c: i for i, c in enumerate(vocabulary)}
    unknown = sorted({c for c in prompt if c not in index})
    if unknown:
        raise GradfuseError(f"the prompt has characters the model never saw: {''.join(unknown)!r}")
    pad = index.get(" ", 0)
    rng = np.random.default_rng(seed)
    ids = [index[c] for c in prompt] or [pad]
    for _ in range(chars):
        window = ids[-length:]
        x = np.full((1, length), pad, np.int64)
        x[0, :len(window)] = window
        logits = compiled.predict(x)[0, len(window) - 1].astype(np.float64) / temperature
        p = np.exp(logits - logits.max())
        ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return "".join(vocabulary[i] for i in ids) if prompt else "".join(vocabulary[i] for i in ids[1:])
