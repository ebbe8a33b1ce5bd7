"""Which rows of a decode batch share a prompt prefix long enough to attend over it together.

Plain Python over token lists: rows are sorted by prompt, neighbours' common prefixes measured,
and runs of rows whose common prefix stays at least `min_prefix_tokens` long become one group.
Reading a group's prefix once saves (rows - 1) x prefix tokens' keys and values per layer; below
`min_saved_tokens` the few extra operations of a group cost more than they save.
"""

from __future__ import annotations

from collections.abc import Sequence

from model.decode import SharedPrefix
from service.engine.slot_pool import common_prefix_length

MIN_PREFIX_TOKENS = 128
MIN_SAVED_TOKENS = 1024


def find_shared_prefixes(
    prompts: Sequence[list[int]],
    slots: Sequence[int],
    positions: Sequence[int],
    min_prefix_tokens: int = MIN_PREFIX_TOKENS,
    min_saved_tokens: int = MIN_SAVED_TOKENS,
) -> list[SharedPrefix]:
    """Groups of rows (indices into the batch) whose prompts share a prefix; each group reads
    it from one of its rows' slots. A prefix never reaches past a row's position (the token fed
    now), so every key it covers is already in the cache."""
    order = sorted(range(len(prompts)), key=lambda row: prompts[row])
    groups: list[SharedPrefix] = []

    def close(run: list[int], length: int) -> None:
        if len(run) >= 2 and length * (len(run) - 1) >= min_saved_tokens:
            groups.append(SharedPrefix(tuple(sorted(run)), slots[run[0]], length))

    run: list[int] = order[:1]
    length = 0
    for row in order[1:]:
        previous = run[-1]
        shared = common_prefix_length(prompts[previous], prompts[row])
        shared = min(shared, positions[previous], positions[row])
        if len(run) > 1:
            shared = min(shared, length)
        if shared >= min_prefix_tokens:
            run.append(row)
            length = shared
        else:
            close(run, length)
            run, length = [row], 0
    close(run, length)
    return groups
