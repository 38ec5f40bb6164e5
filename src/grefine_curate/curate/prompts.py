"""PQ-Map text side: the four factor prompt pairs T_p (G-Refine paper, section 3.1, eq. 2).

T_p holds, for each quality factor (overall, technical, rationality, naturalness), a (good, bad)
pair of L2-normalised CLIP text features: a (4, 2, D) tensor. Two kinds of prompts give it:

* ``ZeroShotPrompts``: the text pairs of ``PQConfig.zero_shot`` through ``encode_text``.
* ``LearnedPrompts``: CoOp contexts in the CLIP-IQA+ (pyiqa ``PromptLearner``) layout, the format of
  the prompts released with G-Refine. Each prompt is 16 learned context vectors with the class
  words in the middle; the token-embedding layer is bypassed::

      [SOS | ctx[:8] | class tokens | ctx[8:] | EOT, padding ...]  + positional embedding
        -> text transformer (causal mask) -> ln_final -> feature at the EOT position -> projection

  The class words are pyiqa's "Good photo.." / "Bad photo.." (tokens ``good``, ``photo``, ``..``:
  ``name_lens = 3``); ``token_prefix`` is the SOS embedding and ``token_suffix`` the embeddings of
  the 60 positions after the 16 "X" placeholders of "X X ... X Good photo.." (class tokens, EOT,
  padding). The EOT position is that of the tokenised placeholder prompt (index 20 for the
  OpenAI BPE), which the rearrangement keeps in place. This is pyiqa's ``clipiqa_arch.py``
  ordering, so the released checkpoints give the features pyiqa would give.

The project's prompt file is safetensors (never a pickle). Tensors, for each factor ``f`` in
``overall, technical, rationality, naturalness``:

    ``f.ctx``           (2, n_ctx, W)        learned contexts, row 0 = good, row 1 = bad
    ``f.token_prefix``  (2, 1, W)            SOS token embedding
    ``f.token_suffix``  (2, L - 1 - n_ctx, W) class tokens, EOT and padding embeddings

and string metadata: ``format`` ("grefine-pq-prompts"), ``format_version`` ("1"), ``width`` (W,
the text transformer width), ``n_ctx``, ``context_length`` (L), ``class_words``, ``name_lens``,
``eot_index`` (JSON lists, one entry per pair member), ``factors`` (JSON list), ``source``.
``import_clipiqa_checkpoint`` converts the released pyiqa ``PQ-*.pth`` files to this format.
"""

from __future__ import annotations

import difflib
import json
import os
import pickle
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from grefine_curate.curate.config import FACTORS, PQConfig, configs_dir
from grefine_curate.curate.errors import ConfigError

PROMPT_FORMAT = "grefine-pq-prompts"
PROMPT_FORMAT_VERSION = "1"
N_CTX = 16  # CLIP-IQA+ context vectors per prompt (half before, half after the class words)
CLASS_WORDS = ("Good photo..", "Bad photo..")  # pyiqa's class words, the extra "." included
# File names of the released checkpoints (Q-Future/Q-Refine, embeding/) for each factor.
RELEASED_FILES = {
    "overall": "PQ-overall.pth",
    "technical": "PQ-technical.pth",
    "rationality": "PQ-rational.pth",
    "naturalness": "PQ-natural.pth",
}
_PYIQA_KEYS = ("prompt_learner.ctx", "prompt_learner.token_prefix", "prompt_learner.token_suffix")


# ----------------------------------------------------------------------------------------------
# The text tower of an open_clip model, with the token-embedding layer bypassed


class _TextTower:
    """The parts of an open_clip text encoder that a learned prompt runs through.

    Works for ``open_clip.CLIP`` (text modules on the model) and ``CustomTextCLIP`` with an
    open_clip ``TextTransformer`` (``model.text``) without a CoCa class token or padding mask.
    """

    def __init__(self, model: nn.Module):
        text = getattr(model, "text", None)
        owner = text if text is not None else model
        missing = [a for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")
                   if not hasattr(owner, a)]
        if missing or getattr(owner, "cls_emb", None) is not None or getattr(owner, "use_pad_mask", False):
            raise ConfigError(
                f"learned PQ prompts need an open_clip CLIP text transformer (token embedding, positional "
                f"embedding, causal transformer, ln_final); this model's text tower "
                f"({type(owner).__name__}) lacks {missing or 'that layout'}. Use pq.prompts = \"zero-shot\"."
            )
        self.owner = owner

    @property
    def width(self) -> int:
        return int(self.owner.positional_embedding.shape[-1])

    @property
    def context_length(self) -> int:
        return int(self.owner.positional_embedding.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.owner.transformer.get_cast_dtype()

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.owner.token_embedding(ids.to(self.owner.positional_embedding.device))

    def encode_embeddings(self, x: torch.Tensor, eot_index: torch.Tensor) -> torch.Tensor:
        """x (N, L, W) token embeddings, eot_index (N,) -> (N, D) text features (not normalised)."""
        o = self.owner
        x = x.to(self.dtype) + o.positional_embedding.to(self.dtype)  # (N, L, W)
        x = o.transformer(x, attn_mask=o.attn_mask)
        x = o.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot_index.to(x.device)]  # (N, W)
        proj = o.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj  # (N, D)


def text_width(model: nn.Module) -> int:
    """Width of the model's text transformer (what a learned context's vectors must match)."""
    return _TextTower(model).width


def placeholder_prompts(tokenizer: Any, n_ctx: int = N_CTX, class_words: Sequence[str] = CLASS_WORDS) -> torch.Tensor:
    """Token ids of pyiqa's placeholder prompts "X X ... X <class words>" -> (2, L)."""
    prefix = " ".join(["X"] * n_ctx) + " "
    return tokenizer([prefix + w for w in class_words])


def _name_lens(tokenizer: Any, class_words: Sequence[str]) -> list[int]:
    # Tokens of the class words alone, between SOS and EOT (the highest id, as CLIP's argmax pooling assumes).
    ids = tokenizer(list(class_words))
    return [int(row.argmax()) - 1 for row in ids]


# ----------------------------------------------------------------------------------------------
# Prompt kinds: one interface, ``features(model) -> (4, 2, D)`` L2-normalised


class PQPrompts(Protocol):
    def features(self, model: nn.Module, normalise: bool = True) -> torch.Tensor:
        """(F=4, 2, D) text features, [factor, (good, bad)]; L2-normalised unless ``normalise=False``."""


class ZeroShotPrompts:
    """Hand-written (good, bad) text pairs per factor, encoded with CLIP's own tokenizer."""

    def __init__(self, pairs: Mapping[str, Sequence[str]], tokenizer: Any):
        missing = [f for f in FACTORS if f not in pairs]
        if missing:
            raise ConfigError(f"pq.zero_shot lacks text pairs for {missing}; give a (good, bad) pair for each of {list(FACTORS)}")
        for f in FACTORS:
            if len(pairs[f]) != 2:
                raise ConfigError(f"pq.zero_shot.{f} must be a (good, bad) pair of strings, got {pairs[f]!r}")
        self.pairs = {f: (str(pairs[f][0]), str(pairs[f][1])) for f in FACTORS}
        self.tokenizer = tokenizer

    def features(self, model: nn.Module, normalise: bool = True) -> torch.Tensor:
        texts = [t for f in FACTORS for t in self.pairs[f]]
        device = next(model.parameters()).device
        feats = model.encode_text(self.tokenizer(texts).to(device)).float()  # (8, D)
        feats = F.normalize(feats, dim=-1) if normalise else feats
        return feats.reshape(len(FACTORS), 2, -1)  # (4, 2, D)


class LearnedPrompts(nn.Module):
    """CoOp contexts of the four factors (CLIP-IQA+ layout, class words in the middle).

    ``ctx`` are ``nn.Parameter``s (``self.ctx[factor]``) so that ``train_pq`` can optimise them;
    prefix and suffix embeddings are buffers.
    """

    def __init__(
        self,
        ctx: Mapping[str, torch.Tensor],
        prefix: Mapping[str, torch.Tensor],
        suffix: Mapping[str, torch.Tensor],
        name_lens: Sequence[int],
        eot_index: Sequence[int],
        class_words: Sequence[str] = CLASS_WORDS,
        source: str = "",
    ):
        super().__init__()
        for f in FACTORS:
            for what, table in (("ctx", ctx), ("token_prefix", prefix), ("token_suffix", suffix)):
                if f not in table:
                    raise ConfigError(f"learned prompts lack {f}.{what}; expected tensors for {list(FACTORS)}")
        c0 = ctx[FACTORS[0]]
        if c0.dim() != 3 or c0.shape[0] != 2:
            raise ConfigError(f"learned prompt ctx must be (2, n_ctx, width), got {tuple(c0.shape)}")
        self.n_ctx, self.width = int(c0.shape[1]), int(c0.shape[2])
        if self.n_ctx % 2:
            raise ConfigError(f"n_ctx must be even (half before, half after the class words), got {self.n_ctx}")
        for f in FACTORS:
            shapes = (tuple(ctx[f].shape), tuple(prefix[f].shape), tuple(suffix[f].shape))
            want = ((2, self.n_ctx, self.width), (2, 1, self.width), (2, suffix[FACTORS[0]].shape[1], self.width))
            if shapes != want:
                raise ConfigError(f"learned prompts for {f!r}: shapes ctx/prefix/suffix {shapes}, expected {want}")
        self.ctx = nn.ParameterDict({f: nn.Parameter(ctx[f].detach().float().clone()) for f in FACTORS})
        for f in FACTORS:
            self.register_buffer(f"prefix_{f}", prefix[f].detach().float().clone(), persistent=False)
            self.register_buffer(f"suffix_{f}", suffix[f].detach().float().clone(), persistent=False)
        self.name_lens = [int(n) for n in name_lens]
        self.eot_index = [int(i) for i in eot_index]
        self.class_words = tuple(class_words)
        self.source = source
        self.file_metadata: dict[str, str] = {}  # metadata of the file it was loaded from
        self.context_length = 1 + self.n_ctx + int(suffix[FACTORS[0]].shape[1])
        if len(self.name_lens) != 2 or len(self.eot_index) != 2:
            raise ConfigError(f"learned prompts need one name_len and one eot_index per pair member (good, bad); "
                              f"got name_lens={self.name_lens}, eot_index={self.eot_index}")
        if not all(0 < i < self.context_length for i in self.eot_index):
            raise ConfigError(f"eot_index {self.eot_index} outside the context of length {self.context_length}")

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def from_placeholders(
        cls,
        model: nn.Module,
        tokenizer: Any,
        n_ctx: int = N_CTX,
        class_words: Sequence[str] = CLASS_WORDS,
    ) -> "LearnedPrompts":
        """Contexts initialised from the token embeddings of "X X ... X" (pyiqa's placeholders)."""
        tower = _TextTower(model)
        ids = placeholder_prompts(tokenizer, n_ctx, class_words)  # (2, L)
        with torch.no_grad():
            emb = tower.token_embedding(ids).float().cpu()  # (2, L, W)
        ctx = emb[:, 1 : 1 + n_ctx]
        tables = {f: ctx for f in FACTORS}, {f: emb[:, :1] for f in FACTORS}, {f: emb[:, 1 + n_ctx :] for f in FACTORS}
        return cls(*tables, name_lens=_name_lens(tokenizer, class_words),
                   eot_index=[int(i) for i in ids.argmax(dim=-1)], class_words=class_words,
                   source="initialised from 'X' placeholder token embeddings")

    # -- the text forward --------------------------------------------------------------------

    def embeddings(self, factor: str) -> torch.Tensor:
        """The (2, L, W) input embeddings of one factor's pair: [SOS | ctx[:h] | class | ctx[h:] | rest]."""
        ctx = self.ctx[factor]
        prefix, suffix = getattr(self, f"prefix_{factor}"), getattr(self, f"suffix_{factor}")
        h = self.n_ctx // 2
        rows = []
        for i in range(2):  # good, bad (their class words may differ in length)
            n = self.name_lens[i]
            rows.append(torch.cat([prefix[i], ctx[i, :h], suffix[i, :n], ctx[i, h:], suffix[i, n:]], dim=0))
        return torch.stack(rows)  # (2, L, W)

    def check_model(self, model: nn.Module) -> _TextTower:
        tower = _TextTower(model)
        if tower.width != self.width:
            raise ConfigError(
                f"learned prompts ({self.source or 'prompt file'}) have width {self.width}, but the CLIP text "
                f"encoder has width {tower.width}: these prompts were trained for another CLIP model. Use "
                f"prompts trained for this model (grefine-curate train-pq) or pq.prompts = \"zero-shot\"."
            )
        if tower.context_length != self.context_length:
            raise ConfigError(
                f"learned prompts have context length {self.context_length}, the CLIP text encoder "
                f"{tower.context_length}; use prompts trained for this model"
            )
        return tower

    def features(self, model: nn.Module, normalise: bool = True) -> torch.Tensor:
        """(4, 2, D), L2-normalised unless ``normalise=False``; differentiable w.r.t. ``self.ctx``."""
        tower = self.check_model(model)
        x = torch.cat([self.embeddings(f) for f in FACTORS]).to(tower.owner.positional_embedding.device)  # (8, L, W)
        eot = torch.tensor(self.eot_index * len(FACTORS))  # (8,)
        feats = tower.encode_embeddings(x, eot).float()  # (8, D)
        feats = F.normalize(feats, dim=-1) if normalise else feats
        return feats.reshape(len(FACTORS), 2, -1)

    # -- files --------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for f in FACTORS:
            out[f"{f}.ctx"] = self.ctx[f].detach().float().cpu().contiguous()
            out[f"{f}.token_prefix"] = getattr(self, f"prefix_{f}").detach().float().cpu().contiguous()
            out[f"{f}.token_suffix"] = getattr(self, f"suffix_{f}").detach().float().cpu().contiguous()
        return out

    def metadata(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        meta = {
            "format": PROMPT_FORMAT,
            "format_version": PROMPT_FORMAT_VERSION,
            "width": str(self.width),
            "n_ctx": str(self.n_ctx),
            "context_length": str(self.context_length),
            "class_words": json.dumps(list(self.class_words)),
            "name_lens": json.dumps(self.name_lens),
            "eot_index": json.dumps(self.eot_index),
            "factors": json.dumps(list(FACTORS)),
            "source": self.source,
        }
        meta.update({k: str(v) for k, v in (extra or {}).items()})
        return meta

    def save(self, path: str | os.PathLike, extra_metadata: Mapping[str, str] | None = None) -> Path:
        """Write the project's safetensors prompt file (atomically: a partial file never has the name)."""
        from safetensors.torch import save_file

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        save_file(self.state_tensors(), str(tmp), metadata=self.metadata(extra_metadata))
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LearnedPrompts":
        """Read a prompt file written by ``save`` / ``import_clipiqa_checkpoint``."""
        from safetensors import SafetensorError, safe_open

        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"prompt file not found: {p}")
        try:
            with safe_open(str(p), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ConfigError(
                f"{p}: not a safetensors prompt file ({e}). Released CLIP-IQA+ .pth checkpoints must be "
                f"converted first with import_clipiqa_checkpoint."
            ) from e
        if meta.get("format") != PROMPT_FORMAT:
            raise ConfigError(f"{p}: safetensors file without format={PROMPT_FORMAT!r} metadata; not a PQ prompt file")
        if meta.get("format_version") != PROMPT_FORMAT_VERSION:
            raise ConfigError(f"{p}: prompt file format version {meta.get('format_version')!r}, this code reads {PROMPT_FORMAT_VERSION!r}")
        missing = [f"{f}.{k}" for f in FACTORS for k in ("ctx", "token_prefix", "token_suffix") if f"{f}.{k}" not in tensors]
        if missing:
            raise ConfigError(f"{p}: prompt file lacks tensors {missing}; found {sorted(tensors)}")
        try:
            name_lens = json.loads(meta["name_lens"])
            eot_index = json.loads(meta["eot_index"])
            class_words = json.loads(meta.get("class_words", json.dumps(list(CLASS_WORDS))))
        except (KeyError, json.JSONDecodeError) as e:
            raise ConfigError(f"{p}: prompt file metadata name_lens/eot_index missing or not JSON ({e})") from e
        prompts = cls(
            {f: tensors[f"{f}.ctx"] for f in FACTORS},
            {f: tensors[f"{f}.token_prefix"] for f in FACTORS},
            {f: tensors[f"{f}.token_suffix"] for f in FACTORS},
            name_lens=name_lens, eot_index=eot_index, class_words=class_words,
            source=str(p),
        )
        if str(prompts.width) != meta.get("width", str(prompts.width)):
            raise ConfigError(f"{p}: metadata width {meta.get('width')} disagrees with tensors of width {prompts.width}")
        prompts.file_metadata = dict(meta)
        return prompts


# ----------------------------------------------------------------------------------------------
# Finding and building prompts


def prompts_dir() -> Path:
    return configs_dir() / "prompts"


def available_prompt_files() -> list[str]:
    return sorted(p.stem for p in prompts_dir().glob("*.safetensors"))


def resolve_prompt_file(name_or_path: str | os.PathLike) -> Path:
    """A prompt name in ``configs/prompts/`` ("reference-pq") or a path to a .safetensors file."""
    p = Path(name_or_path).expanduser()
    if p.suffix == ".safetensors" or p.exists() or os.sep in str(name_or_path):
        if not p.is_file():
            raise ConfigError(f"prompt file not found: {p}")
        return p
    builtin = prompts_dir() / f"{name_or_path}.safetensors"
    if builtin.is_file():
        return builtin
    names = available_prompt_files()
    close = difflib.get_close_matches(str(name_or_path), names + ["zero-shot"], n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(
        f"unknown PQ prompts {str(name_or_path)!r}.{hint} Use \"zero-shot\", one of the shipped prompt "
        f"files ({', '.join(names) or 'none'}) or a path to a .safetensors prompt file."
    )


def build_pq_prompts(cfg: PQConfig, tokenizer: Any, prompts: str | os.PathLike | None = None) -> ZeroShotPrompts | LearnedPrompts:
    """The prompts a preset names (``cfg.prompts``), or ``prompts`` when given (e.g. ``--prompts FILE``)."""
    spec = str(prompts) if prompts is not None else cfg.prompts
    if spec == "zero-shot":
        return ZeroShotPrompts(cfg.zero_shot, tokenizer)
    return LearnedPrompts.load(resolve_prompt_file(spec))


@torch.no_grad()
def pq_text_features(model: nn.Module, prompts: PQPrompts, normalise: bool = True) -> torch.Tensor:
    """T_p of eq. 2: (4, 2, D) float32, computed once per model (no gradients).

    L2-normalised as CLIP compares features; ``normalise=False`` keeps the raw projections, as the
    reference code's PQ-Map.py does (its comment says "with normalization", but none is applied).
    """
    return prompts.features(model, normalise=normalise).float()


# ----------------------------------------------------------------------------------------------
# Importing the released CLIP-IQA+ checkpoints


def _load_failure(e: Exception) -> str:
    """The specific reason from torch's weights-only error, without its advice to load unsafely."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith(("Trying to load unsupported", "Unsupported", "WeightsUnpickler error:")) and len(ln) > 25:
            return ln[:200]
    specific = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation", "Please file"))]
    return (specific[0] if specific else type(e).__name__)[:200]


def _load_pyiqa_prompt(path: Path) -> dict[str, torch.Tensor]:
    """Read one pyiqa CLIPIQA+ checkpoint with ``weights_only=True``; anything else is an error."""
    expected = (
        "a pyiqa CLIPIQA+ checkpoint: a torch pickle of {'params': {'prompt_learner.ctx': (2,16,W), "
        "'prompt_learner.token_prefix': (2,1,W), 'prompt_learner.token_suffix': (2,L-17,W)}}"
    )
    if not path.is_file():
        raise ConfigError(f"prompt checkpoint not found: {path} (expected {expected})")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, AttributeError,
            ValueError, TypeError, ModuleNotFoundError, ImportError) as e:
        raise ConfigError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({_load_failure(e)}). "
            f"Expected {expected}. Files that need arbitrary pickled objects are refused."
        ) from e
    params = obj.get("params", obj) if isinstance(obj, dict) else None
    if not isinstance(params, dict) or not all(k in params for k in _PYIQA_KEYS):
        found = sorted(params) if isinstance(params, dict) else type(obj).__name__
        raise ConfigError(f"{path}: keys {found} are not those of {expected}")
    out = {k.split(".", 1)[1]: params[k] for k in _PYIQA_KEYS}
    for k, t in out.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != 2:
            raise ConfigError(f"{path}: {k} is {getattr(t, 'shape', type(t).__name__)}, expected a (2, n, W) tensor ({expected})")
    return out


def import_clipiqa_checkpoint(
    paths: Mapping[str, str | os.PathLike] | str | os.PathLike,
    out: str | os.PathLike,
    tokenizer: Any | None = None,
    source: str = "",
) -> Path:
    """Convert the four released CLIP-IQA+ prompt checkpoints to the project's safetensors file.

    ``paths``: {factor: file} for overall, technical, rationality, naturalness, or a folder holding
    ``PQ-overall.pth, PQ-technical.pth, PQ-rational.pth, PQ-natural.pth``. ``tokenizer`` (default:
    open_clip's OpenAI BPE) gives the EOT position of pyiqa's placeholder prompts.
    """
    if isinstance(paths, (str, os.PathLike)):
        folder = Path(paths)
        if not folder.is_dir():
            raise ConfigError(f"{folder}: expected a folder holding {sorted(RELEASED_FILES.values())} or a {{factor: file}} mapping")
        paths = {f: folder / name for f, name in RELEASED_FILES.items()}
    missing = [f for f in FACTORS if f not in paths]
    if missing:
        raise ConfigError(f"prompt checkpoints for factors {missing} not given; need one file for each of {list(FACTORS)}")
    if tokenizer is None:
        import open_clip

        tokenizer = open_clip.get_tokenizer("ViT-B-16")  # the OpenAI BPE that CLIP-IQA+ used
    loaded = {f: _load_pyiqa_prompt(Path(paths[f])) for f in FACTORS}
    n_ctx = int(loaded[FACTORS[0]]["ctx"].shape[1])
    ids = placeholder_prompts(tokenizer, n_ctx, CLASS_WORDS)
    prompts = LearnedPrompts(
        {f: loaded[f]["ctx"] for f in FACTORS},
        {f: loaded[f]["token_prefix"] for f in FACTORS},
        {f: loaded[f]["token_suffix"] for f in FACTORS},
        name_lens=[3, 3],  # pyiqa hard-codes 3 ("good"/"bad", "photo", "..")
        eot_index=[int(i) for i in ids.argmax(dim=-1)],
        class_words=CLASS_WORDS,
        source=source or "pyiqa CLIPIQA+ checkpoints: " + ", ".join(Path(paths[f]).name for f in FACTORS),
    )
    if prompts.context_length != ids.shape[1]:
        raise ConfigError(f"checkpoints give context length {prompts.context_length}, the tokenizer {ids.shape[1]}")
    return prompts.save(out)
