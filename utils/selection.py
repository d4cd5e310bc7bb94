"""Which images a stored set keeps (validate.py --select): a random draw (the default), or k-means.

k-means, per class: embed the candidates with a classifier (its penultimate features, eval mode), cluster
them into ipc clusters, keep in each cluster the member nearest its centroid. The set still holds ipc
images per class; only which ones changes. DiM's follow-up (DD-NU) and D4M store generated samples
chosen this way; coreset work does the same with real images.
"""
import numpy as np
import torch
from sklearn.cluster import KMeans

from data.datasets import to_classifier_input

SELECTIONS = ('random', 'kmeans')
# DiM candidates drawn per stored image: enough that the ipc clusters have members to choose among (at
# ipc 1, ten draws per class), few enough that the draw and the clustering stay seconds on a CPU
DEFAULT_CANDIDATES = 10
KMEANS_RESTARTS = 3  # k-means++ starts; the lowest inertia wins (scikit-learn's n_init)
EMBED_CHUNK = 1000  # images per forward pass of the features classifier


@torch.no_grad()
def embed(model, images, info, device):
    """The penultimate features (float64 numpy [N, D]) of `images`: uint8 real ones are normalised as
    test images, generated ones come normalised. `model` is in eval mode (utils.checkpoint.load_teacher):
    each image is embedded alone."""
    parts = []
    for chunk in images.split(EMBED_CHUNK):
        x = chunk.to(device)
        if x.dtype == torch.uint8:
            x = to_classifier_input(x, info)
        parts.append(model.embed(x).double().cpu())
    return torch.cat(parts).numpy()


def kmeans_per_class(features, labels, num_classes, ipc, seed):
    """Indices into `features` (class-major: ipc of class 0, then of class 1, ...): per class, k-means
    with k = ipc seeded by `seed`, and in each cluster the member nearest its centroid, so the picks
    are distinct. `labels` is a CPU tensor or array of the candidates' classes."""
    labels = np.asarray(labels)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < ipc:
            raise ValueError(f"class {c} has {len(members)} candidates, fewer than ipc {ipc}")
        x = features[members]
        km = KMeans(n_clusters=ipc, n_init=KMEANS_RESTARTS, random_state=seed).fit(x)
        distance = ((x - km.cluster_centers_[km.labels_]) ** 2).sum(1)
        free = np.ones(len(members), dtype=bool)
        for j in range(ipc):
            # a cluster k-means left empty (duplicates among the candidates) takes the nearest unpicked one
            pool = np.flatnonzero((km.labels_ == j) & free)
            if len(pool) == 0:
                pool = np.flatnonzero(free)
                to_centre = ((x[pool] - km.cluster_centers_[j]) ** 2).sum(1)
            else:
                to_centre = distance[pool]
            pick = pool[to_centre.argmin()]
            free[pick] = False
            chosen.append(members[pick])
    return torch.as_tensor(np.array(chosen), dtype=torch.long)
