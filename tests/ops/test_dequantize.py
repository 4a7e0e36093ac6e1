"""Dequantisation of bitsandbytes' quantised base weights (QLoRA): lorafast's Triton kernel
(interpreted on CPU) and the reference (``reference.dequantize``, the "torch" backend) both
equal bitsandbytes' own decoding bit for bit, for NF4 / FP4 with and without double
quantisation at every block size, 8-bit row-wise (LLM.int8), non-uint8 storage, fp32 /
fp16 / bf16 outputs and odd shapes; and torch.library.opcheck of ``lorafast::dequantize_``.

Every QuantWeight is built from real bitsandbytes output: ``quantize_4bit`` for arbitrary
block sizes (read by ``lorafast.quant.quant_weight`` from a stand-in layer holding the packed
tensor and its QuantState), ``Linear4bit`` / ``Linear8bitLt`` modules quantised by ``.to("cpu")``.
"""
import copy
import types

import pytest
import torch

import lorafast  # noqa: F401  (before bitsandbytes: it sets up the Triton interpreter)
from lorafast import _ops, quant, reference
from support.common import DTYPES, backend_devices, backend_ids, fresh_seed

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

BLOCKS = (32, 64, 128, 256, 4096)
# odd element counts (33·71, 1·7, 47·33: a half-filled last byte, bitsandbytes' portable
# decoder) and an even one whose blocks straddle rows (6·80: its native CPU decoder)
SHAPES = ((33, 71), (1, 7), (47, 33), (6, 80))


@pytest.fixture(params=backend_devices("dequantize_"), ids=backend_ids)
def backend_device(request):
    return request.param


def _eager():
    """bitsandbytes torch.compiles its portable decoder per shape; its eager code is the same
    arithmetic and keeps these tests free of a compile per case."""
    return torch.compiler.set_stance("force_eager")


def quantize_4bit(w, blocksize, nested, quant_type, quant_storage=torch.uint8):
    """(packed, QuantState, QuantWeight) of bitsandbytes' quantisation of w."""
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type,
                                     quant_storage=quant_storage)
    layer = types.SimpleNamespace(weight=types.SimpleNamespace(data=packed, quant_state=state),
                                  out_features=w.shape[0], in_features=w.shape[1])
    qw = quant.quant_weight(layer)
    assert qw.kind == 4 and qw.nested == nested and qw.blocksize == blocksize and qw.shape == tuple(w.shape)
    return packed, state, qw


def bnb_dequantize_4bit(packed, state, dtype):
    """bitsandbytes' decoding of (packed, state) in ``dtype``. It decodes the flat (out·in)
    vector, bitsandbytes' own layout: its AVX-512 CPU kernel (0.50.2), given the 2-D shape,
    decodes row by row and goes wrong where a block straddles two rows (6×80 at blocks of
    32 to 256, e.g.), which lorafast's decoders need not copy."""
    s = copy.copy(state)
    s.dtype = dtype
    s.shape = torch.Size([state.shape[0] * state.shape[1]])
    with _eager():
        return BF.dequantize_4bit(packed, s).reshape(state.shape)


def int8_layer(in_f, out_f):
    """A Linear8bitLt (has_fp16_weights=False), quantised by .to("cpu"), and its QuantWeight."""
    m = bnb.nn.Linear8bitLt(in_f, out_f, bias=False, has_fp16_weights=False)
    m.weight = bnb.nn.Int8Params(torch.randn(out_f, in_f), requires_grad=False, has_fp16_weights=False)
    m = m.to("cpu")
    qw = quant.quant_weight(m)
    assert qw.kind == 8 and qw.data.dtype == torch.int8 and qw.shape == (out_f, in_f)
    return m, qw


def on(qw, device):
    return qw._replace(**{f: getattr(qw, f).to(device) for f in ("data", "absmax", "code", "absmax2", "code2",
                                                                  "offset") if getattr(qw, f) is not None})


def lorafast_dequantize(qw, dtype, backend, device):
    """lorafast's dequantize_ into a fresh contiguous (out, in) buffer, first filled with NaN
    so that an element left unwritten shows."""
    out = torch.full(qw.shape, float("nan"), dtype=dtype, device=device)
    assert _ops.dequantize_(on(qw, device), out, backend=backend) is out
    return out.cpu()


def assert_bits_equal(name, got, want):
    assert got.dtype == want.dtype and got.shape == want.shape, name
    if not torch.equal(got, want):
        bad = (got != want).nonzero()
        i = tuple(bad[0].tolist())
        raise AssertionError(f"{name}: {len(bad)} of {want.numel()} elements differ, first at {i}: "
                             f"{got[i].item()!r} != {want[i].item()!r}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("blocksize", BLOCKS)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_equals_bitsandbytes(backend_device, quant_type, nested, blocksize, shape):
    backend, device = backend_device
    fresh_seed()
    w = torch.randn(shape) * 3
    packed, state, qw = quantize_4bit(w, blocksize, nested, quant_type)
    if nested:   # the block scales, decoded from their 8-bit codes
        with _eager():
            absmax = BF.dequantize_blockwise(state.absmax, state.state2) + state.offset
        assert_bits_equal("absmax", reference.dequantize_absmax(qw), absmax.float())
    for dtype in DTYPES:
        want = bnb_dequantize_4bit(packed, state, dtype)
        assert_bits_equal(f"reference {dtype}", reference.dequantize(qw, dtype), want)
        assert_bits_equal(f"{backend} {dtype}", lorafast_dequantize(qw, dtype, backend, device), want)


def test_4bit_decodes_the_weight():
    """A sanity check of the spec itself: the decoded weight is within half a code step of w."""
    fresh_seed()
    w = torch.randn(47, 33)
    _, _, qw = quantize_4bit(w, 64, True, "nf4")
    err = (reference.dequantize(qw) - w).abs().max().item()
    assert err < 0.25 * w.abs().max().item(), err


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float16, torch.float32, torch.int8], ids=str)
@pytest.mark.parametrize("shape", [(33, 71), (1, 7), (6, 80)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_4bit_storage_dtypes(backend_device, quant_storage, shape):
    """Packed bytes held in a bf16 / fp16 / fp32 / int8 tensor (FSDP's quant_storage): the
    same bytes decode the same, including a last element that only part of it holds."""
    backend, device = backend_device
    fresh_seed()
    w = torch.randn(shape)
    packed, state, qw = quantize_4bit(w, 64, True, "nf4", quant_storage=quant_storage)
    assert qw.data.dtype == quant_storage
    for dtype in DTYPES:
        want = bnb_dequantize_4bit(packed, state, dtype)
        assert_bits_equal(f"reference {dtype}", reference.dequantize(qw, dtype), want)
        assert_bits_equal(f"{backend} {dtype}", lorafast_dequantize(qw, dtype, backend, device), want)


@pytest.mark.parametrize("quant_storage", [torch.uint8, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_linear4bit_layer(backend_device, quant_type, nested, quant_storage):
    """quant_weight of a real Linear4bit (quantised by .to("cpu")) decodes as bitsandbytes
    decodes the layer's own weight and state (in its state's dtype), and in every dtype."""
    backend, device = backend_device
    fresh_seed()
    for in_f, out_f in ((71, 33), (128, 5)):
        m = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, compress_statistics=nested,
                              quant_type=quant_type, quant_storage=quant_storage).to("cpu")
        quant.check_quantised(m)
        qw = quant.quant_weight(m)
        assert qw.data is m.weight.data or qw.data.data_ptr() == m.weight.data.data_ptr()   # read, not copied
        state = m.weight.quant_state
        with _eager():
            own = BF.dequantize_4bit(m.weight.data, state)
        assert_bits_equal("reference (layer's state)", reference.dequantize(qw, own.dtype), own)
        for dtype in DTYPES:
            want = bnb_dequantize_4bit(m.weight.data, state, dtype)
            assert_bits_equal(f"reference {dtype}", reference.dequantize(qw, dtype), want)
            assert_bits_equal(f"{backend} {dtype}", lorafast_dequantize(qw, dtype, backend, device), want)


@pytest.mark.parametrize("shape", [(47, 33), (1, 7), (33, 71)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_int8_equals_bitsandbytes(backend_device, shape):
    """LLM.int8's row-wise weight: CB · SCB / 127 in fp32 as int8_vectorwise_dequant, rounded
    once to fp16 / bf16."""
    backend, device = backend_device
    fresh_seed()
    out_f, in_f = shape
    m, qw = int8_layer(in_f, out_f)
    want32 = BF.int8_vectorwise_dequant(m.weight.data, m.weight.SCB)
    for dtype in DTYPES:
        want = want32.to(dtype)
        assert_bits_equal(f"reference {dtype}", reference.dequantize(qw, dtype), want)
        assert_bits_equal(f"{backend} {dtype}", lorafast_dequantize(qw, dtype, backend, device), want)


@pytest.mark.parametrize("case", ["transposed", "row-padded", "swapped-shape", "row-too-many", "row-too-few"])
def test_out_that_is_not_the_contiguous_weight_is_never_written_wrong(backend_device, case):
    """dequantize_ writes the (out, in) weight into a contiguous ``out``: an ``out`` of another
    shape, or a strided view, is refused (and left as it was) or written correctly; never
    filled with a scrambled weight, nor read past the end of the packed data."""
    backend, device = backend_device
    fresh_seed()
    _, _, qw = quantize_4bit(torch.randn(6, 10), 32, False, "nf4")
    want = reference.dequantize(qw)
    out = {"transposed": lambda: torch.zeros(10, 6).T,
           "row-padded": lambda: torch.zeros(6, 12)[:, :10],
           "swapped-shape": lambda: torch.zeros(10, 6),
           "row-too-many": lambda: torch.zeros(7, 10),
           "row-too-few": lambda: torch.zeros(5, 10)}[case]().to(device)
    before = out.clone()
    try:
        _ops.dequantize_(on(qw, device), out, backend=backend)
    except (ValueError, RuntimeError):
        assert torch.equal(out, before), "a refused out was written"
        return
    assert out.shape == want.shape, f"an out of shape {tuple(out.shape)} was filled with the {want.shape} weight"
    assert_bits_equal("strided out", out.cpu(), want)


# ------------------------------------------------------------------ torch.library.opcheck


def _opcheck_weights():
    fresh_seed()
    w = torch.randn(9, 13)
    yield "nf4-nested", quantize_4bit(w, 32, True, "nf4")[2]
    yield "fp4-plain", quantize_4bit(w, 64, False, "fp4")[2]
    yield "int8", int8_layer(13, 9)[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend_device", [p for p in backend_devices("dequantize_") if p[1] == "cpu"],
                         ids=backend_ids)
def test_opcheck(backend_device, dtype):
    """The schema (``out`` mutated, nothing else), the fake kernel and AOT dispatch, for each
    kind of weight (the optional second-level tensors present and absent)."""
    backend, _ = backend_device
    for _, qw in _opcheck_weights():
        out = torch.empty(qw.shape, dtype=dtype)
        torch.library.opcheck(_ops.REGISTERED["dequantize_"], (*_ops.quant_args(qw), out, backend))
