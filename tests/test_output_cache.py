"""The cache of large output buffers (normlab.backends.cpu.outputs)."""

from __future__ import annotations

import gc

import pytest
import torch

from normlab.backends.cpu import outputs

BIG = (4, 16, 64, 64)  # 1 MiB of float32: the smallest cached size


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("NORMLAB_OUTPUT_CACHE_MB", raising=False)
    outputs.clear()
    yield
    outputs.clear()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_outputs_have_the_layout_of_the_input(fmt):
    like = torch.empty(BIG).contiguous(memory_format=fmt)
    out = outputs.empty_like(like)
    assert out.shape == like.shape and out.dtype == like.dtype and out.stride() == like.stride()
    out.copy_(torch.arange(out.numel(), dtype=out.dtype).view(like.shape))
    gc.collect()
    assert outputs.cached_bytes() == 0, "the buffer of a live output went back to the cache"
    other = outputs.empty_like(like)
    other.fill_(-1.0)
    assert torch.equal(out, torch.arange(out.numel(), dtype=out.dtype).view(like.shape))


def test_released_buffer_serves_the_next_output_of_its_size():
    like = torch.empty(BIG)
    first = outputs.empty_like(like)
    ptr = first.data_ptr()
    assert outputs.cached_bytes() == 0
    del first
    gc.collect()
    assert outputs.cached_bytes() == like.numel() * 4
    second = outputs.empty_like(like)
    assert second.data_ptr() == ptr
    assert outputs.cached_bytes() == 0
    other = outputs.empty_like(torch.empty(2, *BIG[1:]).double())  # same bytes, other dtype
    assert other.data_ptr() != ptr or outputs.cached_bytes() == 0


def test_a_live_view_keeps_the_buffer_out_of_the_cache():
    like = torch.empty(BIG)
    out = outputs.empty_like(like)
    ptr = out.data_ptr()
    view = out[1:3].view(-1)
    view.fill_(7.0)
    del out
    gc.collect()
    assert outputs.cached_bytes() == 0, "a view still uses the buffer"
    again = outputs.empty_like(like)
    assert again.data_ptr() != ptr
    again.fill_(-1.0)
    assert torch.all(view == 7.0), "the live view was overwritten"
    del view
    gc.collect()
    assert outputs.cached_bytes() == like.numel() * 4


def test_limit_and_switch_off(monkeypatch):
    like = torch.empty(BIG)
    monkeypatch.setenv("NORMLAB_OUTPUT_CACHE_MB", "1.5")
    a, b = outputs.empty_like(like), outputs.empty_like(like)
    del a
    gc.collect()
    del b
    gc.collect()
    assert outputs.cached_bytes() == like.numel() * 4, "only one 1 MiB buffer fits in 1.5 MiB"
    monkeypatch.setenv("NORMLAB_OUTPUT_CACHE_MB", "0")
    plain = outputs.empty_like(like)
    plain.resize_(2 * like.numel())  # a torch-allocated tensor: resizable
    monkeypatch.setenv("NORMLAB_OUTPUT_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="NORMLAB_OUTPUT_CACHE_MB"):
        outputs.empty_like(like)


def test_small_outputs_are_plain_torch_tensors():
    small = outputs.empty_like(torch.empty(8, 32, 40))
    small.resize_(10 * small.numel())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_outputs_come_from_the_cache_with_their_dtype(dtype):
    like = torch.empty(8, *BIG[1:], dtype=dtype)  # 1 MiB of 16-bit values
    out = outputs.empty_like(like)
    assert out.dtype == dtype and out.shape == like.shape
    values = torch.randn(like.shape).to(dtype)
    out.copy_(values)
    assert torch.equal(out, values)
    ptr = out.data_ptr()
    del out
    gc.collect()
    assert outputs.empty_like(like).data_ptr() == ptr


def test_layer_outputs_and_gradients_through_the_cache_match_torch():
    """A few training steps on cached outputs (y and dx reused across steps) equal torch.nn."""
    import normlab as nl
    from normlab.backends import cpu

    if not cpu.enable():
        pytest.skip("numba not installed")
    torch.manual_seed(0)
    ours, ref = nl.BatchNorm2d(16), torch.nn.BatchNorm2d(16)
    for step in range(3):
        x = torch.randn(BIG, requires_grad=True)
        xr = x.detach().clone().requires_grad_()
        y, yr = ours(x), ref(xr)
        dy = torch.randn(BIG)
        y.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(y, yr, atol=1e-5, rtol=1e-5, msg=f"output, step {step}")
        torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5, msg=f"input grad, step {step}")
        del y, x
    assert outputs.cached_bytes() > 0, "released outputs should have gone back to the cache"


def test_outputs_are_aligned_like_torchs():
    for shape in (BIG, (3, 5, 129, 131)):
        assert outputs.empty_like(torch.empty(shape)).data_ptr() % 64 == 0


def test_least_recently_returned_sizes_are_evicted(monkeypatch):
    monkeypatch.setenv("NORMLAB_OUTPUT_CACHE_MB", "2")
    small, large = torch.empty(BIG), torch.empty(6, *BIG[1:])  # 1 MiB and 1.5 MiB
    a = outputs.empty_like(small)
    b = outputs.empty_like(large)
    b_ptr = b.data_ptr()
    del a
    gc.collect()
    del b
    gc.collect()
    assert outputs.cached_bytes() == 6 * 16 * 64 * 64 * 4, "the 1 MiB buffer made room for the 1.5 MiB one"
    assert outputs.empty_like(large).data_ptr() == b_ptr


def test_finalizer_inside_the_lock_does_not_deadlock():
    """A garbage collection started while the cache's lock is held can run a cached
    output's finalizer on the same thread: the lock must be re-entrant."""
    import threading

    out = outputs.empty_like(torch.empty(BIG))
    cycle = [out]
    cycle.append(cycle)  # freed only by the cycle collector
    del out

    def collect_under_lock():
        with outputs._lock:
            del cycle[:]  # break nothing yet: the list still refers to itself
            gc.collect()

    worker = threading.Thread(target=collect_under_lock, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "deadlock: the finalizer waited for a lock its own thread held"


def test_cached_outputs_cross_process_boundaries():
    """Outputs made from cached buffers in forked DataLoader workers travel through the
    worker queue (shared memory) intact, and the workers' buffers are reused safely."""
    import normlab.functional as NF
    from normlab.backends import cpu

    if not cpu.enable():
        pytest.skip("numba not installed")
    torch.manual_seed(4)
    data = torch.randn(6, 6, 16, 64, 64)  # 1.5 MiB per sample: its outputs are cached

    class Samples(torch.utils.data.Dataset):
        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return NF.batch_norm(data[i], None, None, training=True)

    expected = torch.stack([NF.batch_norm(d, None, None, training=True) for d in data])
    loader = torch.utils.data.DataLoader(Samples(), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork")
    got = torch.stack(list(loader))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
