"""How many phantom cases go to each split, and which ones."""

from __future__ import annotations

import numpy as np

SPLITS: tuple[str, ...] = ("pretrain", "train", "val", "test")


def default_split(n_cases: int) -> dict[str, int]:
    """Case counts per split: test 20 %, val 10 %, train 20 % (each at least 1), pretrain the rest.

    Gives the ``smoke`` (8) and ``cpu`` (40) profiles' splits. Raises ValueError below 4 cases.
    """
    if n_cases < 4:
        raise ValueError(
            f"the phantom needs at least 4 cases for a pretrain/train/val/test split, got"
            f" {n_cases}; pass more cases or an explicit split"
        )
    test = max(1, round(0.2 * n_cases))
    val = max(1, round(0.1 * n_cases))
    train = max(1, round(0.2 * n_cases))
    return {"pretrain": n_cases - test - val - train, "train": train, "val": val, "test": test}


def _check_split(split: dict[str, int], n_cases: int) -> dict[str, int]:
    unknown = set(split) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; use {list(SPLITS)}")
    counts = {name: int(split.get(name, 0)) for name in SPLITS}
    if min(counts.values()) < 0 or sum(counts.values()) != n_cases:
        raise ValueError(
            f"split counts {counts} must be non-negative and add up to {n_cases} cases"
        )
    return counts


def _assign_splits(n_cases: int, counts: dict[str, int], seed: int) -> list[str]:
    """Split name of every case: the counts of ``counts`` in a seeded random order."""
    order = np.random.default_rng([seed, n_cases, 0x5EED]).permutation(n_cases)
    names = [name for name in SPLITS for _ in range(counts[name])]
    split_of = [""] * n_cases
    for position, index in enumerate(order):
        split_of[int(index)] = names[position]
    return split_of
