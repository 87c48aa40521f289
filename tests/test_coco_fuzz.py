"""Fuzzing the COCO reader: malformed input only ever raises the plugin's own error."""

import copy
import warnings

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from napari_rmt.data import AnnotationError, DataWarning, parse_coco

VALID = {
    "info": {},
    "images": [
        {"id": 1, "file_name": "a.png", "width": 20, "height": 10},
        {"id": 2, "file_name": "b.png", "width": 20, "height": 10},
    ],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0},
        {"id": 2, "image_id": 2, "category_id": 2, "bbox": [2, 2, 3, 3], "area": 9, "iscrowd": 0},
    ],
    "categories": [{"id": 1, "name": "tumor"}, {"id": 2, "name": "stromal"}],
}

json_scalars = (
    st.none() | st.booleans() | st.integers(-5, 50) | st.floats(allow_nan=True) | st.text(max_size=5)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
KEYS = [
    "images",
    "annotations",
    "categories",
    "id",
    "image_id",
    "category_id",
    "bbox",
    "file_name",
    "width",
    "height",
    "name",
    "score",
    "iscrowd",
    "color",
    "napari_rmt_status",
    "napari_rmt_origin",
]


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


ALL_PATHS = [p for p in _paths(VALID) if p]


def _parse(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        try:
            parse_coco(data, source="fuzz.json")
        except AnnotationError as exc:
            assert "fuzz.json" in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(ALL_PATHS), json_values, st.booleans()), min_size=1, max_size=4))
def test_mutated_coco_raises_only_annotation_error(mutations):
    data = copy.deepcopy(VALID)
    for path, value, delete in mutations:
        parent = data
        try:
            for key in path[:-1]:
                parent = parent[key]
            if delete:
                del parent[path[-1]]
            else:
                parent[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed this path
    _parse(data)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=5) | json_values)
def test_arbitrary_json_raises_only_annotation_error(data):
    _parse(data)
