"""The "positive words" task: its word lists, prompts, sampled completions and gold metric.

A prompt such as ``"Describe the river:"`` is answered by a short sentence made of words from three lists
(positive, negative, neutral). The gold metric is the share of positive minus the share of negative words, so a
policy improves by using more positive and fewer negative words.

Nothing here imports torch or transformers, so that `positive_reward` stays cheap to import.
"""

from __future__ import annotations

import random
import re

POSITIVE_WORDS: tuple[str, ...] = (
    "good", "happy", "great", "kind", "bright", "joyful", "lovely", "warm", "gentle", "brave",
    "calm", "cheerful", "wonderful", "friendly", "sunny", "sweet", "fresh", "clever", "proud", "glad",
    "hopeful", "nice", "excellent", "delightful", "beautiful", "peaceful", "fun", "amazing", "love", "smile",
)  # fmt: skip
NEGATIVE_WORDS: tuple[str, ...] = (
    "bad", "sad", "awful", "angry", "terrible", "cruel", "dark", "cold", "ugly", "nasty",
    "gloomy", "bitter", "lonely", "rude", "horrible", "dull", "grim", "harsh", "mean", "poor",
    "sick", "scary", "broken", "boring", "dirty", "evil", "weak", "hate", "worst", "tired",
)  # fmt: skip
NEUTRAL_WORDS: tuple[str, ...] = (
    "table", "river", "blue", "seven", "chair", "window", "paper", "stone", "green", "three",
    "door", "road", "tree", "water", "cloud", "book", "clock", "wall", "car", "bridge",
    "garden", "red", "yellow", "five", "two", "city", "house", "street", "train", "box",
    "cup", "lamp", "hill", "field", "boat", "shoe", "glass", "sand", "wood", "metal",
)  # fmt: skip

# Prompts = templates x topics (10 x 40 = 400 distinct prompts). "{a}" becomes "a"/"an" to keep them grammatical.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "Describe the {t}:",
    "Tell me about {a} {t}:",
    "Write a sentence about the {t}:",
    "What do you think of the {t}?",
    "Say something about {a} {t}:",
    "Comment on the {t}:",
    "Give your opinion of the {t}:",
    "Describe {a} {t} in a few words:",
    "How was the {t}?",
    "Write about the {t}:",
)
TOPICS: tuple[str, ...] = (
    "river", "dog", "cat", "city", "garden", "teacher", "storm", "morning", "school", "forest",
    "ocean", "friend", "market", "winter", "train", "house", "mountain", "song", "book", "dinner",
    "park", "village", "day", "robot", "painting", "bridge", "festival", "kitchen", "library", "journey",
    "summer", "neighbor", "game", "movie", "beach", "museum", "farm", "party", "road", "sky",
)  # fmt: skip

MIN_WORDS, MAX_WORDS = 4, 10  # completion length in words

_POSITIVE = frozenset(POSITIVE_WORDS)
_NEGATIVE = frozenset(NEGATIVE_WORDS)
_WORD_RE = re.compile(
    r"[a-z0-9]+"
)  # a "word" is a maximal run of ASCII letters/digits: punctuation is ignored


def words_of(text: str) -> list[str]:
    """Lower-cased words of `text`, punctuation and whitespace dropped."""
    return _WORD_RE.findall(text.lower())


def gold_score(completion: str) -> float:
    """The task's gold metric: (#positive - #negative) / max(1, #words), in [-1, 1].

    Word-level and case-insensitive; punctuation is ignored ("Good, happy!" has two positive words).
    """
    words = words_of(completion)
    n_pos = sum(w in _POSITIVE for w in words)
    n_neg = sum(w in _NEGATIVE for w in words)
    return (n_pos - n_neg) / max(1, len(words))


def positive_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """Reward function for `reward_fn=ppo_cli.tiny.task:positive_reward`: the gold score of each completion."""
    del prompts  # the gold metric does not depend on the prompt
    return [gold_score(c) for c in completions]


def all_prompts() -> list[str]:
    """Every distinct prompt of the task, in a fixed order."""
    prompts = []
    for template in PROMPT_TEMPLATES:
        for topic in TOPICS:
            article = "an" if topic[0] in "aeiou" else "a"
            prompts.append(template.format(t=topic, a=article))
    return prompts


def sample_completion(rng: random.Random) -> str:
    """A mixed completion: 4-10 words, each from a uniformly chosen list, e.g. ``" good river sad."``.

    The leading space matters: prompt + completion then tokenizes as cleanly as the two parts do apart
    (byte-level BPE keeps the space with the following word).
    """
    n_words = rng.randint(MIN_WORDS, MAX_WORDS)
    lists = (POSITIVE_WORDS, NEGATIVE_WORDS, NEUTRAL_WORDS)
    words = [rng.choice(rng.choice(lists)) for _ in range(n_words)]
    return " " + " ".join(words) + "."
