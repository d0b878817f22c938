"""Each loss against values worked by hand (ALGORITHMS.md section 2)."""

import math

import pytest
import torch

from klalign.ops.preference_losses import (
    PREFERENCE_LOSSES,
    bradley_terry_probability,
    expected_label_loss,
    get_preference_loss,
)

# chosen log-ratio 1.0, rejected -1.0 (delta = 2), lengths 2 and 4, beta 0.5
CHOSEN, REJECTED = torch.tensor([1.0]), torch.tensor([-1.0])
LEN_C, LEN_R = torch.tensor([2.0]), torch.tensor([4.0])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("sigmoid", math.log1p(math.exp(-1.0))),  # -log sigmoid(0.5 * 2)
        ("hinge", 0.0),  # relu(1 - 0.5 * 2)
        ("sigmoid_norm", math.log1p(math.exp(-0.375))),  # delta = 1/2 + 1/4 = 0.75; beta*delta = 0.375
        ("ipo", (0.75 - 1.0) ** 2),  # (0.75 - 1/(2*0.5))^2
    ],
)
def test_loss_hand_worked(name, expected):
    loss = get_preference_loss(name)(CHOSEN, REJECTED, LEN_C, LEN_R, 0.5)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def test_hinge_is_active_below_margin():
    loss = get_preference_loss("hinge")(torch.tensor([0.2]), torch.tensor([0.0]), LEN_C, LEN_R, 2.0)
    assert loss.item() == pytest.approx(1 - 2.0 * 0.2)


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_loss_decreases_when_chosen_gains(name):
    """Moving probability toward the chosen response never increases any loss (strictly for most)."""
    fn = get_preference_loss(name)
    low = fn(torch.tensor([0.0]), torch.tensor([0.0]), LEN_C, LEN_R, 0.1)
    high = fn(torch.tensor([0.5]), torch.tensor([0.0]), LEN_C, LEN_R, 0.1)
    assert high.item() <= low.item()


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match="'kto'.*choose one of"):
        get_preference_loss("kto")


def test_expected_label_loss_hand_worked():
    """p = 0.7: 0.7 * -log sigmoid(1) + 0.3 * -log sigmoid(-1) (beta 0.5, delta 2); its minimiser in delta is the
    BT margin: sigmoid(beta * delta) = p, i.e. delta = logit(0.7) / 0.5; p = 1 is DPO itself."""
    sigmoid = get_preference_loss("sigmoid")
    p = torch.tensor([0.7])
    loss = expected_label_loss(sigmoid, CHOSEN, REJECTED, LEN_C, LEN_R, 0.5, p)
    assert loss.item() == pytest.approx(0.7 * math.log1p(math.exp(-1.0)) + 0.3 * math.log1p(math.exp(1.0)), abs=1e-6)
    assert expected_label_loss(sigmoid, CHOSEN, REJECTED, LEN_C, LEN_R, 0.5, torch.tensor([1.0])).item() == \
        pytest.approx(sigmoid(CHOSEN, REJECTED, LEN_C, LEN_R, 0.5).item(), abs=1e-7)
    delta = torch.tensor([math.log(0.7 / 0.3) / 0.5], requires_grad=True)
    expected_label_loss(sigmoid, delta, torch.zeros(1), LEN_C, LEN_R, 0.5, p).sum().backward()
    assert delta.grad.item() == pytest.approx(0.0, abs=1e-6)
    assert bradley_terry_probability(torch.tensor([0.9]), torch.tensor([0.2])).item() == \
        pytest.approx(1 / (1 + math.exp(-0.7)), abs=1e-7)
