"""An independent, deliberately naive implementation of DESIGN.md's method, for cross-checking.

Written from the text of the method with plain Python sorts on (-score, position) keys; shares no
code with rsprune_data.selection.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np


def reference_select(
    entropy,
    cluster_ids,
    similarity,
    *,
    num_clusters,
    prune_ratio,
    entropy_keep=None,
    entropy_threshold=None,
    valid=None,
) -> list[int]:
    n = len(entropy)
    valid = [True] * n if valid is None else [bool(v) for v in valid]
    b = math.floor((1 - prune_ratio) * n + 0.5)
    valid_pos = [i for i in range(n) if valid[i]]
    if entropy_keep is not None:
        m = min(math.floor(entropy_keep * n + 0.5), len(valid_pos))
        ranked = sorted(valid_pos, key=lambda i: (-float(entropy[i]), i))
        cand = sorted(ranked[:m])
    elif entropy_threshold is not None:
        cand = [i for i in valid_pos if float(entropy[i]) >= entropy_threshold]
    else:
        cand = valid_pos
    if len(cand) <= b:
        return cand
    q = b // num_clusters
    by_cluster: dict[int, list[int]] = defaultdict(list)
    for i in cand:
        by_cluster[int(cluster_ids[i])].append(i)
    taken: set[int] = set()
    for members in by_cluster.values():
        members.sort(key=lambda i: (-float(similarity[i]), i))
        taken.update(members[:q])
    rest = sorted((i for i in cand if i not in taken), key=lambda i: (-float(similarity[i]), i))
    taken.update(rest[: b - len(taken)])
    return sorted(taken)


def reference_moderate(cluster_ids, similarity, *, num_clusters, prune_ratio, valid=None):
    n = len(similarity)
    valid = [True] * n if valid is None else [bool(v) for v in valid]
    b = math.floor((1 - prune_ratio) * n + 0.5)
    pos = [i for i in range(n) if valid[i]]
    if len(pos) <= b:
        return pos
    groups: dict[int, list[float]] = defaultdict(list)
    for i in pos:
        groups[int(cluster_ids[i])].append(1.0 - float(similarity[i]))
    med = {k: float(np.median(v)) for k, v in groups.items()}
    ranked = sorted(
        pos, key=lambda i: (abs((1.0 - float(similarity[i])) - med[int(cluster_ids[i])]), i)
    )
    return sorted(ranked[:b])
