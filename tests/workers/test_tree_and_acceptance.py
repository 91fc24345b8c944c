"""Pure tests of draft trees, path acceptance and tree selection on hand-made inputs."""

import torch

from workers.drafters.ngram import ngram_continuations, trie_tree
from workers.drafters.skip import select_tree
from workers.sampling import SamplingParams, greedy_accept, sample_accept, target_probs
from workers.tree import DraftTree, path_to, tree_attention_mask, tree_depths

# Tree used below (node: token):      root
#                                    /    \
#                                0:5      1:7
#                               /   \       \
#                             2:6   3:8     4:9
TREE = DraftTree(torch.tensor([5, 7, 6, 8, 9]), torch.tensor([-1, -1, 0, 0, 1]))


def test_depths_children_and_mask():
    assert tree_depths(TREE.parents).tolist() == [1, 1, 2, 2, 2]
    assert TREE.children() == [[0, 1], [2, 3], [4], [], [], []]
    assert TREE.principal_rows() == [0, 1, 3]  # root, node 0, node 2 (first children)
    assert DraftTree.empty().principal_rows() == [0]
    # Attach points: the principal rows first, then the other rows in tree order.
    assert TREE.attach_rows(2) == [0, 1]
    assert TREE.attach_rows(4) == [0, 1, 3, 2]
    assert TREE.attach_rows(6) == [0, 1, 3, 2, 4, 5]
    assert TREE.attach_rows(16) == [0, 1, 3, 2, 4, 5]
    assert DraftTree.empty().attach_rows(3) == [0]
    mask = tree_attention_mask(TREE.parents)
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],
        [1, 0, 1, 0, 0, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert path_to(TREE.parents, 3) == [0, 3]


def test_pruned_tree_keeps_the_shallow_nodes_and_their_links():
    #      root
    #     /    \
    #   a(0)   b(1)
    #   |  \     \
    # c(2) d(3)  e(4)
    #   |
    #  f(5)
    tree = DraftTree.from_nodes([(10, -1), (11, -1), (12, 0), (13, 0), (14, 1), (15, 2)])
    assert tree.pruned(3) is tree
    two = tree.pruned(2)
    assert two.tokens.tolist() == [10, 11, 12, 13, 14]
    assert two.parents.tolist() == [-1, -1, 0, 0, 1]
    one = tree.pruned(1)
    assert one.tokens.tolist() == [10, 11] and one.parents.tolist() == [-1, -1]
    assert len(tree.pruned(0)) == 0
    # Nodes listed by depth, then best first, as drafters give them, remap their parents.
    mixed = DraftTree.from_nodes([(1, -1), (2, 0), (3, -1), (4, 1), (5, 2)])
    assert mixed.pruned(2).parents.tolist() == [-1, 0, -1, 2]


def test_chain_tree():
    chain = DraftTree.chain([3, 4, 5])
    assert chain.parents.tolist() == [-1, 0, 1]
    assert chain.depths().tolist() == [1, 2, 3]
    assert len(DraftTree.empty()) == 0


def test_greedy_accept_follows_argmax_down_the_tree():
    # verifier wants 7 after the root, then 9 after node 1, then 42 after node 4
    target = {0: 7, 2: 9, 5: 42}
    assert greedy_accept(lambda r: target[r], TREE) == ([1, 4], 42)


def test_greedy_accept_second_branch_partial():
    target = {0: 5, 1: 8, 4: 11}
    assert greedy_accept(lambda r: target[r], TREE) == ([0, 3], 11)


def test_greedy_accept_nothing_gives_bonus_only():
    assert greedy_accept(lambda r: 99, TREE) == ([], 99)
    assert greedy_accept(lambda r: 1, DraftTree.empty()) == ([], 1)


def test_sample_accept_certain_target_walks_path():
    vocab = 50
    probs = torch.zeros(6, vocab)
    probs[0, 7] = 1.0  # root: node 1 certain
    probs[2, 9] = 1.0  # node 1: node 4 certain
    probs[5, 13] = 1.0  # node 4: recovered token 13
    gen = torch.Generator().manual_seed(0)
    assert sample_accept(lambda r: probs[r], TREE, gen) == ([1, 4], 13)


def test_sample_accept_rejects_zero_probability_drafts():
    probs = torch.zeros(6, 20)
    probs[0, 3] = 1.0  # neither 5 nor 7 possible at the root
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert sample_accept(lambda r: probs[r], TREE, gen) == ([], 3)


def test_sample_accept_first_token_distribution_is_exact():
    """Point-mass rejection over two siblings leaves the root's distribution unchanged."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])
    tree = DraftTree(torch.tensor([2, 4]), torch.tensor([-1, -1]))
    probs = torch.zeros(3, 5)
    probs[0] = p
    probs[1] = probs[2] = torch.tensor([1.0, 0, 0, 0, 0])
    gen = torch.Generator().manual_seed(1)
    counts = torch.zeros(5)
    draws = 20000
    for _ in range(draws):
        path, nxt = sample_accept(lambda r: probs[r], tree, gen)
        first = int(tree.tokens[path[0]]) if path else nxt
        counts[first] += 1
    tv = 0.5 * (counts / draws - p).abs().sum()
    assert tv < 0.02, tv


def test_target_probs_temperature_top_k_top_p():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    full = target_probs(logits, SamplingParams(temperature=1.0))
    assert torch.allclose(full, torch.softmax(logits, -1))
    top2 = target_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert top2[0, 2:].sum() == 0 and abs(float(top2.sum()) - 1) < 1e-6
    nucleus = target_probs(logits, SamplingParams(temperature=1.0, top_p=0.5))
    assert nucleus[0].tolist() == [1.0, 0.0, 0.0, 0.0]
    cold = target_probs(logits, SamplingParams(temperature=0.01))
    assert float(cold[0, 0]) > 0.999


def test_select_tree_keeps_best_connected_nodes():
    # candidates: a(-0.1) b(-1.0) under root; a's children c(-0.3) d(-2.0); b's child e(-1.1)
    tokens = [10, 11, 12, 13, 14]
    parents = [-1, -1, 0, 0, 1]
    scores = [-0.1, -1.0, -0.3, -2.0, -1.1]
    depths = [1, 1, 2, 2, 2]
    tree = select_tree(tokens, parents, scores, depths, total=3)
    assert tree.tokens.tolist() == [10, 11, 12]
    assert tree.parents.tolist() == [-1, -1, 0]
    tree = select_tree(tokens, parents, scores, depths, total=4)
    assert tree.tokens.tolist() == [10, 11, 12, 14]
    assert tree.parents.tolist() == [-1, -1, 0, 1]


def test_select_tree_ties_keep_parent_first():
    tree = select_tree([1, 2], [-1, 0], [0.0, 0.0], [1, 2], total=1)
    assert tree.tokens.tolist() == [1] and tree.parents.tolist() == [-1]


def test_ngram_continuations_most_recent_longest_first():
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 7, 5, 2, 3]
    conts = ngram_continuations(tokens, ngram_max=3, ngram_min=1, depth=2, max_branches=4)
    # "2 3" occurs at 5 (-> 8 7) and 1 (-> 9 1); "3" adds nothing new
    assert conts == [[8, 7], [9, 1]]
    assert ngram_continuations([1, 2, 3], 3, 1, 2, 4) == []


def test_trie_tree_merges_shared_prefixes():
    tree = trie_tree([[4, 5, 6], [4, 7], [9]], total=10)
    assert tree.tokens.tolist() == [4, 9, 5, 7, 6]
    assert tree.parents.tolist() == [-1, -1, 0, 0, 2]
    assert len(trie_tree([[4, 5, 6], [4, 7], [9]], total=2)) == 2
