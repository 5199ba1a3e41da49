"""Checks shared by the model tests of both families."""
import torch


def assert_checkpointing_changes_nothing(a, b):
    """Model b (activation checkpointing) given a's weights: the same loss and the same gradients on one batch."""
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 300, (2, 24))
    la, lb = a(x, labels=x), b(x, labels=x)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=name)
