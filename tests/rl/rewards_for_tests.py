"""A user reward, loaded by 'module:function' like any user's. Unlike correctness, it differs between
a random model's samples, so every group carries a learning signal."""


def odd_chars(prompt, completion, **fields):
    """How many characters of the completion have an odd code point."""
    return float(sum(ord(c) % 2 for c in completion))


def odd_chars_on_even_prompts(prompt, completion, **fields):
    """``odd_chars`` for prompts of even length, 0 for the others: their groups score alike (zero
    advantage), the rest differ, so a step holds both kinds."""
    return odd_chars(prompt, completion) if len(prompt) % 2 == 0 else 0.0
