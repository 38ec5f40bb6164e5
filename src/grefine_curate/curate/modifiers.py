"""Prompt modifiers: the style tail of a text-to-image prompt, set aside before AQ-Map's phrase split.

G-Refine's Algorithm 1 (section 3.2) assumes the prompt is a sentence that describes a scene. Prompts
of public collections (DiffusionDB, Lexica, Civitai) add a tail that describes how the image should
*look*, not what is in it: quality boosters ("masterpiece", "highly detailed", "8k"), platforms
("trending on artstation"), artist credits ("by greg rutkowski and alphonse mucha", "in the style of
monet"), render and camera terms ("octane render", "85mm lens", "f/1.8", "bokeh"), lighting
("cinematic lighting"), media ("oil painting", "concept art") and Danbooru meta tags ("1girl", "solo",
"looking at viewer"). None of them has a place in the image, so none may become an AQ phrase (its
map would point at noise, and a "defect" on it would inpaint a random region), and as phrases they
become the parents of real content ("octane render" over "cat").

``split_modifiers(cleaned)`` finds them in an already cleaned prompt (``syntax.clean_prompt``) and
returns the content text (what Algorithm 1 parses) and the modifiers in prompt order. Matching is
case-insensitive and works per comma-separated tag (also ``;`` ``|`` and a sentence-ending ``.``):

1. Credits and platforms end a tag: from "by X" / "art by X" / "in the style of X" / "inspired by X"
   / "trending on artstation" to the end of the tag is a modifier. "by" is a credit only when the
   next word is not a determiner ("a house by the lake" is a place) and the word before it is not a
   participle ("surrounded by trees", "lit by candles" are content); "painted by" etc. are credits.
2. A tag made only of lexicon terms (below), numbers and glue words ("very", "and", "with", ...) is
   a modifier as a whole ("soft volumetric lighting, 8k uhd").
3. Otherwise adjectival terms (quality, render, camera, lighting) are peeled off the tag's start and
   end ("highly detailed castle, 4k" -> "castle"); a medium or style is peeled only in its
   unambiguous positions: "oil painting of a fox" -> "a fox", "a fox in watercolor" -> "a fox". An
   "oil painting hanging on a wall" stays: there the painting is a thing in the scene.

Deliberately content, not modifiers: Danbooru attribute tags that describe the subject ("long hair",
"blue eyes", "red dress"): they can be wrong in an image, which is what AQ-Map checks. A bare artist
name without "by" is recognised only for the few names in ``ARTISTS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Adjectival terms: peeled off a tag's start or end wherever they stand.
QUALITY = """masterpiece; masterwork; best quality; high quality; highest quality; top quality; ultra quality;
amazing quality; very aesthetic; aesthetic; extremely detailed; highly detailed; hyper detailed; hyperdetailed;
ultra detailed; super detailed; insanely detailed; intricately detailed; intricate details; intricate detail;
intricate; detailed; fine details; fine detail; sharp focus; in focus; focused; sharp; crisp; 4k; 8k; 16k; 32k;
hd; hdr; uhd; fhd; full hd; ultra hd; high resolution; high res; hi-res; hires; highres; absurdres;
ultra high res; award winning; award-winning; award winning photography; award winning photo; professional;
stunning; ultra realistic; ultra-realistic; hyperrealistic; hyperrealism; hyper realistic; hyper-realistic;
photorealistic; photorealism; photo realistic; photo-realistic; realistic; ultrarealistic; lifelike;
raw photo; dslr; film grain; cinematic; epic composition; perfect composition; beautiful composition;
trending; featured; artstation hq; official art; wallpaper; 8k wallpaper; unity 8k wallpaper;
national geographic; national geographic photo; warm tones; cool tones; soft colors; vibrant colors; pastel colors;
muted colors; pastel""".split(";")
RENDER = """octane render; octane; octanerender; unreal engine; unreal engine 5; unreal engine 4; ue5; ue4;
cycles render; blender render; blender; redshift; redshift render; vray; v-ray; ray tracing; raytracing; ray traced;
path tracing; global illumination; subsurface scattering; 3d render; 3d rendering; cgi; render; rendered; rendering;
volumetric; ambient occlusion; physically based rendering; pbr; zbrush; substance painter; houdini; corona render;
keyshot; lumen; rtx; rtx on; vfx; cg; c4d; cinema 4d; maya; 3ds max; marmoset; arnold render; daz3d; sketchfab""".split(";")
CAMERA = """bokeh; depth of field; shallow depth of field; dof; long exposure; macro; macro photography; macro shot;
wide angle; wide-angle; wide angle lens; wide-angle lens; ultra wide angle; telephoto; telephoto lens; fisheye;
fisheye lens; shallow dof; bokeh background; blurred background; blurry background; studio photo; tilt shift; tilt-shift; lens; canon eos 5d; canon eos r5; nikon d850; sony a7r; sony a7 iii;
kodak portra 400; portra 400; portra; kodak gold 200; kodak gold; ektar; ektachrome; kodachrome; superia;
fujifilm superia; velvia; provia; ilford hp5; tri-x; cinestill 800t; cinestill; 35mm film; film photography; analog photo; golden hour;
blue hour; motion blur; high contrast; lens flare; chromatic aberration; close up; closeup; close-up;
extreme close up; full shot; medium shot; wide shot; establishing shot; portrait photography;
studio photography; professional photography; photography; studio quality; rim light; backlit;
backlighting; god rays; crepuscular rays; soft light; studio light; dramatic light; volumetric light""".split(";")
# Nominal terms: a medium or style is a modifier as a whole tag, as "<term> of ...", or as "in <term>".
MEDIA = """oil painting; oil on canvas; acrylic painting; watercolor; watercolour; watercolor painting;
matte painting; concept art; concept artwork; digital art; digital painting; digital illustration; illustration;
pencil sketch; pencil drawing; charcoal drawing; ink drawing; line art; lineart; pixel art; vector art;
anime; anime style; manga; manga style; ukiyo-e; low poly; cel shading; cel shaded; 3d art; fantasy art;
sci-fi art; art nouveau; art deco; impressionism; impressionist; surrealism; surrealist; baroque; cyberpunk;
steampunk; synthwave; vaporwave; studio ghibli; pixar; disney; photograph; painting; sketch; artwork""".split(";")
# Danbooru meta tags (count, framing, rating): never a place in the image.
META = """solo; solo focus; looking at viewer; upper body; full body; cowboy shot; simple background;
white background; black background; rating:safe; sfw; nsfw; highres; absurdres; commentary request""".split(";")
PLATFORMS = """artstation; pixiv; cgsociety; behance; deviantart; instagram; unsplash; pinterest; dribbble;
flickr; 500px; zbrush central; polycount; artstation hd; behance hd""".split(";")
# Artists often named without "by" (a handful of the most frequent in public collections).
ARTISTS = """greg rutkowski; alphonse mucha; artgerm; wlop; makoto shinkai; ross tran; james gurney; craig mullins;
beeple; moebius; hayao miyazaki; thomas kinkade; ilya kuvshinov; krenz cushart; loish; rossdraws; sakimichan;
simon stalenhag; zdzislaw beksinski; hr giger; h.r. giger; van gogh; vincent van gogh; claude monet; rembrandt;
stanley artgerm lau; tomasz alen kopera; peter mohrbacher; jakub rozalski""".split(";")


def _terms(words: list[str]) -> list[str]:
    return sorted({w.strip().lower() for w in words if w.strip()}, key=len, reverse=True)


_ADJECTIVAL = _terms(QUALITY + RENDER + CAMERA + META + PLATFORMS + ARTISTS)
_NOMINAL = _terms(MEDIA)
_ALL = _terms(_ADJECTIVAL + _NOMINAL)


def _alternation(terms: list[str]) -> str:
    return "|".join(re.escape(t) for t in terms)


# Pattern-shaped terms: lenses, apertures, resolutions, ISO, counted people, "X lighting", "X style".
_PATTERNS = [
    r"\d+\s?mm(?:\s+lens)?", r"f\s?/\s?\d+(?:\.\d+)?", r"\d+\s?k(?:\s+resolution)?", r"\d{3,4}p", r"iso\s?\d+",
    r"\d+\s?megapixels?", r"\d+\+?(?:girls?|boys?|others?)", r"(?:[\w-]+\s+){0,2}lighting",
    r"(?:[\w-]+\s+){0,2}render(?:ing)?", r"shot\s+on\s+[\w\s.-]+", r"(?:[\w-]+\s+){0,2}(?<!hair\s)style",
    r"(?:fujifilm|fuji|canon|nikon|sony|leica|hasselblad|kodak)(?:(?:\s+[a-z-]+)?\s+[a-z-]*\d[\w-]*)?",
]
# Listed terms before patterns, so that "35mm film" is one term rather than the pattern's "35mm".
_TERM = re.compile(rf"(?<![\w/])(?:{_alternation(_ALL)}|{'|'.join(_PATTERNS)})(?![\w/])", re.IGNORECASE)
_ADJ_TERM = re.compile(rf"(?<![\w/])(?:{_alternation(_ADJECTIVAL)}|{'|'.join(_PATTERNS)})(?![\w/])", re.IGNORECASE)
_NOM_TERM = re.compile(rf"(?<![\w/])(?:{_alternation(_NOMINAL)})(?![\w/])", re.IGNORECASE)
# Words that carry no content next to modifier terms.
_GLUE = frozenset("""a an the and with very ultra hyper super extremely highly insanely incredibly beautifully
in of on at style styled quality detail details art by resolution & + x""".split())
_DETERMINERS = r"(?:the|a|an|his|her|its|their|my|our|your|this|that|these|those|some|two|three|four|many|one)"
_CREDIT_VERBS = ("painted", "drawn", "illustrated", "photographed", "designed", "sculpted", "directed", "created",
                 "made", "shot", "rendered", "inspired", "influenced")
_IRREGULAR_PARTICIPLES = frozenset({"lit", "held", "built", "caught", "led", "hit", "run", "fed", "struck", "bound"})
# "by X": a credit unless X starts with a determiner or the word before is a participle (agent).
_CREDIT = re.compile(
    r"(?:\b(?:art|artwork|painting|illustration|photo|photograph|concept\s+art|digital\s+art)\s+)?"
    r"(?:\b(?:in\s+the\s+style\s+of|in\s+style\s+of|style\s+of|inspired\s+by|influenced\s+by)\b"
    rf"|\bby\b(?!\s+{_DETERMINERS}\b))(?=\s*\S)",  # the credit runs from here to the end of the tag
    re.IGNORECASE,
)
_PLATFORM = re.compile(
    rf"\b(?:trending|featured|popular|top\s+rated)?\s*(?:on|from|at)\s+(?:{_alternation(_terms(PLATFORMS))})\b.*$"
    rf"|\b(?:trending|featured)\s+on\s+\w+.*$",
    re.IGNORECASE,
)
# A term at a tag's start (after glue words), or "<medium> of"; a term at its end, or "in <medium>".
_LEAD = re.compile(rf"(?:(?:a|an|the|very|ultra|hyper|highly|extremely|and|with)\s+)*"
                   rf"(?:{_ADJ_TERM.pattern}|(?:{_NOM_TERM.pattern})\s+of\b)", re.IGNORECASE)
_TRAIL = re.compile(rf"(?:\s+(?:and|with))?\s+(?:(?:{_ADJ_TERM.pattern})|(?:in|as)\s+(?:an?\s+)?(?:{_NOM_TERM.pattern})"
                    r"(?:\s+style)?|in\s+[\w-]+(?:\s+[\w-]+)?\s+style)$", re.IGNORECASE)
_SPLIT = re.compile(r"[,;|]|\.(?=\s|$)")


@dataclass(frozen=True)
class SplitPrompt:
    content: str  # the prompt without its modifiers: what the phrase split (Algorithm 1) reads
    modifiers: tuple[str, ...]  # the modifiers, in prompt order, as written


def _is_credit(seg: str, start: int) -> bool:
    """Whether the credit match at ``start`` is an artist credit rather than an agent ("chased by")."""
    m = re.match(r"\s*(?:(art|artwork|painting|illustration|photo|photograph)\s+)?by\b", seg[start:], re.IGNORECASE)
    if m is None or m.group(1):
        return True  # "in the style of ...", "art by ..."
    before = re.findall(r"[\w-]+", seg[:start])
    if not before:
        return True  # the tag starts with "by"
    prev = before[-1].lower()
    if prev in _CREDIT_VERBS:
        return True
    # "surrounded by trees", "sitting by fire": an agent or a place, not an artist
    return not (prev.endswith(("ed", "en", "ing")) or prev in _IRREGULAR_PARTICIPLES)


def _only_glue(text: str) -> bool:
    return all(w.lower() in _GLUE or w.isdigit() for w in re.findall(r"[\w&+'-]+", text))


def _peel(seg: str) -> tuple[str, list[str]]:
    """Split one tag into (content, modifiers found in it)."""
    found: list[str] = []
    # 1. Credits and platforms run to the end of the tag
    for pattern, check in ((_PLATFORM, False), (_CREDIT, True)):
        for m in pattern.finditer(seg):
            if check and not _is_credit(seg, m.start()):
                continue
            found.insert(0, seg[m.start():].strip())
            seg = seg[: m.start()]
            break
    # 2. A tag made only of terms and glue, or a short tag that names a medium ("storybook illustration")
    short_medium = re.fullmatch(rf"\s*(?!{_DETERMINERS}\b)(?:[\w'-]+\s+){{0,2}}(?:{_NOM_TERM.pattern})\s*", seg,
                                re.IGNORECASE)
    if not seg.strip():
        return "", found
    if _only_glue(seg):  # no term at all ("the", "photo of"): not ours to judge, left to the parse
        return seg.strip(), found
    if short_medium or _only_glue(_TERM.sub(" ", seg)):
        found.insert(0, seg.strip())
        return "", found
    # 3. Peel adjectival terms off the start and the end; a medium/style in its unambiguous places
    head, tail = [], []
    while True:
        s = seg.lstrip()
        m = _LEAD.match(s)
        if m is None or not s[m.end():].strip():  # never peel a tag down to nothing here (step 2 does that)
            break
        head.append(s[: m.end()].strip())
        seg = s[m.end():]
    while True:
        s = seg.rstrip()
        m = _TRAIL.search(s)
        if m is None or not s[: m.start()].strip():
            break
        tail.insert(0, s[m.start():].strip())
        seg = s[: m.start()]
    return seg.strip(), head + tail + found


def split_modifiers(cleaned: str) -> SplitPrompt:
    """Content text and modifiers of a cleaned prompt (see the module docstring)."""
    content, modifiers = [], []
    pos = 0
    pieces = []
    for m in _SPLIT.finditer(cleaned):
        pieces.append((cleaned[pos:m.start()], m.group()))
        pos = m.end()
    pieces.append((cleaned[pos:], ""))
    for seg, sep in pieces:
        kept, found = _peel(seg)
        modifiers.extend(found)
        if kept:
            content.append(kept + (sep if sep == "." else ""))
    if not modifiers:
        return SplitPrompt(content=cleaned, modifiers=())
    text = ", ".join(c.strip() for c in content if c.strip())
    text = re.sub(r"\.,", ".", text)
    return SplitPrompt(content=text.strip(" ,;"), modifiers=tuple(m for m in modifiers if m))
