"""Untrusted stores: the compiled structures a re-run indexes without bounds checks must be consistent.

scikit-learn's fitted ``Tree`` (every tree model), HistGradientBoosting's ``TreePredictor`` and
KDTree/BallTree (KNeighbors*) are arrays of the model file that compiled code (built without bounds
checks) follows: a child index, a feature, a bitset row, a point's row. So are the plain arrays other
compiled prediction code trusts the shapes of: KMeans's centres, libsvm's model (SVC, SVR, OneClassSVM...),
a brute-force neighbour search's fitted points and labels, scipy sparse matrices (their indptr and
indices), and the index maps from which OneHotEncoder and the vectorizers build sparse outputs (which a
re-run's dense copy writes through). A swapped model file whose arrays point elsewhere made the mount's
re-run read or write out of bounds or segfault (a crashed daemon takes the whole mount down), or loop
forever. ``check_loaded`` now refuses such a model with a message naming the estimator and the field. Each test fits a real model, saves and loads it as the store does (``skops.io.dump``, then
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
from scipy import sparse
from sklearn.cluster import BisectingKMeans, FeatureAgglomeration, KMeans, MiniBatchKMeans
from sklearn.cluster._bisect_k_means import _BisectingTree
from sklearn.decomposition import KernelPCA
from sklearn.ensemble import GradientBoostingClassifier, HistGradientBoostingClassifier, RandomForestRegressor
from sklearn.feature_extraction import DictVectorizer
from sklearn.feature_extraction.text import CountVectorizer, TfidfVectorizer
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.manifold import Isomap
from sklearn.neighbors import (KNeighborsClassifier, KNeighborsRegressor, KNeighborsTransformer, LocalOutlierFactor,
                               RadiusNeighborsClassifier)
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import KBinsDiscretizer, MultiLabelBinarizer, OneHotEncoder, StandardScaler
from sklearn.random_projection import SparseRandomProjection
from sklearn.svm import SVC, SVR, NuSVC, NuSVR, OneClassSVM
from sklearn.tree import DecisionTreeClassifier
from sklearn.tree._tree import Tree

import mistiquefs
from mistiquefs.capture.skops_trust import check_loaded
from mistiquefs.capture.sklearn import load_model as load_sklearn
from mistiquefs.errors import CaptureError

from test_untrusted import schema_of, with_schema

RNG = np.random.default_rng(7)
X = RNG.standard_normal((300, 4))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype(int)
Y3 = np.digitize(X[:, 1] + 0.3 * X[:, 2], [-0.5, 0.5])
XS = sparse.csr_matrix(np.where(np.abs(X) > 0.7, X, 0.0))  # the same points, sparse


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


# ------------------------------------------------------------------------------------------ KMeans

@pytest.mark.parametrize("data", ["dense", "sparse"])
def test_kmeans_centres_must_be_as_wide_as_its_input(tmp_path: Path, data: str) -> None:
    """predict checks X only against n_features_in_ (not at all without one). Dense, _k_means_lloyd.pyx's gemm
    reads X's rows with the centres' width as their stride: wider centres read past X (see
    test_unchecked_structures_really_crash); sparse, it reads centers_old[j, X_indices[k]]: narrower centres
    are read past."""
    model = stored(KMeans(4, n_init=1, random_state=0).fit(X if data == "dense" else XS), tmp_path)
    centres = model.cluster_centers_
    model.cluster_centers_ = np.c_[centres, centres]
    refused(model, r"a KMeans whose cluster_centers_ are 8 wide but its n_features_in_ \(the width its input is "
                   r"checked against\) is 4")
    model.cluster_centers_ = np.ascontiguousarray(centres[:, :2])
    refused(model, r"a KMeans whose cluster_centers_ are 2 wide but its n_features_in_ .* is 4")
    model.cluster_centers_ = centres
    assert check_loaded(model) is None
    del model.n_features_in_
    refused(model, r"a KMeans whose cluster_centers_ are 4 wide but its n_features_in_ .* is None")


def test_kmeans_needs_centres_and_a_sane_thread_count(tmp_path: Path) -> None:
    """The Lloyd step runs min(_n_threads, n_chunks) OpenMP threads (a stored -1 made libgomp end the process)
    and reads the first of its distances to the centres (none, without centres)."""
    model = stored(MiniBatchKMeans(3, n_init=1, batch_size=64, random_state=0).fit(X), tmp_path)
    threads = model._n_threads
    assert 1 <= threads <= 1024
    for bad in (-1, 0, 10**6, 2.0):
        model._n_threads = bad
        refused(model, rf"a MiniBatchKMeans whose _n_threads is {bad} \(an OpenMP thread count in \[1, 1024\] expected\)")
    model._n_threads = threads
    model.cluster_centers_ = np.empty((0, 4))
    refused(model, r"a MiniBatchKMeans whose cluster_centers_ \(a ndarray of shape \(0, 4\) and dtype float64\) is not "
                   r"a non-empty float matrix")


# --------------------------------------------------------------------------------- BisectingKMeans

def bisecting_nodes(model: BisectingKMeans) -> list[_BisectingTree]:
    """Every node of the model's tree, root first, then depth first (left before right)."""
    nodes, stack = [], [model._bisecting_tree]
    while stack:
        node = stack.pop()
        nodes.append(node)
        if node.left is not None:
            stack.extend((node.right, node.left))
    return nodes


@pytest.fixture
def bisecting(tmp_path: Path) -> BisectingKMeans:
    return stored(BisectingKMeans(5, random_state=0).fit(X), tmp_path)


def test_bisecting_kmeans_node_centres_must_fit_its_input(bisecting: BisectingKMeans) -> None:
    """predict walks the tree (cluster/_bisect_k_means.py's _predict_recursive): at each split node it stacks
    the two children's ``center``, adds ``_X_mean`` and hands them with X (checked against n_features_in_
    only) to _k_means_lloyd.pyx, whose gemm reads X with the centres' width (see
    test_unchecked_structures_really_crash) and whose fused types need the centres in X's dtype."""
    model = bisecting
    leaf = bisecting_nodes(model)[-1]
    centre = leaf.center
    for bad, what in ((np.r_[centre, centre], r"a ndarray of shape \(8,\) and dtype float64"),
                      (centre[:, None], r"a ndarray of shape \(4, 1\) and dtype float64"),
                      (centre.astype(np.float32), r"a ndarray of shape \(4,\) and dtype float32"),
                      (np.r_[centre[:3], np.nan], r"a ndarray of shape \(4,\) and dtype float64"),
                      (np.matrix(centre), r"a matrix of shape \(1, 4\) and dtype float64"),
                      (centre.tolist(), r"a list")):
        leaf.center = bad
        refused(model, r"a BisectingKMeans whose _bisecting_tree\.right\.right \(a _BisectingTree\) has a "
                       rf"center \({what}\) that is not a finite vector of its n_features_in_ \(4\) in the dtype "
                       r"of its cluster_centers_ \(float64\)")
    leaf.center = centre
    assert check_loaded(model) is None
    mean = model._X_mean
    model._X_mean = mean[:3]
    refused(model, r"a BisectingKMeans whose _X_mean \(a ndarray of shape \(3,\) and dtype float64\) is not a finite "
                   r"vector of its n_features_in_ \(4\) in the dtype of its cluster_centers_")
    model._X_mean = mean
    del model.cluster_centers_  # (predict reads the tree, not the centres)
    refused(model, r"a BisectingKMeans whose cluster_centers_ \(a NoneType\) is not a non-empty float matrix")


def test_a_numpy_matrix_loads_only_as_a_bisecting_root_center(tmp_path: Path) -> None:
    """skops builds ``np.matrix`` of a numeric .npy (NdArrayNode). A BisectingKMeans fitted on sparse data keeps
    one as its tree's root center (X.mean(axis=0) of a CSR matrix), which predict never reads; anywhere else
    its operators are not an array's (``*`` is a matrix product, a row stays 2-D)."""
    model = stored(BisectingKMeans(3, random_state=0).fit(XS), tmp_path)
    assert type(model._bisecting_tree.center) is np.matrix
    scaler = StandardScaler().fit(X)
    scaler.scale_ = np.matrix(scaler.scale_)
    path = tmp_path / "matrix.skops"
    skops.io.dump(scaler, path)
    with pytest.raises(CaptureError, match=r"a numpy matrix outside the root center of a BisectingKMeans's tree"):
        load_sklearn(path)
    model.extra_ = model._bisecting_tree.center  # (met again by another path)
    refused(model, r"a numpy matrix outside the root center of a BisectingKMeans's tree")


def test_bisecting_kmeans_tree_must_be_a_finite_tree(bisecting: BisectingKMeans) -> None:
    """_predict_recursive goes to ``left`` and ``right`` until a node's left is None: a node with one child
    fails, a shared node is predicted once per path that reaches it (a chain of shared nodes n deep is 2**n
    calls: a hang), a cycle recurses until Python gives up, and a tree deeper than the recursion limit cannot
    be predicted at all."""
    model = bisecting
    root = model._bisecting_tree
    left, right = root.left, root.right
    root.right = None
    refused(model, r"a BisectingKMeans whose _bisecting_tree \(a _BisectingTree\) has a left child but no right one")
    root.right = left
    refused(model, r"a BisectingKMeans whose _bisecting_tree\.right \(a _BisectingTree\) is reached twice \(the child "
                   r"of two nodes, or its own ancestor\)")
    root.right = right
    leaf = bisecting_nodes(model)[-1]
    leaf.left, leaf.right = root, root
    refused(model, r"a BisectingKMeans whose _bisecting_tree\.right\.right\.left \(a _BisectingTree\) is "
                   r"reached twice")
    leaf.left, leaf.right = StandardScaler(), StandardScaler()
    refused(model, r"a BisectingKMeans whose _bisecting_tree\.right\.right\.left is a StandardScaler, not a "
                   r"_BisectingTree")
    leaf.left = leaf.right = None
    assert check_loaded(model) is None
    # a chain 600 nodes deep (each split node's right child a leaf)
    node = leaf
    for _ in range(600):
        parent = _BisectingTree(center=leaf.center, indices=None, score=0.0)
        parent.left, parent.right = node, _BisectingTree(center=leaf.center, indices=None, score=0.0)
        parent.right.label = 0
        node = parent
    root.right = node
    refused(model, r"a BisectingKMeans whose _bisecting_tree\.right(\.left){500} \(a _BisectingTree\) is deeper than "
                   r"500 levels")


def test_bisecting_kmeans_leaves_must_label_its_centres(bisecting: BisectingKMeans) -> None:
    """A leaf's ``label`` is what predict returns for the rows it reaches (np.full(..., label, dtype=int32)):
    the leaves must number the rows of cluster_centers_, each once, as fit numbers them."""
    model = bisecting
    leaves = [node for node in bisecting_nodes(model) if node.left is None]
    assert sorted(leaf.label for leaf in leaves) == list(range(5))
    for bad in (7, -1, 1.5, "0"):
        leaves[0].label = bad
        refused(model, r"a BisectingKMeans whose _bisecting_tree\.left\.left\.left \(a _BisectingTree\) is a leaf "
                       rf"labelled {re.escape(repr(bad))} \(an index into its 5 cluster_centers_ expected\)")
    leaves[0].label = leaves[1].label
    refused(model, r"a BisectingKMeans whose leaves label the rows \[1, 1, 2, 3, 4\] of its 5 cluster_centers_ \(each "
                   r"once expected\)")
    del leaves[0].label
    refused(model, r"a BisectingKMeans whose _bisecting_tree\.left\.left\.left \(a _BisectingTree\) is a leaf "
                   r"labelled None")
    leaves[0].label = 0
    assert check_loaded(model) is None
    model.cluster_centers_ = np.r_[model.cluster_centers_, model.cluster_centers_[:1]]
    refused(model, r"a BisectingKMeans whose leaves label the rows \[0, 1, 2, 3, 4\] of its 6 cluster_centers_")
    model.cluster_centers_ = model.cluster_centers_[:4]
    refused(model, r"whose _bisecting_tree\.right\.right \(a _BisectingTree\) is a leaf labelled 4 \(an index into "
                   r"its 4 cluster_centers_ expected\)")


def test_bisecting_kmeans_nodes_hold_only_their_fields(bisecting: BisectingKMeans, tmp_path: Path) -> None:
    """A node is a plain object (ObjectNode) whose __dict__ the file fills: nothing but its own fields, none
    standing in for its methods; the fit-only ``_kmeans_single`` is one of scikit-learn's two k-means runs
    (only BisectingKMeans.fit calls it), which are loaded nowhere else."""
    from sklearn.cluster._kmeans import _kmeans_single_elkan

    model = bisecting
    node = model._bisecting_tree.left
    node.inertia = 1.0
    refused(model, r"whose _bisecting_tree\.left \(a _BisectingTree\) has other fields than \['center', 'indices', "
                   r"'label', 'left', 'right', 'score'\]: \['inertia'\]")
    del node.inertia
    node.indices = "all"
    refused(model, r"whose _bisecting_tree\.left \(a _BisectingTree\) has indices 'all'")
    node.indices = None
    node.__dict__["iter_leaves"] = np.negative  # (what fit would call in place of the method)
    refused(model, r"whose _bisecting_tree\.left \(a _BisectingTree\) has other fields .*: \['iter_leaves'\]")
    del node.__dict__["iter_leaves"]
    model._kmeans_single = _kmeans_single_elkan
    assert check_loaded(model) is None
    for bad in (np.negative, np.mean):
        model._kmeans_single = bad
        refused(model, rf"a BisectingKMeans whose '_kmeans_single' is a callable {type(bad).__name__}")
    path = tmp_path / "crafted.skops"
    model._kmeans_single = _kmeans_single_elkan
    model._bisecting_tree.right = model._bisecting_tree.left
    skops.io.dump(model, path)
    with pytest.raises(CaptureError, match=r"a BisectingKMeans whose _bisecting_tree\.right \(a _BisectingTree\) is "
                                           r"reached twice"):
        load_sklearn(path)


# ------------------------------------------------------------------------------ FeatureAgglomeration

def test_feature_agglomeration_labels_must_index_its_columns(tmp_path: Path) -> None:
    """FeatureAgglomeration.transform (cluster/_feature_agglomeration.py) with np.mean sizes its output by
    ``np.bincount(labels_)`` (a label of 10**12 asks for 8 TB) and pools X's columns by one label per column;
    other pooling functions get X's columns ``labels_ == l`` for each distinct label."""
    model = stored(FeatureAgglomeration(2).fit(X), tmp_path)
    labels = model.labels_
    for bad, what in ((np.r_[labels[:3], 10**12], r"holds 1000000000000"), (np.r_[labels[:3], -1], r"holds -1"),
                      (labels[:3], r"\(a ndarray of shape \(3,\) and dtype int64\) is not"),
                      (labels.astype(float), r"\(a ndarray of shape \(4,\) and dtype float64\) is not")):
        model.labels_ = bad
        refused(model, rf"a FeatureAgglomeration whose labels_ {what}.*one cluster index in \[0, 4\) for each of its "
                       r"n_features_in_ \(4\) columns")
    model.labels_ = labels
    model.n_features_in_ = 10**6
    refused(model, r"a FeatureAgglomeration whose labels_ .* is not one cluster index .* each of its n_features_in_ "
                   r"\(1000000\) columns")
    model.n_features_in_ = 4
    model.labels_ = np.r_[labels[:3], 10**12]
    path = tmp_path / "crafted.skops"
    skops.io.dump(model, path)
    with pytest.raises(CaptureError, match=r"a FeatureAgglomeration whose labels_ holds 1000000000000"):
        load_sklearn(path)


def test_feature_agglomeration_pools_with_numpy_reductions_only(tmp_path: Path) -> None:
    """Its ``pooling_func`` (numpy.mean by default) is called by transform on X's columns with axis=1: a small
    set of numpy reductions is loaded there, and only there (a FunctionTransformer holding one would call it
    with keyword arguments from the file, np.median's ``overwrite_input`` among them)."""
    model = stored(FeatureAgglomeration(2, pooling_func=np.nanmedian).fit(X), tmp_path)
    model.pooling_func = np.cumsum
    refused(model, r"a FeatureAgglomeration whose 'pooling_func' is a callable _ArrayFunctionDispatcher")
    model.pooling_func = np.max
    model.extra_ = [np.max]
    refused(model, r"the function numpy\.max outside a FeatureAgglomeration's pooling_func")


# ------------------------------------------------------------------------------ IsotonicRegression

def test_isotonic_thresholds_must_be_what_fit_makes(tmp_path: Path) -> None:
    """IsotonicRegression's __setstate__ (skops trusts the class and calls it while loading) builds ``f_``, an
    interp1d, from ``X_thresholds_`` and ``y_thresholds_``, and predict casts its input to the thresholds'
    dtype before calling it: they must be finite float vectors of one length, X's strictly increasing, as fit
    makes them. A stored ``f_`` is never used: check_loaded builds it again from the checked thresholds."""
    x = X[:, :1]
    model = stored(IsotonicRegression(out_of_bounds="clip").fit(x, X[:, 0] + X[:, 1]), tmp_path)
    xt, yt = model.X_thresholds_, model.y_thresholds_
    for field, bad, what in (("X_thresholds_", xt[::-1], r"is not a finite, strictly increasing float vector"),
                             ("X_thresholds_", np.r_[xt[:-1], np.nan], r"is not a finite, strictly increasing"),
                             ("X_thresholds_", xt.astype(np.int64), r"is not a finite, strictly increasing float"),
                             ("y_thresholds_", np.c_[yt, yt], r"is not a finite float vector as long as its X_thr"),
                             ("y_thresholds_", np.r_[yt[:-1], np.inf], r"is not a finite float vector"),
                             ("y_thresholds_", yt.astype(np.float32), r"is not a finite float vector .* same dtype")):
        setattr(model, field, bad)
        refused(model, rf"a IsotonicRegression whose {field} \(a ndarray .*\) {what}")
        setattr(model, field, xt if field == "X_thresholds_" else yt)
    assert check_loaded(model) is None
    model.X_min_ = np.zeros(10)
    refused(model, r"a IsotonicRegression whose X_min_ \(a ndarray of shape \(10,\) and dtype float64\) is not a "
                   r"number")
    model.X_min_ = xt[0]
    f_ = model.f_
    model.f_ = np.negative
    assert check_loaded(model) is None and model.f_ is not f_ and type(model.f_) is type(f_)  # built again
    np.testing.assert_array_equal(model.predict(x), f_(np.clip(x[:, 0], xt[0], xt[-1])))
    del model.X_thresholds_, model.y_thresholds_
    model.f_ = np.negative
    refused(model, r"a IsotonicRegression whose f_ is stored without the X_thresholds_ and y_thresholds_ it is built "
                   r"from")


def test_a_stored_isotonic_f_is_refused(tmp_path: Path) -> None:
    """A file can hold an ``f_`` of its own: __setstate__ keeps it when the thresholds are missing, and
    predict calls it (here numpy.negative, trusted, is what the model computes)."""
    x = X[:, :1]
    model = IsotonicRegression().fit(x, X[:, 0])
    del model.X_thresholds_, model.y_thresholds_
    data = skops.io.dumps(model)
    schema = schema_of(data)
    schema["content"]["content"]["f_"] = {"__class__": "negative", "__module__": "numpy", "__loader__": "FunctionNode",
                                          "__id__": 10**8}
    schema["content"]["key_types"]["content"].append({"__class__": "str", "__module__": "builtins",
                                                      "__loader__": "TypeNode"})
    crafted = with_schema(data, schema)
    live = skops.io.loads(crafted, trusted=["numpy.negative"])
    np.testing.assert_array_equal(live.predict(x), -x[:, 0])  # the file chose what a re-run computes
    path = tmp_path / "crafted.skops"
    path.write_bytes(crafted)
    with pytest.raises(CaptureError, match=r"a IsotonicRegression whose f_ is stored without the X_thresholds_"):
        load_sklearn(path)


# ------------------------------------------------------------------------------------------ libsvm

@pytest.fixture
def svc(tmp_path: Path) -> SVC:
    """Three classes, with probabilities (libsvm's Platt parameters, 3 pairs)."""
    with pytest.warns(FutureWarning):  # (probability=True is deprecated in scikit-learn 1.9)
        model = SVC(probability=True, random_state=0).fit(X, Y3)
    return stored(model, tmp_path)


def test_libsvm_support_vectors_must_match_their_counts(svc: SVC) -> None:
    """libsvm_helper.c's set_model takes l from support_'s length and reads that many support vectors (see
    test_unchecked_structures_really_crash); svm_predict_values reads class i's coefficients from the sum of
    the counts before it, _n_support[i] of them. scikit-learn checks the counts' sum only for a dense model
    with support vectors, and classes_ only through numpy."""
    n = len(svc.support_)
    support, counts = svc.support_, svc._n_support
    svc.support_ = np.arange(n + 5, dtype=np.int32)
    refused(svc, rf"a SVC whose support_vectors_ have shape \({n}, 4\) for {n + 5} support_ entries and n_features_in_ 4")
    svc.support_ = support
    svc._n_support = counts + np.array([0, 0, 7], dtype=np.int32)
    refused(svc, rf"a SVC whose _n_support counts {n + 7} support vectors where it has {n}")
    svc._n_support = np.array([-1, counts[1] + 1, counts[2]], dtype=np.int32)
    refused(svc, rf"a SVC whose _n_support \[-1, {counts[1] + 1}, {counts[2]}\] does not count the support vectors "
                 rf"of two classes or more")
    svc._n_support = counts.astype(np.int64)
    refused(svc, r"a SVC whose _n_support \(a ndarray of shape \(3,\) and dtype int64\) is not an int32 vector")
    svc._n_support = counts
    assert check_loaded(svc) is None
    svc.classes_ = svc.classes_[:2]
    refused(svc, r"a SVC whose classes_ has 2 entries but its _n_support counts 3 classes")


def test_libsvm_coefficients_must_match_its_classes(svc: SVC) -> None:
    """set_model reads nr_class * (nr_class - 1) / 2 intercepts (and as many _probA/_probB values for
    probabilities) and row i of _dual_coef_ at i * l, nr_class being _n_support's length."""
    n = len(svc.support_)
    intercept, dual, prob_a, prob_b = svc._intercept_, svc._dual_coef_, svc._probA, svc._probB
    svc._intercept_ = intercept[:1]
    refused(svc, r"a SVC whose _intercept_ \(a ndarray of shape \(1,\) and dtype float64\) does not hold the 3 float64 "
                 r"values libsvm reads for 3 classes")
    svc._intercept_ = intercept
    svc._dual_coef_ = np.ascontiguousarray(dual[:1])
    refused(svc, rf"a SVC whose _dual_coef_ \(a ndarray of shape \(1, {n}\) and dtype float64\) is not float64 of "
                 rf"shape \(2, {n}\)")
    svc._dual_coef_ = dual
    svc._probA = prob_a[:1]
    refused(svc, r"a SVC whose _probA \(a ndarray of shape \(1,\) and dtype float64\) does not hold 0 or 3 float64 "
                 r"values")
    svc._probA = svc._probB = np.empty(0)  # its _effective_probability says it computes them
    refused(svc, r"a SVC whose _probA and _probB hold 0 and 0 values where libsvm copies 3 of each")
    svc._probA, svc._probB = prob_a, prob_b
    assert check_loaded(svc) is None


@pytest.mark.parametrize("kind", [SVC, SVR, OneClassSVM])
def test_a_sparse_libsvm_model_is_checked(tmp_path: Path, kind: type) -> None:
    """A model fitted on sparse data predicts through _libsvm_sparse.pyx, which scikit-learn checks not at all:
    csr_set_model takes l from the support vectors' indptr, copies (nr_class - 1) * l values of
    _dual_coef_.data, and the same counts as a dense model's are read (see
    test_unchecked_structures_really_crash); with _effective_probability it copies _probA/_probB."""
    fit = {SVC: (XS, Y3), SVR: (XS, X[:, 0]), OneClassSVM: (XS,)}[kind]
    model = stored(kind().fit(*fit), tmp_path)
    name = kind.__name__
    assert model._sparse and sparse.issparse(model.support_vectors_) and sparse.issparse(model._dual_coef_)
    n = model.support_vectors_.shape[0]
    counts = model._n_support
    if kind is SVC:
        model._n_support = counts + np.array([0, 0, 10**6], dtype=np.int32)
        refused(model, rf"a SVC whose _n_support counts {n + 10**6} support vectors where it has {n}")
    else:
        model._n_support = np.array([n], dtype=np.int32)
        refused(model, rf"a {name} whose _n_support has 1 entries \(libsvm's regression and one-class models have 2\)")
    model._n_support = counts
    assert check_loaded(model) is None
    dual = model._dual_coef_
    model._dual_coef_ = sparse.csr_matrix(dual[:, :-1])
    refused(model, rf"a {name} whose _dual_coef_ has shape \(\d, {n - 1}\) and \d+ stored values where libsvm copies "
                   rf"\d x {n} float64 values")
    model._dual_coef_ = dual
    vectors = model.support_vectors_
    indptr = vectors.indptr.copy()
    indptr[1] = indptr[-1]  # (scipy's constructor checks only the first and last entries and the length)
    model.support_vectors_ = sparse.csr_matrix((vectors.data, vectors.indices, indptr), shape=vectors.shape)
    refused(model, rf"a {name} whose support_vectors_ \(a csr_matrix\) has an indptr that decreases \(at entry 1\)")
    model.support_vectors_ = vectors
    if kind is SVR:
        model._effective_probability = True
        refused(model, r"a SVR whose _probA and _probB hold 0 and 0 values where libsvm copies 1 of each")


def test_a_libsvm_precomputed_kernel_is_read_at_its_support(tmp_path: Path) -> None:
    """With kernel="precomputed" the input is a kernel matrix checked to be shape_fit_[0] wide, and libsvm
    reads its column support_[i] for each support vector (see test_unchecked_structures_really_crash)."""
    model = stored(SVC(kernel="precomputed").fit(X @ X.T, Y3), tmp_path)
    assert model.support_vectors_.shape == (0, 0)
    model.support_ = model.support_.copy()
    model.support_[3] = len(X)
    refused(model, rf"a SVC whose support_ holds {len(X)}, outside the {len(X)} columns of the kernel matrix it is given")


def test_a_libsvm_kind_and_kernel_are_its_classs(tmp_path: Path) -> None:
    """The libsvm model type is the class's _impl (an instance's stored one would win); a callable kernel's
    output goes to libsvm as a precomputed kernel, read at support_ unchecked; a sparse model's precomputed
    kernel (which fit refuses) reads the input at the support vectors' values."""
    model = stored(SVR().fit(X, X[:, 0]), tmp_path)
    model._impl = "c_svc"
    refused(model, r"a SVR whose _impl is stored in the file")
    del model._impl
    model.kernel = np.add  # (a ufunc: a function a model may hold)
    refused(model, r"a SVR whose kernel is a ufunc \(a re-run would read its output's columns at support_, unchecked\)")
    model = stored(SVR().fit(XS, X[:, 0]), tmp_path, "sparse")
    model.kernel = "precomputed"
    refused(model, r"a SVR with a sparse model and a precomputed kernel")


# ---------------------------------------------------------------------------------- sparse matrices

@pytest.fixture
def sparse_coef(tmp_path: Path) -> LogisticRegression:
    """A linear model whose coef_ is a CSR matrix (3 classes x 4 features): predict computes X @ coef_.T
    through scipy's sparsetools, which follows coef_'s indptr and indices unchecked."""
    model = stored(LogisticRegression().fit(X, Y3).sparsify(), tmp_path)
    assert sparse.issparse(model.coef_) and model.coef_.format == "csr" and model.coef_.nnz == 12
    return model


def test_a_sparse_matrix_in_the_file_is_checked_in_full(tmp_path: Path) -> None:
    """skops builds a sparse matrix with scipy's load_npz, whose constructors check the lengths of its index
    arrays but not their values: crafted in the file itself, a column past the matrix or an indptr going back
    is refused (a column 10**9 away segfaulted: see test_unchecked_structures_really_crash)."""
    path = tmp_path / "linear.skops"
    model = LogisticRegression().fit(X, Y3).sparsify()
    skops.io.dump(model, path)
    loaded = load_sklearn(path)
    assert sparse.issparse(loaded.coef_)
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    data = path.read_bytes()
    schema = schema_of(data)
    member = schema["content"]["content"]["coef_"]["file"]
    coef = model.coef_
    indices = coef.indices.copy()
    indices[5] = 4
    indptr = coef.indptr.copy()
    indptr[1] = indptr[2] + 1
    for crafted, message in (((coef.data, indices, coef.indptr), r"has the index 4 outside \[0, 4\)"),
                             ((coef.data, coef.indices, indptr), r"has an indptr that decreases \(at entry 1\)")):
        buffer = BytesIO()
        sparse.save_npz(buffer, sparse.csr_matrix(crafted, shape=coef.shape))
        path.write_bytes(with_schema(data, schema, {member: buffer.getvalue()}))
        with pytest.raises(CaptureError, match=rf"a LogisticRegression whose coef_ \(a csr_matrix\) {message}"):
            load_sklearn(path)


def test_every_sparse_format_is_checked(sparse_coef: LogisticRegression) -> None:
    """load_npz builds CSR, CSC, BSR, DIA or COO, as the file's format says (whatever its schema names),
    each checked as scipy's check_format(full_check=True) or the COO/DIA constructors would."""
    coef = sparse_coef.coef_
    for matrix in (coef.tocsc(), coef.tobsr(blocksize=(1, 2)), coef.tocoo(), coef.todia(), sparse.csr_array(coef)):
        sparse_coef.coef_ = matrix
        assert check_loaded(sparse_coef) is None, type(matrix)
    csc = coef.tocsc()
    csc.indices = np.full_like(csc.indices, 3)  # rows, here
    sparse_coef.coef_ = csc
    refused(sparse_coef, r"a LogisticRegression whose coef_ \(a csc_matrix\) has the index 3 outside \[0, 3\)")
    bsr = coef.tobsr(blocksize=(1, 2))
    bsr.indices = np.full_like(bsr.indices, -1)
    sparse_coef.coef_ = bsr
    refused(sparse_coef, r"whose coef_ \(a bsr_matrix\) has the index -1 outside \[0, 2\)")
    coo = coef.tocoo()
    coo.coords = (coo.coords[0], np.full_like(coo.coords[1], 9))
    sparse_coef.coef_ = coo
    refused(sparse_coef, r"whose coef_ \(a coo_matrix\) has the coordinate 9 outside \[0, 4\) on axis 1")
    dia = coef.todia()
    dia.offsets = dia.offsets[:-1]
    sparse_coef.coef_ = dia
    refused(sparse_coef, r"whose coef_ \(a dia_matrix\) has offsets .* for data of shape")
    csr = coef.copy()
    csr.indices, csr.data = csr.indices[:-1], csr.data[:-1]
    sparse_coef.coef_ = csr
    refused(sparse_coef, r"whose coef_ \(a csr_matrix\) has an indptr of 4 entries from \[0\] to \[12\] with 11 "
                         r"indices and 11 stored values")
    # one met elsewhere than an estimator's attribute
    refused([coo], r"a coo_matrix that has the coordinate 9 outside \[0, 4\) on axis 1")


# ---------------------------------------------------------------------------------------- neighbours

@pytest.mark.parametrize("data", ["dense", "sparse"])
def test_brute_force_neighbours_must_hold_what_they_count(tmp_path: Path, data: str) -> None:
    """kneighbors checks X against n_features_in_ and hands it and _fit_X to the pairwise distances
    reduction, whose datasets pair reads _fit_X's rows with X's width (a narrower _fit_X is read past: see
    test_unchecked_structures_really_crash); kneighbors_graph shapes its CSR output (n_queries,
    n_samples_fit_) around rows of _fit_X, and a re-run's dense copy of it writes at each."""
    model = stored(KNeighborsTransformer(n_neighbors=4, algorithm="brute").fit(X if data == "dense" else XS), tmp_path)
    fit_X = model._fit_X
    model._fit_X = fit_X[:, :2] if data == "sparse" else np.ascontiguousarray(fit_X[:, :2])
    refused(model, r"a KNeighborsTransformer whose _fit_X has shape \(300, 2\) but its n_samples_fit_ is 300 and its "
                   r"n_features_in_ 4")
    model._fit_X = fit_X
    assert check_loaded(model) is None
    model.n_samples_fit_ = 5
    refused(model, r"a KNeighborsTransformer whose _fit_X has shape \(300, 4\) but its n_samples_fit_ is 5")
    model.n_samples_fit_ = len(X)
    del model.n_features_in_  # (then nothing checks X's width)
    refused(model, r"a KNeighborsTransformer whose _fit_X has shape \(300, 4\) but its n_samples_fit_ is 300 and its "
                   r"n_features_in_ None")


def test_a_neighbours_tree_must_hold_its_points(tmp_path: Path) -> None:
    """With a KDTree, kneighbors_graph's columns are the tree's data rows, its width n_samples_fit_. (Its query
    checks X's width: one fitted on another keeps no n_features_in_ and passes.)"""
    model = neighbours(tmp_path, "kd_tree")
    del model.n_features_in_
    assert check_loaded(model) is None
    model._fit_X = np.ascontiguousarray(model._fit_X[:-1])
    model.n_samples_fit_ = len(X) - 1
    refused(model, rf"a KNeighborsClassifier whose _tree holds data of shape \({len(X)}, 4\) but its _fit_X has shape "
                   rf"\({len(X) - 1}, 4\)")


def test_neighbours_labels_must_index_their_classes(tmp_path: Path) -> None:
    """A classifier's predict(_proba) hands _y to ArgKminClassMode / RadiusNeighborsClassMode, which add to
    class_scores[i][_y[neighbour]] in rows of len(classes_): a label past them writes out of bounds (see
    test_unchecked_structures_really_crash)."""
    model = stored(KNeighborsClassifier(algorithm="brute", metric="manhattan").fit(X, Y3), tmp_path)
    labels = model._y
    model._y = labels.copy()
    model._y[7] = 3
    refused(model, r"a KNeighborsClassifier whose _y holds the class index 3, outside its 3 classes_")
    model._y = labels[:-1]
    refused(model, r"a KNeighborsClassifier whose _y \(a ndarray of shape \(299,\) and dtype int64\) is not one integer "
                   r"label per _fit_X row \(300\)")
    model._y = labels.astype(np.float64)
    refused(model, r"whose _y \(a ndarray of shape \(300,\) and dtype float64\) is not one integer label")
    model._y = labels
    assert check_loaded(model) is None
    model.outputs_2d_ = "yes"
    refused(model, r"a KNeighborsClassifier whose outputs_2d_ is 'yes'")
    two = stored(RadiusNeighborsClassifier(radius=3.0).fit(X, np.c_[Y, Y3]), tmp_path, "two")
    two._y = two._y.copy()
    two._y[0, 1] = 5
    refused(two, r"a RadiusNeighborsClassifier whose _y\[:, 1\] holds the class index 5, outside its 3 classes_")


# ------------------------------------------------------------------------- index maps of sparse outputs

CATEGORIES = np.c_[RNG.integers(0, 5, len(X)), RNG.integers(10, 13, len(X))]  # 5 and 3 categories


def test_one_hot_codes_must_fall_within_their_columns(tmp_path: Path) -> None:
    """OneHotEncoder.transform builds a CSR matrix from each column's category code, offset by the running sum
    of _n_features_outs, which scipy does not check; its dense output is that matrix's toarray(), which writes
    each code at its index (see test_unchecked_structures_really_crash). A numeric input's code is
    np.searchsorted(categories_[i], value): len(categories_[i]) when they are not sorted."""
    model = stored(OneHotEncoder(sparse_output=False).fit(CATEGORIES), tmp_path)
    assert model._n_features_outs == [5, 3]
    model._n_features_outs = [5, 2]
    refused(model, r"a OneHotEncoder whose feature 1 \(3 categories_\) can be encoded as column 2 of the 2 that "
                   r"_n_features_outs gives it")
    model._n_features_outs = np.array([5, 3])
    refused(model, r"a OneHotEncoder whose _n_features_outs \[5, 3\] is not a count of output columns per feature")
    model._n_features_outs = [5, 3]
    assert check_loaded(model) is None
    model.categories_ = [model.categories_[0], model.categories_[1][::-1].copy()]
    refused(model, r"whose feature 1 \(3 categories_\) can be encoded as column 3 of the 3")
    model.categories_ = [model.categories_[0], np.array(["x", "z", "y"], dtype=object)]  # looked up in a dict
    assert check_loaded(model) is None


def test_one_hot_infrequent_and_dropped_codes_are_followed(tmp_path: Path) -> None:
    """Codes go through _default_to_infrequent_mappings (an unknown's first through _infrequent_indices) and
    lose the dropped category (_drop_idx_after_grouping): each step can move one out of its columns."""
    skewed = np.c_[np.repeat([0, 1, 2, 3], [200, 80, 15, 5]), CATEGORIES[:, 1]]
    model = stored(OneHotEncoder(min_frequency=20, handle_unknown="infrequent_if_exist", drop="first")
                   .fit(skewed), tmp_path)
    mapping = model._default_to_infrequent_mappings[0]
    assert mapping is not None and model._n_features_outs == [2, 2]
    model._default_to_infrequent_mappings[0] = np.r_[mapping[:-1], 10**12]
    refused(model, r"a OneHotEncoder whose feature 0 \(4 categories_\) can be encoded as column 999999999999 of the 2")
    model._default_to_infrequent_mappings[0] = mapping
    assert check_loaded(model) is None
    drop = model._drop_idx_after_grouping
    model._drop_idx_after_grouping = np.array([drop[0], -3], dtype=object)
    refused(model, r"whose feature 1 \(3 categories_\) can be encoded as column -1 of the 2")
    model._drop_idx_after_grouping = np.array([drop[0], "x"], dtype=object)
    refused(model, r"whose _drop_idx_after_grouping\[1\] is 'x'")


@pytest.mark.parametrize("kind", [DictVectorizer, CountVectorizer, TfidfVectorizer, MultiLabelBinarizer])
def test_an_index_map_must_stay_within_its_columns(tmp_path: Path, kind: type) -> None:
    """DictVectorizer and CountVectorizer (TfidfVectorizer) put vocabulary_[term] as the column of each term
    they meet in a CSR matrix len(vocabulary_) wide, MultiLabelBinarizer its stored _cached_dict[label] (see
    test_unchecked_structures_really_crash)."""
    field = "_cached_dict" if kind is MultiLabelBinarizer else "vocabulary_"
    if kind is DictVectorizer:
        model = kind().fit([{"size": 1.0, "colour": "red"}, {"colour": "blue", "weight": 3}])
    elif kind is MultiLabelBinarizer:
        model = kind().fit([["red", "blue"], ["green"]])
        model.transform([["red"]])  # (which builds the cache)
    else:
        model = kind().fit(["a red ball", "the blue sky", "red sky at night"])
    model = stored(model, tmp_path)
    mapping = vars(model)[field]
    term = min(mapping)
    for value, message in ((len(mapping), (rf"maps '{term}' to column {len(mapping)}, outside the {len(mapping)} "
                                           r"columns of its output")),
                           (-1, rf"maps '{term}' to column -1"),
                           (1.5, r"maps terms to other values than column indices")):
        setattr(model, field, {**mapping, term: value})
        refused(model, rf"a {kind.__name__} whose {field} {message}")


# ---------------------------------------------------------------------- genuine models are not refused

GENUINE = {
    "KMeans": lambda data: KMeans(5, n_init=2, random_state=0).fit(data),
    "MiniBatchKMeans": lambda data: MiniBatchKMeans(5, n_init=2, batch_size=64, random_state=0).fit(data),
    "SVC": lambda data: SVC(kernel="poly", class_weight="balanced").fit(data, Y3),
    "SVC binary linear": lambda data: SVC(kernel="linear").fit(data, Y),
    "NuSVC": lambda data: NuSVC(decision_function_shape="ovo").fit(data, Y3),
    "SVR": lambda data: SVR().fit(data, X[:, 0]),
    "NuSVR": lambda data: NuSVR(kernel="sigmoid", gamma="auto").fit(data, X[:, 0]),
    "OneClassSVM": lambda data: OneClassSVM().fit(data),
    "KNeighborsClassifier": lambda data: KNeighborsClassifier().fit(data, np.array(["a", "b", "c"])[Y3]),
    "KNeighborsClassifier brute": lambda data: KNeighborsClassifier(algorithm="brute", metric="manhattan").fit(data, Y3),
    "RadiusNeighborsClassifier": lambda data: RadiusNeighborsClassifier(radius=3.0, outlier_label="most_frequent")
    .fit(data, np.c_[Y, Y3]),
    "KNeighborsRegressor": lambda data: KNeighborsRegressor(weights="distance").fit(data, X[:, 0]),
    "LocalOutlierFactor": lambda data: LocalOutlierFactor(novelty=True).fit(data),
    "KNeighborsTransformer": lambda data: KNeighborsTransformer(n_neighbors=4).fit(data),
    "Isomap": lambda data: Isomap(n_neighbors=6).fit(data),
    "LogisticRegression sparsified": lambda data: LogisticRegression().fit(data, Y3).sparsify(),
    "SparseRandomProjection": lambda data: SparseRandomProjection(3, random_state=0).fit(data),
    "KernelPCA": lambda data: KernelPCA(3, kernel="rbf").fit(data),
    "scaled SVC": lambda data: make_pipeline(StandardScaler(with_mean=False), SVC()).fit(data, Y),
    "BisectingKMeans": lambda data: BisectingKMeans(6, random_state=0).fit(data),
    "BisectingKMeans elkan": lambda data: BisectingKMeans(4, algorithm="elkan", bisecting_strategy="largest_cluster",
                                                          random_state=0).fit(data),
}


def _outputs(model: Any, data: Any) -> list[np.ndarray]:
    found = []
    for method in ("predict", "transform", "decision_function", "predict_proba", "score_samples"):
        if hasattr(model, method):
            out = getattr(model, method)(data)
            for part in out if isinstance(out, list) else [out]:  # (a multi-output predict_proba's list)
                found.append(part.toarray() if sparse.issparse(part) else np.asarray(part))
    return found


@pytest.mark.parametrize("data", ["dense", "sparse"])
@pytest.mark.parametrize("name", sorted(GENUINE))
def test_genuine_models_pass_and_predict_alike(tmp_path: Path, name: str, data: str) -> None:
    """Fitted as usual (on sparse data too: its sparse matrices are loaded and checked), stored and loaded,
    each model passes its checks and computes what the original does."""
    points = X if data == "dense" else XS
    model = GENUINE[name](points)
    loaded = stored(model, tmp_path)
    for ours, theirs in zip(_outputs(loaded, points[:20]), _outputs(model, points[:20]), strict=True):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("make", [
    lambda: OneHotEncoder().fit(np.c_[CATEGORIES, np.array(["a", "b", None], dtype=object)[Y3]]),
    lambda: OneHotEncoder(sparse_output=False, drop="if_binary", handle_unknown="ignore").fit(np.c_[CATEGORIES, Y]),
    lambda: OneHotEncoder(max_categories=3, handle_unknown="infrequent_if_exist").fit(CATEGORIES),
    lambda: OneHotEncoder(handle_unknown="warn", min_frequency=80, drop="first").fit(CATEGORIES),
    lambda: OneHotEncoder(categories=[[0, 1, 2, 3, 4, 9], [12, 11, 10]]).fit(CATEGORIES.astype(object)),
    lambda: OneHotEncoder().fit(np.where(RNG.random((300, 1)) < 0.1, np.nan, CATEGORIES[:, :1])),
    lambda: DictVectorizer(sparse=False, sort=False).fit([{"a": 1, "b": "x"}, {"c": 2.0, "b": "y"}]),
    lambda: CountVectorizer(ngram_range=(1, 2), max_features=4).fit(["a red ball", "the blue sky", "red sky"] * 3),
    lambda: TfidfVectorizer(vocabulary=["sky", "red", "ball"]).fit(["a red ball", "the blue sky"]),
    lambda: KBinsDiscretizer(4, encode="onehot", quantile_method="averaged_inverted_cdf").fit(X),
], ids=["one-hot", "one-hot dropped", "one-hot infrequent", "one-hot min frequency", "one-hot given categories",
        "one-hot nan", "dict", "count", "tfidf", "bins"])
def test_genuine_encoders_pass(tmp_path: Path, make: Any) -> None:
    stored(make(), tmp_path)


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
    "kmeans": """
        from sklearn.cluster import KMeans
        model = KMeans(3, n_init=1, random_state=0).fit(X)
        model.cluster_centers_ = np.zeros((3, 10**6))  # gemm reads X's rows 10**6 apart
    """,
    "libsvm_sparse": """
        from sklearn.svm import SVC
        model = SVC().fit(sparse.csr_matrix(X), Y)
        model._n_support = model._n_support + np.array([0, 10**8], dtype=np.int32)
    """,
    "sparse_matrix": """
        from sklearn.linear_model import LogisticRegression
        model = LogisticRegression().fit(X, Y).sparsify()
        coef = model.coef_
        model.coef_ = sparse.csr_matrix((coef.data, np.full_like(coef.indices, 10**9), coef.indptr), shape=coef.shape)
    """,
    "neighbour_labels": """
        from sklearn.neighbors import KNeighborsClassifier
        model = KNeighborsClassifier(algorithm="brute", metric="manhattan").fit(X, Y)
        model._y = np.full_like(model._y, 10**9)  # class_scores[i][10**9] += 1
    """,
    "one_hot": """
        from sklearn.preprocessing import OneHotEncoder
        model = OneHotEncoder(sparse_output=False).fit(np.arange(3)[:, None])
        model._infrequent_enabled, model._infrequent_indices = True, [None]
        model._default_to_infrequent_mappings = [np.full(3, 10**12)]
        run = lambda: model.transform(np.array([[1], [2]]))  # toarray() writes at column 10**12
    """,
    "bisecting_kmeans": """
        from sklearn.cluster import BisectingKMeans
        model = BisectingKMeans(3, random_state=0).fit(X)
        del model._X_mean  # (as a model fitted on sparse data has none)
        model._bisecting_tree.left.center = model._bisecting_tree.right.center = np.zeros(10**6)  # read 10**6 apart
    """,
    "vocabulary": """
        from sklearn.feature_extraction import DictVectorizer
        model = DictVectorizer(sparse=False).fit([{"a": 1, "b": 2}])
        model.vocabulary_ = {"a": 10**9, "b": 1}
        run = lambda: model.transform([{"a": 1}] * 3)
    """,
}


@pytest.mark.parametrize("case", sorted(CRASHES))
def test_unchecked_structures_really_crash(case: str) -> None:
    """Without the checks the mount's re-run of such a model segfaults: shown in a child process (never in
    the test's), which check_loaded would have refused."""
    script = "import numpy as np\nfrom scipy import sparse\nfrom mistiquefs.capture.skops_trust import check_loaded\n" \
             "rng = np.random.default_rng(0)\nX = rng.standard_normal((200, 3))\nY = X[:, 0] > 0\n" \
             + textwrap.dedent(CRASHES[case]) \
             + "assert check_loaded(model) is not None\nprint('predicting', flush=True)\n" \
             + "globals().get('run', lambda: model.predict(X))()\n"  # (a case's run, or predict)

    def no_core_dump() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            preexec_fn=no_core_dump)
    assert "predicting" in result.stdout, result.stderr
    assert result.returncode < 0, (result.returncode, result.stderr[-2000:])  # killed by a signal (SIGSEGV)


# ----------------------------------------------------------------------- what a file unpacks to


def test_a_file_whose_arrays_unpack_past_the_memory_share_is_refused(tmp_path: Path, monkeypatch) -> None:
    """A model file of a few KB can hold gigabytes of compressed zeros (a deflated .npy member, or the
    arrays of a sparse matrix's .npz inside the file): loading them would exhaust the daemon's memory, so
    the zip directory's declared sizes, nested ones included, are summed and checked first (here against a
    machine of 4 MB)."""
    import zipfile

    import mistiquefs.capture.base as sk
    from mistiquefs.errors import CaptureError

    monkeypatch.setattr(sk, "_memory_bytes", lambda: 4 << 20, raising=False)
    honest = StandardScaler().fit(np.random.default_rng(0).standard_normal((20, 3)))
    path = tmp_path / "honest.skops"
    skops.io.dump(honest, path)
    assert load_sklearn(path).mean_.shape == (3,)

    bomb = StandardScaler().fit(np.random.default_rng(0).standard_normal((20, 3)))
    bomb.mean_ = np.zeros(400_000)  # 3.2 MB of zeros: deflated, a few KB
    skops.io.dump(bomb, path, compression=zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 100_000

    def no_member_read(*_args, **_kwargs):  # the file's schema is a member too: not read before the check
        raise AssertionError("a member was read before the sizes were checked")

    with monkeypatch.context() as patched:
        patched.setattr(skops.io, "get_untrusted_types", no_member_read)
        with pytest.raises(CaptureError, match=r"unpack to 3,2\d\d,\d\d\d bytes, more than 50% of this machine"):
            load_sklearn(path)

    projection = SparseRandomProjection(5, random_state=0).fit(np.random.default_rng(0).random((20, 50)))
    count = 300_000  # 2.4 MB of explicit zeros and 1.2 MB of indices in the .npz inside the file
    projection.components_ = sparse.csr_matrix(
        (np.zeros(count), np.zeros(count, dtype=np.int32), np.r_[0, np.full(5, count)].astype(np.int32)), shape=(5, 50))
    skops.io.dump(projection, path)
    assert path.stat().st_size < 100_000
    with pytest.raises(CaptureError, match="unpack to"):
        load_sklearn(path)


def test_genuine_models_the_first_checks_refused_load(tmp_path: Path) -> None:
    """A GradientBoosting whose init_ takes neither zeros nor ones (a Box-Cox step takes no zeros; an
    encoder that knows neither value), and an SVC fitted with a class whose weights were all zero (classes_
    has more entries than libsvm counts): real models, loaded and predicting as before."""
    from sklearn.ensemble import GradientBoostingRegressor
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import PowerTransformer

    rng = np.random.default_rng(0)
    x = rng.random((120, 3)) + 0.5
    boxcox = GradientBoostingRegressor(n_estimators=5, init=make_pipeline(PowerTransformer("box-cox"), Ridge()))
    boxcox.fit(x, x[:, 0] * 2)
    np.testing.assert_array_equal(stored(boxcox, tmp_path, "boxcox").predict(x), boxcox.predict(x))
    cats = rng.integers(5, 9, (120, 2)).astype(float)
    encoded = GradientBoostingClassifier(n_estimators=5,
                                         init=make_pipeline(OneHotEncoder(), LogisticRegression()))
    encoded.fit(cats, (cats[:, 0] + cats[:, 1]) % 3)
    np.testing.assert_array_equal(stored(encoded, tmp_path, "encoded").predict(cats), encoded.predict(cats))
    y = rng.integers(0, 3, 120)
    svc = SVC().fit(x, y, sample_weight=np.where(y == 2, 0.0, 1.0))
    assert len(svc.classes_) == 3 and len(svc._n_support) == 2
    np.testing.assert_array_equal(stored(svc, tmp_path, "svc").predict(x), svc.predict(x))


def test_genuine_clustering_and_isotonic_models_load_and_re_run_alike(tmp_path: Path) -> None:
    """BisectingKMeans (its tree of plain nodes, its fit-only k-means function), FeatureAgglomeration with
    numpy reductions as pooling functions, IsotonicRegression in a pipeline (its interp1d), captured in a store
    or saved as it does, load and compute what they computed."""
    x = X[:, :1]
    pipe = make_pipeline(StandardScaler(), IsotonicRegression()).fit(x, X[:, 0] + 0.3 * X[:, 1])
    with mistiquefs.open_store(tmp_path / "store") as store:
        store.capture(pipe, x, name="iso", progress=False)
        model_file = tmp_path / "store" / store.info("iso")["model_file"]
    np.testing.assert_array_equal(load_sklearn(model_file).predict(x), pipe.predict(x))
    from sklearn.calibration import CalibratedClassifierCV

    wide, x32 = np.c_[X, X[:, :2] ** 2], X.astype(np.float32)
    fitted = [(IsotonicRegression(increasing=False, out_of_bounds="clip").fit(x, -X[:, 0]), x),
              (IsotonicRegression().fit(x, np.ones(len(x))), x),  # one threshold: f_ is a closure
              (IsotonicRegression(y_min=-0.5, y_max=0.5).fit(x32[:, 0], X[:, 1]), x32[:, 0]),
              (CalibratedClassifierCV(LogisticRegression(), method="isotonic", cv=2).fit(X, Y), X),
              (BisectingKMeans(3, random_state=0).fit(x32), x32),
              (make_pipeline(StandardScaler(), FeatureAgglomeration(2), BisectingKMeans(3, random_state=0)).fit(X), X)]
    fitted += [(FeatureAgglomeration(3, pooling_func=func).fit(wide), wide)
               for func in (np.mean, np.median, np.max, np.amin, np.sum, np.std, np.var, np.nanmean, np.prod)]
    for i, (model, data) in enumerate(fitted):
        loaded = stored(model, tmp_path, f"model{i}")
        for ours, theirs in zip(_outputs(loaded, data), _outputs(model, data), strict=True):
            np.testing.assert_array_equal(ours, theirs)
