"""KD temperature of the distillation (``DistillConfig.temperature``): the softened teacher, the loss it trains on,
and the setting's validation."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selfxit.fit.config import FitConfig, FitConfigError
from selfxit.fit.distill import DistillConfig, soften, train_body


def test_soften_is_the_softmax_of_the_logits_at_that_temperature():
    logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0)) * 4
    probs = torch.softmax(logits, dim=1)
    for tau in (0.5, 1.0, 2.0, 4.0):
        torch.testing.assert_close(soften(probs, tau), torch.softmax(logits / tau, dim=1), rtol=1e-4, atol=1e-6)
    assert (soften(probs, 4.0).max(1).values < probs.max(1).values).all()  # softer, same top-1
    assert torch.equal(soften(probs, 4.0).argmax(1), probs.argmax(1))


def _one_step(temperature: float, manual: bool) -> torch.Tensor:
    """One full-batch AdamW step of a linear body, by train_body or by the loss written out by hand."""
    g = torch.Generator().manual_seed(1)
    x, teacher_logits = torch.randn(32, 5, generator=g), torch.randn(32, 3, generator=g) * 3
    teacher = torch.softmax(teacher_logits, dim=1)
    torch.manual_seed(2)
    body = nn.Linear(5, 3)
    config = DistillConfig(epochs=1, batch_size=32, lr=0.1, weight_decay=0.0, temperature=temperature)
    if not manual:
        return train_body(body, x, teacher, config, progress=False).weight.detach()
    optimizer = torch.optim.AdamW(body.parameters(), lr=config.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=1)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(config.seed))
    tau = temperature
    loss = tau ** 2 * F.kl_div(F.log_softmax(body(x[order]) / tau, 1), torch.softmax(teacher_logits[order] / tau, 1),
                               reduction="batchmean")
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    schedule.step()
    return body.weight.detach()


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_train_body_minimises_tau_squared_kl_between_softened_softmaxes(temperature):
    torch.testing.assert_close(_one_step(temperature, manual=False), _one_step(temperature, manual=True),
                               rtol=1e-4, atol=1e-5)


def test_the_temperature_changes_the_step():
    assert not torch.allclose(_one_step(3.0, manual=False), _one_step(1.0, manual=False))


def test_temperature_is_validated_at_the_boundary():
    for bad in (0, -2, float("inf"), float("nan"), "2", True):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            DistillConfig(temperature=bad)
    with pytest.raises(FitConfigError, match="distill: DistillConfig temperature must be"):
        FitConfig.from_dict({"distill": {"temperature": "hot"}})
    assert FitConfig.from_dict({"distill": {"temperature": 2}}).distill.temperature == 2
    assert DistillConfig().temperature == 1.0
