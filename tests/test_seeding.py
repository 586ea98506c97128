"""One seed derivation for every random stream of a run."""

from fedtune.core.seeding import derive_seed, rng, torch_generator


def test_the_same_key_gives_the_same_seed_and_streams():
    assert derive_seed(3, "client", 2, 7) == derive_seed(3, "client", 2, 7)
    assert rng(3, "sample", 1).random() == rng(3, "sample", 1).random()
    assert torch_generator(0, "init").initial_seed() == torch_generator(0, "init").initial_seed()


def test_keys_that_an_arithmetic_scheme_would_confuse_stay_apart():
    # seed * 1_000_003 + round * 10_007 + client collides for (round 1, client 0) and (round 0, client 10_007)
    assert derive_seed(0, "client", 1, 0) != derive_seed(0, "client", 0, 10_007)
    assert derive_seed(0, "client", 1, 2) != derive_seed(0, "client", 2, 1)  # order matters
    assert derive_seed(0, "speed", 1, 2) != derive_seed(0, "availability", 1, 2)  # streams are named
    assert derive_seed(0, 1) != derive_seed(0, "1")  # an int key is not its string
    assert derive_seed(1, "sample", 1) != derive_seed(0, "sample", 1)


def test_seeds_are_pinned_across_versions():
    """A run must be reproducible from its config on any machine: the derivation is fixed."""
    assert derive_seed(0, "sample", 1) == 0x26EDBD00461D9746  # blake2b-64 of "0/str:sample/int:1", >> 1
    seeds = {derive_seed(0, "client", r, c) for r in range(50) for c in range(200)}
    assert len(seeds) == 50 * 200 and all(0 <= s < 2**63 for s in seeds)
