"""Metrics of two feature sets beyond FID: improved precision and recall (Kynkäänniemi et al.
2019), density and coverage (Naeem et al. 2020), and the kernel inception distance (KID,
Bińkowski et al. 2018). Real features X (N, D) and generated features Y (M, D), float64.

The nearest-neighbour metrics need distances between every real and every generated sample;
they are computed in blocks of BLOCK rows, so that 50,000 x 50,000 distances (20 GB in
float64) never sit in memory at once: what a block leaves behind is a count or a minimum per
sample. Non-finite features are an error, never a result.
"""
import torch

BLOCK = 2048


def checked(name, features):
    """features as float64 (N, D), or ValueError naming what is wrong."""
    features = torch.as_tensor(features).double()
    if features.dim() != 2 or len(features) < 2:
        raise ValueError(f"{name} features must be (N >= 2, D), got shape {tuple(features.shape)}")
    if not torch.isfinite(features).all():
        raise ValueError(f"{name} features hold NaN or inf: no metric of them exists")
    return features


def neighbour_radii(features, k):
    """r_k(x): the distance from each x to its k-th nearest neighbour in the same set, itself
    excluded (its own distance 0 is the first of the sorted distances)."""
    if not 1 <= k < len(features):
        raise ValueError(f"k = {k} nearest neighbours need more than {k} samples, got {len(features)}")
    radii = [torch.cdist(features[i:i + BLOCK], features).kthvalue(k + 1, dim=1).values
             for i in range(0, len(features), BLOCK)]
    return torch.cat(radii)


def precision_recall_density_coverage(real, fake, k_pr=3, k_dc=5):
    """{precision, recall, density, coverage}. With B(x, r) the open ball of radius r:
        precision = (1/M) sum_j 1[y_j in some B(x_i, r_k(x_i))]        (k = k_pr)
        recall    = (1/N) sum_i 1[x_i in some B(y_j, r_k(y_j))]        (k = k_pr)
        density   = 1/(k M) sum_j sum_i 1[y_j in B(x_i, r_k(x_i))]      (k = k_dc)
        coverage  = (1/N) sum_i 1[some y_j in B(x_i, r_k(x_i))]         (k = k_dc)
    Precision asks how many samples look real, recall how much of the real data the samples
    reach; density counts how many real neighbourhoods hold each sample, so outliers of the
    real set do not inflate it, and coverage is recall measured from the real side."""
    real, fake = checked("real", real), checked("generated", fake)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have {real.shape[1]} dimensions, generated ones {fake.shape[1]}")
    real_pr, fake_pr = neighbour_radii(real, k_pr), neighbour_radii(fake, k_pr)
    real_dc = real_pr if k_dc == k_pr else neighbour_radii(real, k_dc)
    fake = fake.to(real.device)
    precise = torch.zeros(len(fake), dtype=torch.bool, device=real.device)
    recalled = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    balls_holding = torch.zeros(len(fake), dtype=torch.float64, device=real.device)
    covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for i in range(0, len(real), BLOCK):
        distances = torch.cdist(real[i:i + BLOCK], fake)  # (block of real, M)
        precise |= (distances < real_pr[i:i + BLOCK, None]).any(dim=0)
        recalled[i:i + BLOCK] = (distances < fake_pr[None, :]).any(dim=1)
        inside = distances < real_dc[i:i + BLOCK, None]
        balls_holding += inside.sum(dim=0)
        covered[i:i + BLOCK] = inside.any(dim=1)
    return {"precision": precise.double().mean().item(), "recall": recalled.double().mean().item(),
            "density": (balls_holding.mean() / k_dc).item(), "coverage": covered.double().mean().item()}


def polynomial_kernel(a, b):
    """k(x, y) = (x . y / D + 1)^3, KID's kernel."""
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def unbiased_mmd2(x, y):
    """The unbiased estimate of MMD^2 between the sets' distributions (Bińkowski et al. eq. 4,
    Gretton et al. 2012), for sets of equal size m:
        1/(m(m-1)) sum_{i != j} [k(x_i, x_j) + k(y_i, y_j)] - 2/m^2 sum_{i, j} k(x_i, y_j)."""
    m = len(x)
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2.0 * k_xy.sum() / m ** 2


def kernel_inception_distance(real, fake, num_subsets=100, subset_size=1000, seed=0):
    """{KID, KID_std}: the mean and the (population) standard deviation of unbiased_mmd2 over
    num_subsets pairs of subsets of subset_size samples, as torch-fidelity and torchmetrics
    report it. Subset s takes the first subset_size of torch.randperm(N), then of
    torch.randperm(M), drawn in that order from one generator seeded with seed (torchmetrics'
    order from the global generator: the same subsets after torch.manual_seed(seed)).
    Unbiased: near 0 (either sign) for two samples of one distribution, at any size."""
    real, fake = checked("real", real), checked("generated", fake)
    if min(len(real), len(fake)) < subset_size or subset_size < 2:
        raise ValueError(f"KID subsets of {subset_size} need at least that many samples of each set, "
                         f"got {len(real)} real and {len(fake)} generated")
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same subsets on any device
    values, fake = [], fake.to(real.device)
    for _ in range(num_subsets):
        real_subset = real[torch.randperm(len(real), generator=generator)[:subset_size].to(real.device)]
        fake_subset = fake[torch.randperm(len(fake), generator=generator)[:subset_size].to(real.device)]
        values.append(unbiased_mmd2(real_subset, fake_subset))
    values = torch.stack(values)
    return {"KID": values.mean().item(), "KID_std": values.std(unbiased=False).item()}
