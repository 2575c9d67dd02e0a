"""The lengths compiled FlexAttention runs trie rows at (pack.bucket). Plain arithmetic, without torch: the planner
reads it too."""


def bucket_length(n_tokens: int, bucket: int) -> int:
    """The length a row of `n_tokens` runs at under compiled FlexAttention: the next multiple of `bucket` (0: its own
    length). Compiled code is specialised to a length, so rows padded to a few lengths compile a few times."""
    return -(-n_tokens // bucket) * bucket if bucket else n_tokens


def bucket_count(max_tokens: int, bucket: int) -> int | None:
    """How many lengths rows of at most `max_tokens` tokens run at (None: any, when bucket is 0)."""
    return -(-max_tokens // bucket) if bucket else None
