"""Untrusted stores: the compiled structures a re-run indexes without bounds checks must be consistent.

scikit-learn's fitted ``Tree`` (every tree model), HistGradientBoosting's ``TreePredictor`` and
KDTree/BallTree (KNeighbors*) are arrays of the model file that compiled code (built without bounds
checks) follows: a child index, a feature, a bitset row, a point's row. A swapped model file whose arrays
point elsewhere made the mount's re-run read out of bounds or segfault (a crashed daemon takes the whole
mount down), or loop forever. ``check_loaded`` now refuses such a model with a message naming the estimator
and the field. Each test fits a real model, saves and loads it as the store does (``skops.io.dump``, then
``load_model``, which runs ``check_loaded``), then corrupts one field as a crafted file would set it (the
same ``__setstate__`` skops calls with the file's values, or the file itself) and expects a refusal.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
import sys
import textwrap
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import skops.io
from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier, RandomForestRegressor
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier
from sklearn.tree._tree import Tree

from mistiquefs.capture.skops_trust import check_loaded
from mistiquefs.capture.sklearn import load_model as load_sklearn
from mistiquefs.errors import CaptureError

from test_untrusted import schema_of, with_schema

RNG = np.random.default_rng(7)
X = RNG.standard_normal((300, 4))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
Y3 = np.digitize(X[:, 1] + 0.3 * X[:, 2], [-0.5, 0.5])


def stored(model: Any, tmp_path: Path, name: str = "model") -> Any:
    """``model`` saved and loaded back as the store does it (save_model is skops.io.dump, load_model checks
    the file's types, loads and runs check_loaded), checked to pass untouched."""
    path = tmp_path / f"{name}.skops"
    skops.io.dump(model, path)
    loaded = load_sklearn(path)
    assert check_loaded(loaded) is None
    return loaded


def refused(model: Any, pattern: str) -> str:
    why = check_loaded(model)
    assert why is not None and re.search(pattern, why), why
    return why


def set_tree_state(tree: Tree, **fields: Any) -> None:
    """What TreeNode does with a crafted file: __setstate__ with its max_depth, node_count and nodes
    (``fields`` names node fields, ``{"left_child": {0: 99}}``, or max_depth/node_count)."""
    state = tree.__getstate__()
    nodes, values = state["nodes"].copy(), state["values"].copy()
    for field, change in fields.items():
        if field in ("max_depth", "node_count"):
            state[field] = change
        else:
            for node, value in change.items():
                nodes[field][node] = value
    tree.__setstate__({**state, "nodes": nodes, "values": values})


def rebuilt_tree(tree: Tree, n_features: int | None = None, n_classes: np.ndarray | None = None) -> Tree:
    """The tree as a file whose Tree(...) arguments say another n_features or n_classes would build it."""
    state = tree.__getstate__()
    n_classes = tree.n_classes if n_classes is None else n_classes
    values = state["values"]
    if n_classes.max() != tree.max_n_classes:  # __setstate__ checks the values' shape
        values = np.zeros((len(values), tree.n_outputs, int(n_classes.max())))
    new = Tree(tree.n_features if n_features is None else n_features, n_classes, tree.n_outputs)
    new.__setstate__({**state, "nodes": state["nodes"].copy(), "values": values})
    return new


def split_nodes(tree: Tree) -> np.ndarray:
    return np.flatnonzero(tree.children_left != -1)


@pytest.fixture
def decision_tree(tmp_path: Path) -> DecisionTreeClassifier:
    return stored(DecisionTreeClassifier(max_depth=4, random_state=0).fit(X, Y3), tmp_path)


# ------------------------------------------------------------------------------------------- Tree

def test_a_tree_without_nodes_is_refused(tmp_path: Path) -> None:
    """A Tree whose state in the file is empty: skops then skips __setstate__ and the Tree has no nodes at
    all, and apply reads node 0 through a null pointer. (__setstate__ clamps a node_count above the nodes
    array's length to it, but keeps a zero or negative one.) Crafted in the file itself."""
    path = tmp_path / "tree.skops"
    skops.io.dump(DecisionTreeClassifier(max_depth=3).fit(X, Y), path)
    data = path.read_bytes()
    schema = schema_of(data)
    schema["content"]["content"]["tree_"]["content"]["content"] = {}
    schema["content"]["content"]["tree_"]["content"]["key_types"]["content"] = []
    path.write_bytes(with_schema(data, schema))
    with pytest.raises(CaptureError, match=r"DecisionTreeClassifier whose tree_ has node_count 0 outside \[1, 0\]"):
        load_sklearn(path)

    schema = schema_of(data)
    state = schema["content"]["content"]["tree_"]["content"]["content"]
    count = json.loads(state["node_count"]["content"])
    # a fresh __id__: skops reuses the value built for an __id__ it has seen (n_features shares this one)
    state["node_count"] = {**state["node_count"], "content": "-1", "__id__": 1}
    path.write_bytes(with_schema(data, schema))
    with pytest.raises(CaptureError, match=rf"tree_ has node_count -1 outside \[1, {count}\]"):
        load_sklearn(path)


def test_a_tree_child_out_of_range_is_refused(decision_tree: DecisionTreeClassifier) -> None:
    """apply follows children_left/right without a bounds check (a child 10**15 nodes away segfaults:
    see test_unchecked_structures_really_crash)."""
    tree = decision_tree.tree_
    n = tree.node_count
    set_tree_state(tree, left_child={0: n + 10**6})
    refused(decision_tree, rf"DecisionTreeClassifier whose tree_ has children_left/children_right outside "
                           rf"\(node, {n}\) \(node 0: children_left {n + 10**6}")


def test_a_tree_child_that_goes_back_is_refused(decision_tree: DecisionTreeClassifier) -> None:
    """A child whose index is not above its parent's can make a cycle: apply then loops forever."""
    tree = decision_tree.tree_
    node = split_nodes(tree)[1]
    set_tree_state(tree, right_child={node: node})
    refused(decision_tree, rf"tree_ has children_left/children_right outside \(node, \d+\) \(node {node}:")
    set_tree_state(tree, right_child={node: 0})
    refused(decision_tree, rf"\(node {node}: children_left \d+, children_right 0\)")


def test_a_tree_node_with_one_child_or_two_parents_is_refused(decision_tree: DecisionTreeClassifier) -> None:
    tree = decision_tree.tree_
    leaf = int(np.flatnonzero(tree.children_left == -1)[0])
    original = tree.__getstate__()["nodes"].copy()
    set_tree_state(tree, right_child={leaf: tree.node_count - 1})
    refused(decision_tree, rf"tree_ has a node with one child \(node {leaf}: children_left -1")
    # both children of the root are one node: it has two parents, the other subtree none
    tree.__setstate__({**tree.__getstate__(), "nodes": original})
    assert check_loaded(decision_tree) is None
    set_tree_state(tree, right_child={0: int(original["left_child"][0])})
    refused(decision_tree, rf"tree_ has a node that is the child of 2 nodes \(node {original['left_child'][0]}\)")


def test_a_tree_feature_out_of_range_is_refused(decision_tree: DecisionTreeClassifier) -> None:
    """apply reads X[i, feature] for an X checked to have n_features_in_ columns, and
    compute_feature_importances adds at importances[feature] (n_features long)."""
    tree = decision_tree.tree_
    node = split_nodes(tree)[2]
    set_tree_state(tree, feature={node: 4})
    refused(decision_tree, rf"tree_ splits on feature 4, outside \[0, n_features 4\) \(node {node}\)")
    set_tree_state(tree, feature={node: -3})
    refused(decision_tree, rf"tree_ splits on feature -3, outside \[0, n_features 4\) \(node {node}\)")


def test_a_tree_max_depth_short_of_its_depth_is_refused(decision_tree: DecisionTreeClassifier) -> None:
    """decision_path sizes its output for 1 + max_depth nodes per sample and writes each sample's whole
    path into it: a smaller max_depth overflows that buffer."""
    tree = decision_tree.tree_
    assert tree.max_depth == 4
    set_tree_state(tree, max_depth=1)
    refused(decision_tree, r"tree_ has max_depth 1 but its nodes are 4 deep")


def test_a_tree_wider_than_its_estimator_is_refused(decision_tree: DecisionTreeClassifier) -> None:
    """The estimator checks X's width against its n_features_in_, and skips that check when it has none;
    the Tree's features are checked against the Tree's n_features: the two must agree."""
    tree = decision_tree.tree_
    node = split_nodes(tree)[0]
    wide = rebuilt_tree(tree, n_features=9)
    set_tree_state(wide, feature={node: 8})
    decision_tree.tree_ = wide
    refused(decision_tree, r"DecisionTreeClassifier whose tree_ has n_features 9 but its n_features_in_ is 4")
    decision_tree.tree_ = tree
    assert check_loaded(decision_tree) is None
    del decision_tree.n_features_in_
    refused(decision_tree, r"whose tree_ has n_features 4 but its n_features_in_ is None")


def test_a_tree_whose_classes_are_not_its_estimators_is_refused(decision_tree: DecisionTreeClassifier) -> None:
    decision_tree.tree_ = rebuilt_tree(decision_tree.tree_, n_classes=np.array([5], dtype=np.intp))
    refused(decision_tree, r"whose tree_ has n_classes \[5\] but its n_classes_ is 3")
    decision_tree.tree_ = rebuilt_tree(decision_tree.tree_, n_classes=np.array([3], dtype=np.intp))
    assert check_loaded(decision_tree) is None


def test_a_tree_outside_a_decision_tree_is_refused(decision_tree: DecisionTreeClassifier) -> None:
    """A Tree as a pipeline's last step: Pipeline.predict would call Tree.predict(Xt), whose apply reads
    X[i, feature] with nothing checking Xt's width."""
    pipe = Pipeline([("scale", StandardScaler().fit(X)), ("tree", decision_tree.tree_)])
    refused(pipe, r"a scikit-learn Tree outside a decision tree's tree_")
    decision_tree.tree_ = "not a tree"
    refused(decision_tree, r"DecisionTreeClassifier whose tree_ is a str, not a scikit-learn Tree")


def test_a_forest_names_the_tree_at_fault(tmp_path: Path) -> None:
    forest = stored(RandomForestRegressor(n_estimators=5, max_depth=5, random_state=0).fit(X, X[:, 0]), tmp_path)
    tree = forest.estimators_[3].tree_
    set_tree_state(tree, right_child={0: tree.node_count})
    refused(forest, r"a RandomForestRegressor whose estimators_\[3\] is a DecisionTreeRegressor whose tree_ has "
                    r"children_left/children_right outside")


# ------------------------------------------------------------------------------ GradientBoosting

@pytest.fixture
def boosting(tmp_path: Path) -> GradientBoostingClassifier:
    return stored(GradientBoostingClassifier(n_estimators=5, max_depth=2, random_state=0).fit(X, Y3), tmp_path)


def test_boosting_stages_must_match_what_it_adds_to(boosting: GradientBoostingClassifier) -> None:
    """predict_stages adds tree k's value to out[i, k] for k up to estimators_.shape[1], out being the
    init_ estimator's raw predictions (3 columns here): a 4th column of trees writes past each row."""
    assert boosting.estimators_.shape == (5, 3) and boosting.n_trees_per_iteration_ == 3
    stages = boosting.estimators_
    boosting.estimators_ = np.concatenate([stages, stages[:, :1]], axis=1)
    refused(boosting, r"GradientBoostingClassifier whose estimators_ of shape \(5, 4\) is not an object array of shape "
                      r"\(n_stages, n_trees_per_iteration_ 3\)")
    boosting.n_trees_per_iteration_ = 4
    refused(boosting, r"GradientBoostingClassifier whose init_ makes raw predictions of shape \(2, 3\) for two rows "
                      r"where its trees add n_trees_per_iteration_ 4 columns")
    boosting.estimators_, boosting.n_trees_per_iteration_ = stages, 3
    assert check_loaded(boosting) is None
    boosting.estimators_ = stages.tolist()
    refused(boosting, r"whose estimators_ \(a list\) is not an object array")


def test_boosting_trees_must_be_fitted_and_as_wide_as_it(boosting: GradientBoostingClassifier) -> None:
    """predict_stages types each stage's tree_ as a Tree (None passes, as a null pointer) and reads
    X[i, node.feature] for the X that GradientBoosting validated against its own n_features_in_."""
    stage = boosting.estimators_[2, 1]
    tree = stage.tree_
    stage.tree_ = None
    refused(boosting, r"GradientBoostingClassifier whose estimators_\[2, 1\] is a DecisionTreeRegressor whose tree_ "
                      r"is a NoneType")
    # a stage consistent on its own (9 features, one split on feature 8) in a 4-feature model
    wide = rebuilt_tree(tree, n_features=9)
    set_tree_state(wide, feature={0: 8})
    stage.tree_, stage.n_features_in_ = wide, 9
    refused(boosting, r"whose estimators_\[2, 1\]'s tree has n_features 9 but its n_features_in_ is 4")


# -------------------------------------------------------------------------- HistGradientBoosting

@pytest.fixture
def hist_boosting(tmp_path: Path) -> HistGradientBoostingClassifier:
    """Feature 0 categorical (7 categories), 1 and 2 numeric."""
    Xc = np.c_[RNG.integers(0, 7, len(X)), X[:, 1:3]]
    y = np.isin(Xc[:, 0], [1, 4, 5]) ^ (Xc[:, 1] > 0)
    model = stored(HistGradientBoostingClassifier(max_iter=8, categorical_features=[0], random_state=0)
                   .fit(Xc, y), tmp_path)
    assert any((p.nodes["is_categorical"] != 0).any() for (p,) in model._predictors)
    return model


def _split_of(predictor: Any, categorical: bool) -> int:
    nodes = predictor.nodes
    return int(np.flatnonzero((nodes["is_leaf"] == 0) & ((nodes["is_categorical"] != 0) == categorical))[0])


def _categorical_predictor(model: HistGradientBoostingClassifier) -> Any:
    return next(p for (p,) in model._predictors if (p.nodes["is_categorical"] != 0).any())


def test_a_predictor_child_out_of_range_or_going_back_is_refused(hist_boosting: HistGradientBoostingClassifier) -> None:
    """_predict_one_from_raw_data goes to nodes[node.left] / nodes[node.right] until a leaf: out of range
    reads past the nodes, an index not above the parent's can loop forever."""
    predictor = hist_boosting._predictors[3][0]
    n = len(predictor.nodes)
    predictor.nodes["left"][0] = n + 100
    refused(hist_boosting, rf"HistGradientBoostingClassifier whose _predictors\[3\]\[0\] \(a TreePredictor\) has "
                           rf"left/right outside \(node, {n}\) \(node 0: left {n + 100}")
    predictor.nodes["left"][0] = 1
    assert check_loaded(hist_boosting) is None
    node = _split_of(predictor, categorical=False)
    predictor.nodes["right"][node] = node
    refused(hist_boosting, rf"has left/right outside \(node, {n}\) \(node {node}:")


def test_a_predictor_feature_out_of_range_is_refused(hist_boosting: HistGradientBoostingClassifier) -> None:
    """The predictor reads X[row, feature_idx] of the preprocessed input: 3 columns here."""
    predictor = hist_boosting._predictors[0][0]
    node = _split_of(predictor, categorical=False)
    predictor.nodes["feature_idx"][node] = 3
    refused(hist_boosting, rf"whose _predictors\[0\]\[0\] \(a TreePredictor\) splits on feature_idx 3, outside "
                           rf"\[0, 3\) \(node {node}\)")


def test_a_predictor_bitset_out_of_range_is_refused(hist_boosting: HistGradientBoostingClassifier) -> None:
    """A categorical node reads row bitset_idx of raw_left_cat_bitsets (and of the binned ones), 8 columns
    (a uint8 category // 32)."""
    predictor = _categorical_predictor(hist_boosting)
    node = _split_of(predictor, categorical=True)
    rows = len(predictor.raw_left_cat_bitsets)
    predictor.nodes["bitset_idx"][node] = rows
    refused(hist_boosting, rf"has a categorical split whose bitset_idx {rows} is outside its {rows} bitset rows "
                           rf"\(node {node}\)")
    predictor.nodes["bitset_idx"][node] = 0
    assert check_loaded(hist_boosting) is None
    predictor.raw_left_cat_bitsets = np.ascontiguousarray(predictor.raw_left_cat_bitsets[:, :4])
    refused(hist_boosting, rf"has raw_left_cat_bitsets of shape \({rows}, 4\), not a C-contiguous uint32 array")


def test_a_categorical_split_on_a_numeric_feature_is_refused(hist_boosting: HistGradientBoostingClassifier) -> None:
    """A categorical node also reads known_cat_bitsets[f_idx_map[feature_idx]]: f_idx_map is 0 for a numeric
    feature, and known_cat_bitsets has a row per categorical feature only (none, in a model without any)."""
    predictor = hist_boosting._predictors[0][0]
    node = _split_of(predictor, categorical=False)
    feature = int(predictor.nodes["feature_idx"][node])
    predictor.nodes["is_categorical"][node] = 1
    refused(hist_boosting, rf"has a categorical split on feature_idx {feature}, which its bin mapper does not list "
                           rf"as categorical \(node {node}\)")


def test_a_hist_boosting_predictors_and_input_must_be_what_it_makes(
        hist_boosting: HistGradientBoostingClassifier) -> None:
    predictors = hist_boosting._predictors
    predictor = predictors[0][0]
    nodes = predictor.nodes
    predictor.nodes = nodes.astype([(name, "<f8") for name in nodes.dtype.names])
    refused(hist_boosting, r"whose _predictors\[0\]\[0\] \(a TreePredictor\) has nodes that are not a non-empty "
                           r"vector of scikit-learn's predictor records")
    predictor.nodes = nodes
    hist_boosting._predictors = [*predictors[:2], [], *predictors[3:]]
    refused(hist_boosting, r"whose _predictors\[2\] is not a list of n_trees_per_iteration_ \(1\) TreePredictors")
    hist_boosting._predictors = predictors
    assert check_loaded(hist_boosting) is None
    # _raw_predict takes X as binned, unvalidated, while _in_fit is set
    hist_boosting._in_fit = True
    refused(hist_boosting, r"whose _in_fit is set")
    del hist_boosting._in_fit
    # its column transformer with the numeric columns dropped outputs 1 column, not 3
    transformers = hist_boosting._preprocessor.transformers_
    hist_boosting._preprocessor.transformers_ = [transformers[0], ("numerical", "drop", transformers[1][2]),
                                                 transformers[2]]
    refused(hist_boosting, r"whose _n_features is 3 but its input has 1 columns")
    del hist_boosting._n_features
    refused(hist_boosting, r"whose _bin_mapper.is_categorical_ is not one flag for each of its 1 input columns")
    hist_boosting._preprocessor.transformers_ = [transformers[0], ("numerical", StandardScaler(), transformers[1][2]),
                                                 transformers[2]]
    refused(hist_boosting, r"whose _preprocessor is not a column transformer of the kind it makes")


# ------------------------------------------------------------------------------- KDTree, BallTree

ALGORITHMS = ["kd_tree", "ball_tree"]


def neighbours(tmp_path: Path, algorithm: str, **params: Any) -> KNeighborsClassifier:
    model = stored(KNeighborsClassifier(algorithm=algorithm, leaf_size=10, **params).fit(X, Y), tmp_path)
    assert type(model._tree).__name__ == {"kd_tree": "KDTree", "ball_tree": "BallTree"}[algorithm]
    return model


def set_binary_state(model: KNeighborsClassifier, **fields: Any) -> None:
    """What skops does with a crafted file: the tree's __setstate__ with the file's tuple."""
    order = ["data", "idx_array", "node_data", "node_bounds", "leaf_size", "n_levels", "n_nodes", "n_trims",
             "n_leaves", "n_splits", "n_calls", "dist_metric", "sample_weight"]
    state = list(model._tree.__getstate__())
    for field, value in fields.items():
        state[order.index(field)] = value
    model._tree.__setstate__(tuple(state))


def node_data(model: KNeighborsClassifier) -> np.ndarray:
    return model._tree.get_arrays()[2].copy()


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_binary_tree_idx_array_must_permute_the_data_rows(tmp_path: Path, algorithm: str) -> None:
    """A leaf reads data[idx_array[i]] for i in [idx_start, idx_end): a row past the data reads out of
    bounds (see test_unchecked_structures_really_crash); crafted in the file itself here."""
    path = tmp_path / "knn.skops"
    skops.io.dump(KNeighborsClassifier(algorithm=algorithm).fit(X, Y), path)
    data = path.read_bytes()
    name = type(load_sklearn(path)._tree).__name__
    schema = schema_of(data)
    member = schema["content"]["content"]["_tree"]["content"]["content"][1]["file"]
    for idx_array in (np.r_[np.arange(len(X) - 1), 10**9], np.r_[np.arange(len(X) - 1), 0]):
        buffer = BytesIO()
        np.save(buffer, idx_array.astype(np.intp), allow_pickle=False)
        path.write_bytes(with_schema(data, schema, {member: buffer.getvalue()}))
        with pytest.raises(CaptureError, match=rf"KNeighborsClassifier whose _tree \(a {name}\) has an idx_array that "
                                               rf"is not a permutation of its 300 data rows"):
            load_sklearn(path)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_binary_tree_node_range_out_of_the_data_is_refused(tmp_path: Path, algorithm: str) -> None:
    model = neighbours(tmp_path, algorithm)
    nodes = node_data(model)
    leaf = int(np.flatnonzero(nodes["is_leaf"])[-1])
    nodes["idx_end"][leaf] = len(X) + 5
    set_binary_state(model, node_data=nodes)
    refused(model, rf"whose _tree \(a \w+Tree\) has node_data whose idx_start \d+, idx_end {len(X) + 5} are not "
                   rf"within \[0, {len(X)}\] \(node {leaf}\)")
    # within the data but not what the parent holds
    nodes = node_data(model)
    nodes["idx_end"][leaf] = len(X)
    nodes["idx_start"][1] += 1
    set_binary_state(model, node_data=nodes)
    refused(model, r"has a node whose children do not split its points in two \(node 0\)")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_binary_tree_split_past_its_nodes_is_refused(tmp_path: Path, algorithm: str) -> None:
    """A node whose is_leaf is 0 goes on to nodes 2i+1 and 2i+2, past node_data for the last level."""
    model = neighbours(tmp_path, algorithm)
    nodes = node_data(model)
    last = len(nodes) - 1
    nodes["is_leaf"][last] = 0
    set_binary_state(model, node_data=nodes)
    refused(model, rf"has a node that is not a leaf but whose children would be past its n_nodes {len(nodes)} "
                   rf"\(node {last}\)")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_binary_tree_shapes_must_match_its_node_count(tmp_path: Path, algorithm: str) -> None:
    """Queries read node_bounds[.., node, feature] (KD: 2 bounds; Ball: 1 centroid); kernel_density sizes
    its per-node buffers by n_nodes; n_nodes is 2**n_levels - 1 as the build makes it."""
    model = neighbours(tmp_path, algorithm)
    arrays = model._tree.get_arrays()
    n_nodes = len(arrays[2])
    bounds = arrays[3]
    set_binary_state(model, node_bounds=np.ascontiguousarray(bounds[:, :-1]))
    refused(model, rf"has node_bounds of shape \({len(bounds)}, {n_nodes - 1}, 4\), "
                   rf"not \({len(bounds)}, {n_nodes}, 4\)")
    other = np.zeros((3 - len(bounds), n_nodes, 4))  # the other kind's layout
    set_binary_state(model, node_bounds=other)
    refused(model, r"has node_bounds of shape")
    set_binary_state(model, node_bounds=bounds, n_nodes=n_nodes + 2)
    refused(model, rf"has n_nodes {n_nodes + 2} for n_levels \d+ \(2\*\*n_levels - 1 expected\)")
    levels = int(np.log2(n_nodes + 1))
    set_binary_state(model, n_nodes=2 ** (levels + 1) - 1, n_levels=levels + 1)
    refused(model, rf"has node_data of shape \({n_nodes},\) and dtype .* for n_nodes {2 ** (levels + 1) - 1}")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_binary_tree_leaf_size_and_weights_are_checked(tmp_path: Path, algorithm: str) -> None:
    """kernel_density(breadth_first=True) divides by leaf_size (compiled with cdivision: a zero is a
    SIGFPE) and reads sample_weight[idx_array[i]]."""
    model = neighbours(tmp_path, algorithm)
    set_binary_state(model, leaf_size=0)
    refused(model, r"has leaf_size 0")
    set_binary_state(model, leaf_size=10, sample_weight=np.ones(len(X) - 1))
    refused(model, rf"has sample_weight of shape \({len(X) - 1},\) for {len(X)} data rows")
    set_binary_state(model, sample_weight=np.ones(len(X)))
    assert check_loaded(model) is None


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_binary_tree_metric_must_fit_its_data(tmp_path: Path, algorithm: str) -> None:
    """Queries call the metric's rdist through a typed pointer (None is a null one); MinkowskiDistance's
    reads its weights w[j] for each of the data's columns; the bounds use the metric's p."""
    from sklearn.metrics import DistanceMetric

    # (KNeighbors refuses weights with a KDTree, a KDTree built from a file takes them)
    weights = {"metric_params": {"w": np.arange(1.0, 5.0)}} if algorithm == "ball_tree" else {}
    model = neighbours(tmp_path, algorithm, metric="minkowski", p=3, **weights)
    assert type(model._tree.__getstate__()[11]).__name__ == "MinkowskiDistance64"
    set_binary_state(model, dist_metric=DistanceMetric.get_metric("minkowski", p=3, w=np.ones(2)))
    refused(model, r"has a MinkowskiDistance64 with \(2,\) weights for 4 columns")
    set_binary_state(model, dist_metric=None)
    refused(model, r"has a distance metric of type NoneType")
    euclidean = DistanceMetric.get_metric("euclidean")
    p, weights, matrix = euclidean.__getstate__()
    euclidean.__setstate__((1.0, weights, matrix))
    set_binary_state(model, dist_metric=euclidean)
    refused(model, r"has a EuclideanDistance64 with p 1.0 \(2.0 expected\)")


# ----------------------------------------------------------------------- what the checks prevent

CRASHES = {
    "tree": """
        from sklearn.tree import DecisionTreeClassifier
        model = DecisionTreeClassifier(max_depth=3).fit(X, Y)
        state = model.tree_.__getstate__()
        nodes = state["nodes"].copy()
        nodes["left_child"][0] = 10**15
        model.tree_.__setstate__({**state, "nodes": nodes, "values": state["values"].copy()})
    """,
    "kd_tree": """
        from sklearn.neighbors import KNeighborsClassifier
        model = KNeighborsClassifier(algorithm="kd_tree").fit(X, Y)
        state = list(model._tree.__getstate__())
        state[1] = np.full_like(state[1], 10**15)
        model._tree.__setstate__(tuple(state))
    """,
}


@pytest.mark.parametrize("case", sorted(CRASHES))
def test_unchecked_structures_really_crash(case: str) -> None:
    """Without the checks the mount's re-run of such a model segfaults: shown in a child process (never in
    the test's), which check_loaded would have refused."""
    script = "import numpy as np\nfrom mistiquefs.capture.skops_trust import check_loaded\n" \
             "rng = np.random.default_rng(0)\nX = rng.standard_normal((200, 3))\nY = X[:, 0] > 0\n" \
             + textwrap.dedent(CRASHES[case]) \
             + "assert check_loaded(model) is not None\nprint('predicting', flush=True)\nmodel.predict(X)\n"

    def no_core_dump() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            preexec_fn=no_core_dump)
    assert "predicting" in result.stdout, result.stderr
    assert result.returncode < 0, (result.returncode, result.stderr[-2000:])  # killed by a signal (SIGSEGV)
