"""A second device on a CPU-only machine, for the device-placement tier (tests/test_device.py).

Inside `other_device()`, a tensor moved to `OTHER` ("meta") keeps real values on the CPU but reports the device
"meta", as a tensor moved to a GPU reports "cuda". Every op computes for real (log-probs, gradients, `.item()`,
generation all work), and an op that mixes such a tensor with a CPU tensor raises DeviceMismatch, as CUDA raises
"Expected all tensors to be on the same device". So a model loaded with device="meta" runs each path as it would
on a GPU, and a forgotten `.to(device)` fails here.

The rules follow CUDA's: a 0-dim CPU tensor may join any op (a CPU scalar), CPU index tensors may index
(`x[cpu_idx]`), copies cross devices, and `.numpy()` refuses. "meta" is used because the autograd engine runs
backward on it in a CPU-only torch (a fake "cuda" aborts there); a real meta tensor (no values) made around the
check is refused too.

Not covered: FlexAttention, whose front end accepts only real device types (tested on CUDA by the GPU kit).
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

OTHER = torch.device("meta")
aten = torch.ops.aten
INDEX_OPS = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}


class DeviceMismatch(RuntimeError):
    pass


class Remote(torch.Tensor):
    """Real CPU values (`inner`) behind a tensor that reports the device OTHER."""

    @staticmethod
    def __new__(cls, inner: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=OTHER,
            requires_grad=inner.requires_grad,
        )
        r.inner = inner
        return r

    def tolist(self):  # CUDA tensors copy to the host for tolist() (tensor subclasses are refused by default)
        return self.inner.tolist()

    def numpy(self, *args, **kwargs):
        raise TypeError(f"can't convert {OTHER.type} device type tensor to numpy (copy it to the host first)")

    def __repr__(self):
        return f"Remote({self.inner!r})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise DeviceMismatch(f"{func} ran on a {OTHER.type} tensor outside other_device() (another thread?)")


def _other(device) -> bool:
    return device is not None and torch.device(device).type == OTHER.type


def _inner(t):
    return t.inner if isinstance(t, Remote) else t


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        remote = [t for t in tensors if isinstance(t, Remote)]
        local = [t for t in tensors if not isinstance(t, Remote)]
        if any(t.device.type == OTHER.type for t in local):
            raise DeviceMismatch(f"{func}: a {OTHER.type} tensor without values (made around the check)")
        to_other = _other(kwargs.get("device"))
        kw = {**kwargs, "device": torch.device("cpu")} if to_other else kwargs
        if func is aten._to_copy.default:  # .to(): the one op that moves
            out = func(_inner(args[0]), *args[1:], **kw)
            return Remote(out) if to_other or ("device" not in kwargs and isinstance(args[0], Remote)) else out
        if func is aten.copy_.default:  # copies cross devices
            _inner(args[0]).copy_(_inner(args[1]), *args[2:])
            return args[0]
        if remote:
            ok = set()
            if func in INDEX_OPS:  # CPU index tensors may index a device tensor
                ok = {id(t) for t in tree_flatten(args[1])[0] if isinstance(t, torch.Tensor)}
            bad = [t for t in local if t.dim() > 0 and id(t) not in ok]
            if bad:
                raise DeviceMismatch(
                    f"{func}: Expected all tensors to be on the same device, but found tensors on {OTHER.type} "
                    f"(the model's) and on cpu (shapes {[tuple(t.shape) for t in bad][:3]})"
                )
        out = func(*tree_map(_inner, args), **tree_map(_inner, kw))
        if not (remote or to_other):
            return out
        wrapped = tree_map(lambda t: Remote(t) if isinstance(t, torch.Tensor) else t, out)
        return return_and_correct_aliasing(func, args, kwargs, wrapped) if remote else wrapped


class _Constructors(TorchFunctionMode):
    """torch.tensor(data, device=OTHER) builds on the CPU and moves (torch would make a tensor without values)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and _other(kwargs.get("device")):
            return func(*args, **{**kwargs, "device": "cpu"}).to(OTHER)
        return func(*args, **kwargs)


@contextlib.contextmanager
def other_device():
    """Within: `x.to("meta")`, `model.to("meta")` and `load_model(..., device="meta")` give tensors with values on
    the other device. Modes are per thread: run the model in the calling thread. Module.to() swaps each
    parameter in place (as torch does for tensor subclasses), so tied weights stay one parameter, as on a GPU."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with _Constructors(), _Dispatch():
            yield
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)


def on_other(t: torch.Tensor) -> bool:
    return isinstance(t, Remote)
