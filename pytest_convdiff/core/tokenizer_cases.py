"""Tricky strings that expose tokenizer conversion bugs, by category.

The kinds llama.cpp's own tokenizer tests use: whitespace runs, emoji with ZWJ
sequences, digit runs, punctuation runs, contractions, CJK and other scripts,
diacritics, NBSP, BOM, control characters, special-token text inside input,
and the empty string. Each category becomes one ``tokenizer[<category>]`` item.
"""

from __future__ import annotations

TOKENIZER_CASES: dict[str, tuple[str, ...]] = {
    "empty": ("",),
    "whitespace": (" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\n\n\n", " \n \t ", "Hello  world", "a\n\n b\t\tc",
                   "   leading", "trailing   ", "\r\n", "x \n\n\n y"),
    "digits": ("1", "12", "123", "1234", "12345", "123456", "1234567", "12345678", "123456789",
               "3.3", "3..3", "3...3", "2024-03-05", "1,000,000", "0x1F", "-42", "1e-5"),
    "punctuation": ("!!!", "???", "...", "!?!?", "---", "***", "(((", ")))", "[[]]", "{}", "<>", ";;;;",
                    "a,b;c:d", "''", "\"\"", "``", "~~~~", "@#$%^&*"),
    "contractions": ("don't", "I'm", "you're", "we'll", "they've", "she'd", "'s", "'RE", "'lL", "'VE",
                     "DON'T", "It'S", "o'clock"),
    "emoji": ("🙂", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇫🇷", "a🙂b", "🙂🙂🙂"),
    "cjk": ("你好，世界", "日本語のテキスト", "한국어 문장", "中文 mixed with English"),
    "scripts": ("ការបកប្រែ", "Здравей, свят", "Γειά σου Κόσμε", "مرحبا بالعالم", "שלום", "नमस्ते दुनिया",
                "สวัสดี"),
    "diacritics": ("Tiếng Việt có dấu", "naïve café résumé", "Ångström", "ß straße", "Ł ódź",
                   "e\u0301", "n\u0303o"),
    "nbsp": ("a\u00a0b", "\u00a0", "10\u00a0km", "\u202fx", "a\u2009b"),
    "bom": ("\ufeff", "\ufeffHello", "a\ufeffb"),
    "control": ("\x00", "a\x01b", "\x07", "\x1b[0m", "\x7f", "a\x0bb", "a\x0cb"),
    "special_text": ("<s>", "</s>", "<|im_start|>", "<|im_end|>", "text <s> inside", "<|endoftext|>",
                     "<unk>", "<pad>"),
    "mixed_case": ("HELLO", "hello", "HeLLo WoRLD", "camelCaseName", "snake_case_name", "ALL_CAPS_42"),
    "code": ("def f(x):\n    return x", "if (a && b) { c++; }", "x := <-ch", "#include <stdio.h>", "a->b", "i += 1"),
}
