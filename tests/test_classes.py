import pytest

from napari_rmt.data import ClassList, ClassListError


def test_default_classes_have_the_papers_colours():
    cl = ClassList.default()
    assert cl.names == ["tumor", "stromal", "lymphocyte"]
    assert cl.ids == [1, 2, 3]
    tumor, stromal, lymph = (cl.by_name(n).colour for n in cl.names)
    assert tumor[0] > 200 and tumor[1] < 60 and tumor[2] < 60  # red
    assert stromal[1] > 150 and stromal[0] < 60 and stromal[2] < 60  # green
    assert lymph[2] > 200 and lymph[0] < 60  # blue


def test_add_rename_recolour_keep_ids_stable():
    cl = ClassList.default()
    new = cl.add("mitosis")
    assert new.id == 4 and new.colour not in {c.colour for c in list(cl)[:3]}
    cl.rename(4, "mitotic figure")
    cl.recolour(1, (1, 2, 3))
    assert cl.by_id(4).name == "mitotic figure"
    assert cl.by_id(1).colour == (1, 2, 3) and cl.by_id(1).hex == "#010203"
    assert cl.index_of(4) == 3


@pytest.mark.parametrize(
    "action, message",
    [
        (lambda cl: cl.add("Tumor"), "already used"),
        (lambda cl: cl.add("x", id=2), "used twice"),
        (lambda cl: cl.add(""), "non-empty"),
        (lambda cl: cl.recolour(1, (300, 0, 0)), "0..255"),
        (lambda cl: cl.rename(2, "tumor"), "already used"),
        (lambda cl: cl.by_id(99), "unknown class id 99"),
        (lambda cl: cl.by_name("nope"), "unknown class name 'nope'"),
    ],
)
def test_invalid_class_operations_raise_clear_errors(action, message):
    cl = ClassList.default()
    before = list(cl)
    with pytest.raises(ClassListError, match=message):
        action(cl)
    assert list(cl) == before  # nothing lost


def test_json_round_trip_and_bad_records():
    cl = ClassList.default()
    cl.recolour(2, (1, 2, 3))
    assert ClassList.from_json(cl.to_json()) == cl
    with pytest.raises(ClassListError, match="bad class list"):
        ClassList.from_json([{"id": 1, "name": "x", "color": "red"}])
