"""A user reward, loaded by 'module:function' like any user's. Unlike correctness, it differs between
a random model's samples, so every group carries a learning signal."""


def odd_chars(prompt, completion, **fields):
    """How many characters of the completion have an odd code point."""
    return float(sum(ord(c) % 2 for c in completion))
