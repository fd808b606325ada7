"""Reading a layer's parameters and buffers on every call, cheaply."""

from __future__ import annotations

from torch import nn

__all__ = ["registered"]


def registered(module: nn.Module, name: str) -> object:
    """``getattr(module, name)`` for a parameter or buffer of ``module``.

    An ordinary read of a parameter or buffer falls through to ``nn.Module.__getattr__``,
    ~0.4 us a read, and a layer reads two to five of them per call: up to a tenth of a
    small input's eval-mode BatchNorm. So the name is looked up in the module's own
    tables first, which is what ``__getattr__`` returns for it: ``nn.Module.__setattr__``
    keeps those tables and the instance dict apart, ``torch.func.functional_call`` swaps
    its tensors inside ``_parameters``, and a parametrization
    (``torch.nn.utils.parametrize``) moves its tensor out of them and reads it through a
    property, which the ordinary read then finds.
    """
    table = module._parameters
    if name in table:
        return table[name]
    table = module._buffers
    if name in table:
        return table[name]
    return getattr(module, name)
