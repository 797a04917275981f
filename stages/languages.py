"""Which Unicode script each target language is written in."""

# Unicode script (the first word of a character's name) that each language is written in.
SCRIPTS = {
    "en": {"LATIN"}, "fr": {"LATIN"}, "de": {"LATIN"}, "es": {"LATIN"}, "it": {"LATIN"},
    "pt": {"LATIN"}, "id": {"LATIN"}, "vi": {"LATIN"}, "tr": {"LATIN"},
    "th": {"THAI"}, "zh": {"CJK"}, "ja": {"CJK", "HIRAGANA", "KATAKANA"}, "ko": {"HANGUL"},
    "ru": {"CYRILLIC"}, "uk": {"CYRILLIC"}, "ar": {"ARABIC"}, "fa": {"ARABIC"},
    "hi": {"DEVANAGARI"}, "el": {"GREEK"}, "he": {"HEBREW"},
}
