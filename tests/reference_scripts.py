"""An independent re-derivation of the authors' PQ-Map.py and AQ-Map.py (Q-Future/Q-Refine), in plain torch.

Written from the scripts' formulas and CLIP-Surgery's code (xmed-lab/CLIP_Surgery ``clip.py``,
``clip_surgery_model.py``), NOT through grefine_curate's helpers: the only things taken from the
package are data (the NLTK stop-word list, which cannot be downloaded here). Every layer runs from
an open_clip state dict with ``torch.nn.functional``, in the scripts' own order of operations:

* CLIP-Surgery's image encoder (LND layout, dual path on the last 6 blocks, CLS from the original
  path, ``ln_post`` and ``proj`` on all tokens) and CLIP's text encoder (causal mask, EOT pooling);
* the torchvision preprocessing of ``clip.load`` (``Resize((224, 224), BICUBIC)``, RGB, ``ToTensor``,
  ``Normalize``), no centre crop;
* PQ-Map.py: ``load_embed`` (CLIP-IQA+ contexts around the class tokens), ``encode_text`` with EOT at
  index 20, image features normalised over dim=1, raw text features, ``get_similarity_map`` (min-max,
  bilinear to the given shape), ``perceptual_quality_map`` with and without ``multi``;
* AQ-Map.py: ``partition``, ``remove_stopwords_and_punctuation``, ``get_phrase_parent``, the noun
  parts, ``encode_text_with_prompt_ensemble`` with "" as the redundant feature, ``alignment_map``;
* the defects, A and a of the reference (REFERENCE.md section 2): noun unmatched a_pns < 0.5 takes
  the parent's noun map, adjective unmatched a_phs < a_pns its own, A = element-wise max, and
  a = sigmoid(10 * sim(prompt)) * prod min(a_phs / beta, 1).

Where a script would crash (KeyError on a token, an assert), the same exception is raised here, so a
test can tell "their script does not run on this prompt" from a mismatch.

Two liberties, both exact: the text transformer runs on the context trimmed to the longest text of
a batch (CLIP's text mask is causal, so positions before EOT never see the padding after it), and
numpy float32 ``exp(x) / sum(exp(x))`` is computed in torch float32.
"""

from __future__ import annotations

import string
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import Compose, InterpolationMode, Normalize, Resize, ToTensor

# CLIP-Surgery clip.py, encode_text_with_prompt_ensemble: the 85 ImageNet templates, verbatim.
CLIP_SURGERY_TEMPLATES = [
    'a bad photo of a {}.', 'a photo of many {}.', 'a sculpture of a {}.', 'a photo of the hard to see {}.',
    'a low resolution photo of the {}.', 'a rendering of a {}.', 'graffiti of a {}.', 'a bad photo of the {}.',
    'a cropped photo of the {}.', 'a tattoo of a {}.', 'the embroidered {}.', 'a photo of a hard to see {}.',
    'a bright photo of a {}.', 'a photo of a clean {}.', 'a photo of a dirty {}.', 'a dark photo of the {}.',
    'a drawing of a {}.', 'a photo of my {}.', 'the plastic {}.', 'a photo of the cool {}.',
    'a close-up photo of a {}.', 'a black and white photo of the {}.', 'a painting of the {}.',
    'a painting of a {}.', 'a pixelated photo of the {}.', 'a sculpture of the {}.', 'a bright photo of the {}.',
    'a cropped photo of a {}.', 'a plastic {}.', 'a photo of the dirty {}.', 'a jpeg corrupted photo of a {}.',
    'a blurry photo of the {}.', 'a photo of the {}.', 'a good photo of the {}.', 'a rendering of the {}.',
    'a {} in a video game.', 'a photo of one {}.', 'a doodle of a {}.', 'a close-up photo of the {}.',
    'a photo of a {}.', 'the origami {}.', 'the {} in a video game.', 'a sketch of a {}.', 'a doodle of the {}.',
    'a origami {}.', 'a low resolution photo of a {}.', 'the toy {}.', 'a rendition of the {}.',
    'a photo of the clean {}.', 'a photo of a large {}.', 'a rendition of a {}.', 'a photo of a nice {}.',
    'a photo of a weird {}.', 'a blurry photo of a {}.', 'a cartoon {}.', 'art of a {}.', 'a sketch of the {}.',
    'a embroidered {}.', 'a pixelated photo of a {}.', 'itap of the {}.', 'a jpeg corrupted photo of the {}.',
    'a good photo of a {}.', 'a plushie {}.', 'a photo of the nice {}.', 'a photo of the small {}.',
    'a photo of the weird {}.', 'the cartoon {}.', 'art of the {}.', 'a drawing of the {}.',
    'a photo of the large {}.', 'a black and white photo of a {}.', 'the plushie {}.', 'a dark photo of a {}.',
    'itap of a {}.', 'graffiti of the {}.', 'a toy {}.', 'itap of my {}.', 'a photo of a cool {}.',
    'a photo of a small {}.', 'a tattoo of the {}.', 'there is a {} in the scene.',
    'there is the {} in the scene.', 'this is a {} in the scene.', 'this is the {} in the scene.',
    'this is one {} in the scene.',
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_transform(n_px: int = 224):
    """CLIP-Surgery clip._transform: resize the whole image (no crop), RGB, to tensor, normalise."""
    return Compose([
        Resize((n_px, n_px), interpolation=InterpolationMode.BICUBIC),
        lambda image: image.convert("RGB"),
        ToTensor(),
        Normalize(CLIP_MEAN, CLIP_STD),
    ])


# ------------------------------------------------------------------------------------------------
# CLIP layers from a state dict


def _ln(x: torch.Tensor, sd: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), sd[f"{name}.weight"], sd[f"{name}.bias"], 1e-5)


def _mlp(x: torch.Tensor, sd: Mapping[str, torch.Tensor], blk: str) -> torch.Tensor:
    h = F.linear(x, sd[f"{blk}.mlp.c_fc.weight"], sd[f"{blk}.mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return F.linear(h, sd[f"{blk}.mlp.c_proj.weight"], sd[f"{blk}.mlp.c_proj.bias"])


def _heads(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    return sd[f"{prefix}resblocks.0.ln_1.weight"].shape[0] // 64  # CLIP: 64 channels per head


def _mha(x_lnd: torch.Tensor, sd: Mapping[str, torch.Tensor], blk: str, heads: int,
         mask: torch.Tensor | None = None) -> torch.Tensor:
    """nn.MultiheadAttention(x, x, x) with CLIP's in_proj/out_proj, LND layout."""
    L, N, D = x_lnd.shape
    hd = D // heads
    qkv = F.linear(x_lnd, sd[f"{blk}.attn.in_proj_weight"], sd[f"{blk}.attn.in_proj_bias"])  # (L, N, 3D)
    q, k, v = qkv.chunk(3, dim=-1)
    q, k, v = (t.reshape(L, N * heads, hd).transpose(0, 1) for t in (q, k, v))  # (N*h, L, hd)
    att = (q * hd**-0.5) @ k.transpose(1, 2)
    if mask is not None:
        att = att + mask
    out = att.softmax(dim=-1) @ v  # (N*h, L, hd)
    out = out.transpose(0, 1).reshape(L, N, D)
    return F.linear(out, sd[f"{blk}.attn.out_proj.weight"], sd[f"{blk}.attn.out_proj.bias"])


def _surgery_attention(x_nld: torch.Tensor, sd: Mapping[str, torch.Tensor], blk: str, heads: int):
    """CLIP-Surgery's Attention.forward (NLD): [v-v output, original output], both through proj."""
    B, N, C = x_nld.shape
    qkv = F.linear(x_nld, sd[f"{blk}.attn.in_proj_weight"], sd[f"{blk}.attn.in_proj_bias"])
    qkv = qkv.reshape(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    scale = (C // heads) ** -0.5
    attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    attn = ((v @ v.transpose(-2, -1)) * scale).softmax(dim=-1)
    x_ori = (attn_ori @ v).transpose(1, 2).reshape(B, N, C)
    x = (attn @ v).transpose(1, 2).reshape(B, N, C)
    w, b = sd[f"{blk}.attn.out_proj.weight"], sd[f"{blk}.attn.out_proj.bias"]
    return F.linear(x, w, b), F.linear(x_ori, w, b)


@torch.no_grad()
def cs_encode_image(sd: Mapping[str, torch.Tensor], image: torch.Tensor, surgery_blocks: int = 6) -> torch.Tensor:
    """CLIP-Surgery VisionTransformer.forward: (N, 3, 224, 224) -> (N, 1+HW, D)."""
    x = F.conv2d(image, sd["visual.conv1.weight"], stride=sd["visual.conv1.weight"].shape[-1])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = sd["visual.class_embedding"].to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + sd["visual.positional_embedding"].to(x.dtype)
    x = _ln(x, sd, "visual.ln_pre")
    x = x.permute(1, 0, 2)  # NLD -> LND
    n_blocks = len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")})
    heads = _heads(sd, "visual.transformer.")
    x_ori = None
    for i in range(n_blocks):
        blk = f"visual.transformer.resblocks.{i}"
        if i < n_blocks - surgery_blocks:  # single path
            x = x + _mha(_ln(x, sd, f"{blk}.ln_1"), sd, blk, heads)
            x = x + _mlp(_ln(x, sd, f"{blk}.ln_2"), sd, blk)
            continue
        src = x if x_ori is None else x_ori  # start of the dual path reads x, later blocks x_ori
        x_res, x_ori_res = _surgery_attention(_ln(src, sd, f"{blk}.ln_1").transpose(0, 1), sd, blk, heads)
        x_res, x_ori_res = x_res.transpose(0, 1), x_ori_res.transpose(0, 1)
        x_ori = src + x_ori_res
        x_ori = x_ori + _mlp(_ln(x_ori, sd, f"{blk}.ln_2"), sd, blk)
        x = x + x_res  # skip ffn for the new path
    x = x.clone()
    x[0, :, :] = x_ori[0, :, :]
    x = x.permute(1, 0, 2)
    x = _ln(x, sd, "visual.ln_post")
    return x @ sd["visual.proj"]


def _causal_mask(n: int) -> torch.Tensor:
    mask = torch.empty(n, n)
    mask.fill_(float("-inf"))
    return mask.triu_(1)


@torch.no_grad()
def encode_text_embeddings(sd: Mapping[str, torch.Tensor], x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """CLIP text transformer on input embeddings (N, L, W) (positional embedding added here)."""
    L = x.shape[1]
    x = x + sd["positional_embedding"][:L]
    x = x.permute(1, 0, 2)
    n_blocks = len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})
    heads = _heads(sd, "transformer.")
    mask = _causal_mask(L)
    for i in range(n_blocks):
        blk = f"transformer.resblocks.{i}"
        x = x + _mha(_ln(x, sd, f"{blk}.ln_1"), sd, blk, heads, mask)
        x = x + _mlp(_ln(x, sd, f"{blk}.ln_2"), sd, blk)
    x = _ln(x.permute(1, 0, 2), sd, "ln_final")
    return x[torch.arange(x.shape[0]), eot] @ sd["text_projection"]


def clip_tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Token ids (N, 77) with SOT/EOT, as clip.tokenize (open_clip's tokenizer shares the OpenAI BPE)."""
    return tokenizer(list(texts))


@torch.no_grad()
def encode_text(sd: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    eot = ids.argmax(dim=-1)  # the EOT token has the highest id
    L = int(eot.max()) + 1  # causal: later positions never reach these outputs
    x = F.embedding(ids[:, :L], sd["token_embedding.weight"])
    return encode_text_embeddings(sd, x, eot)


# ------------------------------------------------------------------------------------------------
# CLIP-Surgery clip.py helpers


@torch.no_grad()
def encode_text_with_prompt_ensemble(sd, tokenizer, texts: Sequence[str], cache: dict | None = None) -> torch.Tensor:
    out = []
    for t in texts:
        if cache is not None and t in cache:
            out.append(cache[t])
            continue
        class_embeddings = encode_text(sd, clip_tokenize(tokenizer, [tpl.format(t) for tpl in CLIP_SURGERY_TEMPLATES]))
        class_embeddings = class_embeddings / class_embeddings.norm(dim=-1, keepdim=True)
        class_embedding = class_embeddings.mean(dim=0)
        class_embedding = class_embedding / class_embedding.norm()
        if cache is not None:
            cache[t] = class_embedding
        out.append(class_embedding)
    return torch.stack(out, dim=1).t()


def get_similarity_map(sm: torch.Tensor, shape) -> torch.Tensor:
    sm = (sm - sm.min(1, keepdim=True)[0]) / (sm.max(1, keepdim=True)[0] - sm.min(1, keepdim=True)[0])
    side = int(sm.shape[1] ** 0.5)
    sm = sm.reshape(sm.shape[0], side, side, -1).permute(0, 3, 1, 2)
    sm = F.interpolate(sm, shape, mode="bilinear")
    return sm.permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------------
# PQ-Map.py


def load_embed(state_dict: dict) -> torch.Tensor:
    params = state_dict["params"]
    ctx, token_prefix, token_suffix = (params[f"prompt_learner.{k}"] for k in ("ctx", "token_prefix", "token_suffix"))
    name_len, half_n_ctx = 3, 8
    return torch.cat([token_prefix, ctx[:, :half_n_ctx], token_suffix[:, :name_len],
                      ctx[:, half_n_ctx:], token_suffix[:, name_len:]], dim=1).float()


def pq_encode_text(sd, text_embed: torch.Tensor) -> torch.Tensor:
    return encode_text_embeddings(sd, text_embed, torch.tensor([20, 20]))


_PQ_TEXT: dict[tuple[int, int], torch.Tensor] = {}


def _pq_text_cache(sd, text_embed: torch.Tensor) -> torch.Tensor:
    """The script encodes the prompts on every call; the result does not depend on the image."""
    key = (id(sd), id(text_embed))
    if key not in _PQ_TEXT:
        _PQ_TEXT[key] = pq_encode_text(sd, text_embed)
    return _PQ_TEXT[key]


@torch.no_grad()
def perceptual_quality_map(sd, embeds: Sequence[torch.Tensor], pil_img: Image.Image, multi: bool = False,
                           shape=None, image_features=None) -> tuple[np.ndarray, float, list[float]]:
    """(map, score, [ps0..ps3]) of PQ-Map.py; ``shape`` None = the script's own ``pil_img.size``.

    ``image_features``: the raw CLIP-Surgery output for ``pil_img`` when already computed.
    """
    if image_features is None:
        image_features = cs_encode_image(sd, clip_transform()(pil_img).unsqueeze(0))
    image_features = image_features / image_features.norm(dim=1, keepdim=True)
    shape = pil_img.size if shape is None else shape

    def single(text_embed):
        text_features = _pq_text_cache(sd, text_embed)
        features = image_features @ text_features.t()
        similarity_map = get_similarity_map(features[:, 1:, :], shape)
        feature_per = features[0][0]
        score = float(torch.exp(feature_per)[0] / torch.sum(torch.exp(feature_per)))
        return similarity_map[0, :, :, 0], score

    pm0, ps0 = single(embeds[0])
    ps = [ps0] + [single(e)[1] for e in embeds[1:]]
    if not multi:
        return pm0.numpy(), ps0, ps
    bound1 = 0.935 * 1.0
    t = min(ps[1] / bound1, 1) * min(ps[2] / bound1, 1) * min(ps[3] / bound1, 1)
    return pm0.numpy(), ps0 * t, ps


# ------------------------------------------------------------------------------------------------
# AQ-Map.py


def partition(sentence: str, noun_phrases: list[str]) -> list[str]:
    if len(noun_phrases) == 1 or len(noun_phrases) == 0:
        return [sentence]
    parts = []
    cur_part_index = 0
    cur_find_begin_index = 0
    for phrase_idx, cur_noun_phrase in enumerate(noun_phrases):
        find_index = sentence.find(cur_noun_phrase, cur_find_begin_index)
        assert find_index != -1
        if phrase_idx == 0:
            cur_part_index = 0
            cur_find_begin_index = find_index + len(cur_noun_phrase)
        elif phrase_idx == len(noun_phrases) - 1:
            parts.append(sentence[cur_part_index:find_index].strip())
            cur_part_index = find_index
            parts.append(sentence[cur_part_index:].strip())
        else:
            parts.append(sentence[cur_part_index:find_index].strip())
            cur_part_index = find_index
            cur_find_begin_index = find_index + len(cur_noun_phrase)
    return parts


def remove_stopwords_and_punctuation(phrases: list[str], stop_words) -> list[str]:
    return [" ".join(w for w in phrase.split(" ") if w not in stop_words and w not in string.punctuation)
            for phrase in phrases]


def get_phrase_parent(parts, filtered_parts, root, token_to_pos, nlp) -> dict[str, str]:
    phrase_to_parent, word_to_phrase = {}, {}
    for phrase, filtered_phrase in zip(parts, filtered_parts):
        phrase_to_parent[filtered_phrase] = filtered_phrase
        for token in nlp(phrase.strip()):
            word_to_phrase[token.text] = filtered_phrase
    node_queue = [root]
    while node_queue:
        cur_node = node_queue[0]
        _ = word_to_phrase[str(cur_node)]  # the script reads it (and fails here on a missing word)
        for child in list(cur_node.children):
            node_queue.append(child)
            if word_to_phrase[str(list(child.ancestors)[0])] != word_to_phrase[str(child)]:
                for cur_ancestor in list(child.ancestors):
                    if token_to_pos[str(cur_ancestor)] in ("NOUN", "PROPN"):
                        phrase_to_parent[word_to_phrase[str(child)]] = word_to_phrase[str(cur_ancestor)]
                        break
        node_queue = node_queue[1:]
    return phrase_to_parent


def parse_reference(query: str, nlp, stop_words) -> tuple[list[str], dict[str, str], list[str]]:
    """(filtered parts, phrase -> parent phrase, noun parts) of AQ-Map.py's __main__."""
    doc = nlp(query)
    noun_phrases = [chunk.text for chunk in doc.noun_chunks]
    parts = partition(query, noun_phrases)
    filtered_parts = remove_stopwords_and_punctuation(parts, stop_words)
    token_to_pos = {token.text: token.pos_ for token in doc}
    parents = get_phrase_parent(parts, filtered_parts, list(doc.sents)[0].root, token_to_pos, nlp)
    noun_parts = []
    for filtered_part in filtered_parts:
        tmp = ""
        for item in filtered_part.split(" "):
            if token_to_pos[item] in ("NOUN", "PROPN"):
                tmp = item
        noun_parts.append(tmp)
    return filtered_parts, parents, noun_parts


@torch.no_grad()
def alignment_map(sd, tokenizer, image_features: torch.Tensor, hw, texts, cache=None):
    """AQ-Map.py alignment_map on precomputed CLIP-Surgery features: (float maps (H, W, T), scores (T,))."""
    image_features = image_features / image_features.norm(dim=1, keepdim=True)
    text_features = encode_text_with_prompt_ensemble(sd, tokenizer, texts, cache)
    redundant_features = encode_text_with_prompt_ensemble(sd, tokenizer, [""], cache)
    features = image_features @ (text_features - redundant_features).t()
    similarity_map = get_similarity_map(features[:, 1:, :], hw)
    feature_ali = features[0][0]
    alignment_score = torch.exp(10 * feature_ali) / (torch.exp(10 * feature_ali) + 1)
    return similarity_map[0].numpy(), alignment_score.numpy()


@torch.no_grad()
def aq_reference(sd, tokenizer, nlp, stop_words, pil_img: Image.Image, query: str,
                 a_bound: float = 0.5, beta: float = 0.5, cache=None, exact_ties: bool = False) -> dict:
    """Everything the reference computes for one image and prompt (raises where the script crashes).

    ``exact_ties``: a phrase whose text is its noun ("tower") has a_phs == a_pns mathematically, but
    the script computes the two in separate matrix products, so ``as1[j] < as0[j]`` is decided by
    float rounding; True decides the tie as equal (no adjective defect), as the maths says.
    """
    phrases, parents, noun_parts = parse_reference(query, nlp, stop_words)
    image_features = cs_encode_image(sd, clip_transform()(pil_img).unsqueeze(0))
    hw = (pil_img.height, pil_img.width)  # cv2_img.shape[:2]
    am, as0 = alignment_map(sd, tokenizer, image_features, hw, noun_parts, cache)
    _, as1 = alignment_map(sd, tokenizer, image_features, hw, phrases, cache)
    _, prompt_score = alignment_map(sd, tokenizer, image_features, hw, [query], cache)
    index = {ph: j for j, ph in enumerate(phrases)}
    defects, selected = [], []
    for j, ph in enumerate(phrases):
        if as0[j] < a_bound:
            defects.append("noun-unmatched")
            selected.append(am[:, :, index[parents[ph]]])
        elif as1[j] < as0[j] and not (exact_ties and ph == noun_parts[j]):
            defects.append("adjective-unmatched")
            selected.append(am[:, :, j])
        else:
            defects.append(None)
    A = np.max(np.stack(selected), axis=0) if selected else np.zeros(hw, dtype=np.float32)
    cask = float(np.prod([min(float(s) / beta, 1.0) for s in as1]))
    return {"phrases": phrases, "parents": [parents[ph] for ph in phrases], "nouns": noun_parts,
            "a_pns": as0.tolist(), "a_phs": as1.tolist(), "defects": defects, "A": A,
            "noun_maps": am, "a": float(prompt_score[0]) * cask}
