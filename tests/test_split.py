import pytest

from napari_rmt.data import NapariRmtError, Tile
from napari_rmt.data.split import pick_labelled, split_by_group


def _tiles(n_groups=10, per=4):
    return [
        Tile(id=g * per + k + 1, name=f"{g}_{k}", width=8, height=8, meta={"src": f"g{g}"})
        for g in range(n_groups)
        for k in range(per)
    ]


def test_split_keeps_groups_together_and_is_seeded():
    tiles = _tiles()
    tr, va, te = split_by_group(tiles, "src", seed=3)
    assert (len(tr), len(va), len(te)) == (28, 4, 8)
    groups = [{t.meta["src"] for t in part} for part in (tr, va, te)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert [t.id for t in split_by_group(tiles, "src", seed=3)[2]] == [t.id for t in te]
    assert [t.id for t in split_by_group(tiles, "src", seed=4)[2]] != [t.id for t in te]


def test_pick_labelled_fraction_by_group_and_by_tile():
    tiles = _tiles()
    lab, unl = pick_labelled(tiles, 0.2, "src", seed=0)
    assert len(lab) == 8 and len(unl) == 32 and len({t.meta["src"] for t in lab}) == 2
    lab, unl = pick_labelled(tiles, 0.1, None, seed=0)
    assert len(lab) == 4 and {t.id for t in lab}.isdisjoint({t.id for t in unl})
    lab, _ = pick_labelled(tiles, 0.001, "src")
    assert len(lab) == 4  # at least one group


def test_split_errors_name_the_problem():
    with pytest.raises(NapariRmtError, match="has no 'nope' field"):
        split_by_group(_tiles(), "nope")
    with pytest.raises(NapariRmtError, match="fraction 0"):
        pick_labelled(_tiles(), 0.0)
