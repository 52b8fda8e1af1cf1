"""A prompt for a LoRA when the user gives none: its trigger words from the
file's metadata (``modelspec.trigger_phrase``, else the most frequent
training tags in kohya's ``ss_tag_frequency``), else a generic prompt."""
from __future__ import annotations

import json

GENERIC_PROMPT = "a detailed picture of a person in a room, high quality"
TOP_TAGS = 6


def trigger_prompt(metadata: dict[str, str] | None, top: int = TOP_TAGS) -> str | None:
    """The LoRA's trigger words from its metadata, or None when it names none."""
    metadata = metadata or {}
    phrase = str(metadata.get("modelspec.trigger_phrase") or "").strip()
    if phrase:
        return phrase
    try:
        datasets = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        return None     # malformed training metadata is not the user's problem here
    counts: dict[str, float] = {}
    for tags in datasets.values() if isinstance(datasets, dict) else ():
        for tag, n in (tags.items() if isinstance(tags, dict) else ()):
            if isinstance(n, (int, float)) and str(tag).strip():
                counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + n
    best = sorted(counts, key=lambda t: (-counts[t], t))[:top]
    return ", ".join(best) or None


def prompt_for(given: str, metadata: dict[str, str] | None) -> tuple[str, str]:
    """(prompt, where it came from): the given text, the trigger words, or generic."""
    if given and given.strip():
        return given.strip(), "given"
    found = trigger_prompt(metadata)
    return (found, "trigger words") if found else (GENERIC_PROMPT, "generic")
