"""recompute_bn_stats: BN running statistics become the plain average over the given batches."""
import torch
import torch.nn as nn

from yolo_q.engine.bn_stats import recompute_bn_stats


def test_recompute_bn_stats_averages_batches_and_restores_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.1), nn.ReLU())
    model.eval()
    bn = model[1]
    bn.running_mean.fill_(5.0)  # stale statistics that do not belong to the weights
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k
               and "num_batches" not in k}
    batches = [(torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), None) for _ in range(4)]
    n = recompute_bn_stats(model, batches, num_batches=3)
    assert n == 3 and not model.training and bn.momentum == 0.1
    with torch.no_grad():
        outs = [model[0](b[0].float() / 255) for b in batches[:3]]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).reshape(4, -1).var(1, unbiased=True) for o in outs]).mean(0)
    assert torch.allclose(bn.running_mean, mean, atol=1e-6)
    assert torch.allclose(bn.running_var, var, atol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())

    before = bn.running_mean.clone()
    assert recompute_bn_stats(model, [], num_batches=5) == 0  # nothing seen: unchanged
    assert torch.equal(bn.running_mean, before)
