"""Low-bit AdamW as a drop-in for torch.optim.AdamW: same steps where states are fp32, close tracking where
they are quantized, the zero-point problem, exact save/resume, non-finite gradients, memory."""

import io

import pytest
import torch

from slimlm.optim import AdamW4bit, AdamW8bit, AdamWFactor4bit, optimizer_state_bytes
from slimlm.optim.codecs import BlockwiseCodec
from slimlm.optim.qmaps import linear_map_with_zero, unsigned_8bit_map
from slimlm.optim.quantize import CodeTable

ALL = [AdamW8bit, AdamW4bit, AdamWFactor4bit]


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: one thread is faster, and the test machine is shared.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_params(shapes, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in shapes]


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=g) * torch.rand(p.shape, generator=g).pow(4)).to(p.dtype)


def clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


@pytest.mark.parametrize("cls", ALL)
def test_small_tensors_step_exactly_like_torch_adamw(cls):
    # <= 4096 elements: fp32 states, torch's arithmetic, so bit-identical with decay, groups, schedulers.
    ours, ref = make_params([(64, 64), (64,), (3, 5, 7)]), None
    ref = clone_params(ours)
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]  # noqa: E731
    opt = cls(groups(ours), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    torch_opt = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (opt, torch_opt)]
    for step in range(10):
        for params, o, sched in ((ours, opt, scheds[0]), (ref, torch_opt, scheds[1])):
            set_grads(params, step)
            torch.nn.utils.clip_grad_norm_(params, max_norm=0.5)
            o.step()
            sched.step()
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [AdamW8bit, AdamW4bit])
def test_first_quantized_step_equals_torch_and_later_steps_stay_close(cls):
    shapes = [(96, 128), (8192,)]
    ours, start = make_params(shapes), make_params(shapes)
    ref = clone_params(ours)
    opt, torch_opt = cls(ours, lr=1e-3), torch.optim.AdamW(ref, lr=1e-3)
    direction = make_params(shapes, seed=7)  # a steady signal under the per-step noise
    for step in range(20):
        for params in (ours, ref):
            set_grads(params, step)
            for p, d in zip(params, direction, strict=True):
                p.grad += d.detach()
        opt.step()
        torch_opt.step()
        if step == 0:  # states start at zero, so the first update uses exact moments
            assert all(torch.equal(a, b) for a, b in zip(ours, ref, strict=True))
    for a, b, s in zip(ours, ref, start, strict=True):
        moved, moved_ref = (a - s).flatten(), (b - s).flatten()
        if cls is AdamW8bit:
            assert (moved - moved_ref).norm() < 0.05 * moved_ref.norm()
        else:  # 16 levels per moment: element-wise noise, same direction of travel
            assert torch.nn.functional.cosine_similarity(moved, moved_ref, dim=0) > 0.9
            assert (moved - moved_ref).norm() < 0.5 * moved_ref.norm()


def classification_run(make_opt, steps=50):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    teacher = torch.randn(32, 10, generator=g)
    y = (x @ teacher).argmax(dim=1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 10))
    opt = make_opt(model.parameters())
    batches = torch.Generator().manual_seed(1)
    initial = torch.nn.functional.cross_entropy(model(x), y).item()
    for _ in range(steps):
        idx = torch.randint(0, 512, (32,), generator=batches)

        def closure(idx=idx):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            return loss

        loss = opt.step(closure)
        assert isinstance(loss, torch.Tensor)
    return initial, torch.nn.functional.cross_entropy(model(x), y).item()


def test_quantized_training_tracks_fp32_adamw_on_a_small_problem():
    initial, reference = classification_run(lambda ps: torch.optim.AdamW(ps, lr=3e-3))
    assert reference < 0.5 * initial  # the problem is actually being learned
    for cls in ALL:
        _, final = classification_run(lambda ps, cls=cls: cls(ps, lr=3e-3))
        assert abs(final - reference) < 0.1 * reference, (cls.__name__, final, reference)


class AdamW4bitWithZeroPoint(AdamW4bit):
    """AdamW4bit whose second moment uses a linear map that contains zero (what Li et al. 2023 warn about)."""

    def moment_codecs(self, p):
        m_codec, v_codec = super().moment_codecs(p)
        if isinstance(m_codec, BlockwiseCodec):
            v_codec = BlockwiseCodec("exp_avg_sq", CodeTable(linear_map_with_zero(4)), self.block_size)
        return m_codec, v_codec


def test_zero_point_in_the_second_moment_map_gives_huge_updates_and_zero_free_does_not():
    lr = 1e-3
    largest = {}
    for cls in (AdamW4bitWithZeroPoint, AdamW4bit, torch.optim.AdamW):
        (p,) = make_params([(8192,)], seed=5)
        opt = cls([p], lr=lr, weight_decay=0.0)
        worst = 0.0
        for step in range(6):
            g = torch.Generator().manual_seed(100 + step)
            # Gradients spanning four orders of magnitude inside every block of 128.
            p.grad = torch.randn(8192, generator=g) * torch.logspace(-4, 0, 128).repeat(64)
            before = p.detach().clone()
            opt.step()
            worst = max(worst, float((p.detach() - before).abs().max()))
        largest[cls.__name__] = worst
    assert largest["AdamW"] < 2 * lr
    assert largest["AdamW4bit"] < 2 * lr
    # v rounded to 0 turns the update into lr * m / eps.
    assert largest["AdamW4bitWithZeroPoint"] > 100 * lr


class AdamW8bitWithZeroPoint(AdamW8bit):
    """AdamW8bit with bitsandbytes' unsigned table as is (0 included) for the second moment."""

    def moment_codecs(self, p):
        m_codec, v_codec = super().moment_codecs(p)
        if isinstance(m_codec, BlockwiseCodec):
            v_codec = BlockwiseCodec("exp_avg_sq", CodeTable(unsigned_8bit_map()), self.block_size)
        return m_codec, v_codec


def test_8bit_second_moment_without_zero_avoids_the_zero_point_blow_up():
    shapes = [(96, 128), (8192,)]
    drift = {}
    for cls in (AdamW8bitWithZeroPoint, AdamW8bit):
        ours, start = make_params(shapes), make_params(shapes)
        ref = clone_params(ours)
        opt, torch_opt = cls(ours, lr=1e-3), torch.optim.AdamW(ref, lr=1e-3)
        for step in range(20):  # pure noise spanning many orders of magnitude per block
            set_grads(ours, step)
            set_grads(ref, step)
            opt.step()
            torch_opt.step()
        with torch.no_grad():
            drift[cls.__name__] = max(
                float((a - b).norm() / (b - s).norm()) for a, b, s in zip(ours, ref, start, strict=True)
            )
    assert drift["AdamW8bitWithZeroPoint"] > 10
    assert drift["AdamW8bit"] < 0.1


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_round_trips_bit_exactly_and_resumes_exactly(cls, dtype):
    shapes = [(64, 96), (5000,), (16,), (4, 32, 48)]
    params = make_params(shapes, dtype=dtype)
    opt = cls(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    for step in range(4):
        set_grads(params, step)
        opt.step()
        sched.step()
    buffer = io.BytesIO()
    torch.save(
        {"opt": opt.state_dict(), "sched": sched.state_dict(), "params": [p.detach() for p in params]}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    restored = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    opt2 = cls(restored, lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 3))
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    assert saved["opt"]["slimlm_optimizer"]["format_version"] == 1
    for p, q in zip(params, restored, strict=True):
        a, b = opt.state[p], opt2.state[q]
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert any(t.dtype == torch.uint8 for t in opt2.state[restored[0]].values())
    assert opt2.state[restored[2]]["exp_avg"].dtype == torch.float32  # not cast to the parameter's dtype

    for step in range(4, 8):
        for ps, o, s in ((params, opt, sched), (restored, opt2, sched2)):
            set_grads(ps, step)
            o.step()
            s.step()
    for p, q in zip(params, restored, strict=True):
        assert p.dtype == dtype and torch.equal(p, q)


@pytest.mark.parametrize("cls", ALL)
def test_non_finite_gradients_propagate_like_torch_adamw(cls):
    ours = make_params([(64, 128), (300,)])
    ref = clone_params(ours)
    opt, torch_opt = cls(ours, lr=1e-3, fp32_state_max_numel=256), torch.optim.AdamW(ref, lr=1e-3)
    for step in range(5):
        for params, o in ((ours, opt), (ref, torch_opt)):
            set_grads(params, step)
            if step == 1:
                params[0].grad[3, 7] = float("nan")
                params[0].grad[10, 100] = float("inf")
                params[1].grad[42] = float("-inf")
            o.step()
    for a, b in zip(ours, ref, strict=True):
        assert torch.equal(torch.isnan(a), torch.isnan(b))
        assert int(torch.isnan(b).sum()) > 0 and bool(torch.isfinite(a[~torch.isnan(a)]).all())


@pytest.mark.parametrize("cls", ALL)
def test_bf16_parameters_step_in_fp32_and_round_once(cls):
    params = make_params([(64, 128), (100,)], dtype=torch.bfloat16)
    fp32 = [torch.nn.Parameter(p.detach().float()) for p in params]
    opt, fp32_opt = cls(params, lr=1e-2), cls(fp32, lr=1e-2)
    for step in range(3):
        set_grads(params, step)
        for p, q in zip(params, fp32, strict=True):
            q.grad = p.grad.float()
        opt.step()
        fp32_opt.step()
        if step == 0:  # same fp32 arithmetic from the same start: the bf16 result is its rounding
            assert all(
                torch.equal(p, q.detach().to(torch.bfloat16)) for p, q in zip(params, fp32, strict=True)
            )
    for p, q in zip(params, fp32, strict=True):
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), q.detach(), rtol=0.02, atol=1e-3)
        assert {t.dtype for t in opt.state[p].values()} <= {torch.float32, torch.uint8}


def test_maximize_and_tensor_lr_follow_torch():
    ours, ref = make_params([(50,)]), None
    ref = clone_params(ours)
    opt = AdamW4bit(ours, lr=torch.tensor(0.01), maximize=True)
    torch_opt = torch.optim.AdamW(ref, lr=0.01, maximize=True)
    for step in range(3):
        set_grads(ours, step)
        set_grads(ref, step)
        opt.step()
        torch_opt.step()
    assert torch.equal(ours[0], ref[0])


def test_state_bytes_are_exact_and_4bit_is_under_15_percent_of_fp32():
    params = make_params([(256, 512), (5000,), (100,)])
    states = {}
    for cls in (torch.optim.AdamW, AdamW8bit, AdamW4bit, AdamWFactor4bit):
        opt = cls(params, lr=1e-3)
        set_grads(params, 0)
        opt.step()
        states[cls.__name__] = optimizer_state_bytes(opt)
    step = 4 * 3  # one float32 step counter per parameter
    small = 2 * 4 * 100
    assert states["AdamW"] == 2 * 4 * (256 * 512 + 5000 + 100) + step
    blocks128 = lambda n: -(-n // 128)  # noqa: E731
    blocks256 = lambda n: -(-n // 256)  # noqa: E731
    m4 = lambda n: blocks128(n) * 64 + blocks128(n) * 4  # noqa: E731  packed codes + absmax
    big, vec = 256 * 512, 5000
    assert (
        states["AdamW8bit"]
        == sum(2 * (blocks256(n) * 256 + blocks256(n) * 4) for n in (big, vec)) + small + step
    )
    assert states["AdamW4bit"] == m4(big) + big // 2 + 4 * (256 + 512) + 2 * m4(vec) + small + step
    assert states["AdamWFactor4bit"] == m4(big) + 4 * (256 + 512) + 2 * m4(vec) + small + step
    assert states["AdamW4bit"] <= 0.15 * states["AdamW"]


def test_state_bytes_count_shared_storage_once():
    (p,) = make_params([(10,)])
    opt = torch.optim.AdamW([p])
    shared = torch.zeros(256)
    opt.state[p] = {"a": shared, "b": shared, "c": shared[:10], "step": 3}
    assert optimizer_state_bytes(opt) == 256 * 4


def test_a_compiled_model_trains_with_the_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 1))
    compiled = torch.compile(model, backend="eager")  # graph capture without a C++ toolchain in the test
    opt = AdamW4bit(model.parameters(), lr=1e-2, fp32_state_max_numel=1000)
    x = torch.randn(64, 64)
    y = x[:, :1] * 2
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(compiled(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert opt.state[model[0].weight]["exp_avg_codes"].dtype == torch.uint8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", ALL)
def test_cuda_steps_match_cpu(cls):
    cpu = make_params([(64, 128), (5000,)])
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    opts = cls(cpu, lr=1e-3), cls(gpu, lr=1e-3)
    for step in range(3):
        set_grads(cpu, step)
        for p, q in zip(cpu, gpu, strict=True):
            q.grad = p.grad.cuda()
        for o in opts:
            o.step()
    for p, q in zip(cpu, gpu, strict=True):
        diff = (q.detach().cpu() - p.detach()).abs()
        # Same ops on both devices; a last-bit difference may flip a code at a midpoint (a bounded change).
        assert float((diff <= 1e-6 + 1e-5 * p.detach().abs()).float().mean()) > 0.999
        assert float(diff.max()) < 3e-3
