"""NF4 (4-bit NormalFloat) weights, bit-compatible with bitsandbytes.

Layout (as bitsandbytes): the weight is flattened row-major and cut into blocks of ``blocksize`` elements;
each block has an fp32 ``absmax``; each element is the index (0..15) of the nearest value of
:data:`NF4_CODE` to ``w / absmax``; two indices per byte, the first element in the high nibble. With
double quantization ("compress_statistics") the absmax vector itself is stored as uint8 codes of the
256-value dynamic map, in blocks of 256, with an fp32 scale per block and a global offset (its mean).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# The 16 NF4 values (quantiles of N(0, 1) normalised to [-1, 1]); exact fp32 values of bitsandbytes.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982355384827, 0.5626170039176941,
        0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)
NESTED_BLOCKSIZE = 256
VALID_BLOCKSIZES = tuple(2**p for p in range(5, 13))  # 32 .. 4096


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit dynamic map used for double-quantized absmax (256 sorted fp32 values).

    Values are ``±10^(e-6) * m`` for exponents e = 0..6, where the mantissas m are the midpoints of an
    even grid on [0.1, 1] with 2^e + 1 points (one more grid at the last exponent fills the remaining
    codes), plus 0 and 1, padded with zeros to 256 and sorted (Dettmers, 2015; as bitsandbytes builds it).
    """
    values = []
    exponents = 7
    for e in range(exponents):
        grid = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        mids = (grid[:-1] + grid[1:]) / 2.0
        scale = 10 ** (-(exponents - 1) + e)
        values += (scale * mids).tolist() + (-scale * mids).tolist()  # products rounded in fp32
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    nblocks = (n + blocksize - 1) // blocksize
    padded = torch.nn.functional.pad(flat.abs(), (0, nblocks * blocksize - n))
    return padded.view(nblocks, blocksize).amax(dim=1)


def _quantize_to_code(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    # nearest code value; a value exactly on a midpoint goes to the lower code (bucketize, right=False)
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints.to(scaled.device))


def _scale(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    inv = (1.0 / absmax.clamp(min=1e-38)).repeat_interleave(blocksize)[:n]
    return torch.clamp(flat * inv, -1, 1)


def quantize_reference(weight: torch.Tensor, blocksize: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Pure-PyTorch NF4 quantization: returns (packed uint8 [n/2], absmax fp32 [nblocks])."""
    flat = weight.reshape(-1).float()
    absmax = _blockwise_absmax(flat, blocksize)
    q = _quantize_to_code(_scale(flat, absmax, blocksize), NF4_CODE.to(flat.device)).to(torch.uint8)
    packed = (q[0::2] << 4) | q[1::2]
    return packed, absmax


def dequantize_absmax(absmax: torch.Tensor, nested_absmax: Optional[torch.Tensor],
                      nested_code: Optional[torch.Tensor], nested_offset: float) -> torch.Tensor:
    """fp32 absmax from its (possibly double-quantized) storage."""
    if absmax.dtype != torch.uint8:
        return absmax.float()
    scale = nested_absmax.float().repeat_interleave(NESTED_BLOCKSIZE)[: absmax.numel()]
    return nested_code.float()[absmax.long()] * scale + nested_offset


def _double_quantize(absmax: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    offset = float(absmax.mean())
    centred = absmax - offset
    nested_absmax = _blockwise_absmax(centred, NESTED_BLOCKSIZE)
    code = dynamic_code().to(absmax.device)
    q = _quantize_to_code(_scale(centred, nested_absmax, NESTED_BLOCKSIZE), code).to(torch.uint8)
    return q, nested_absmax, code, offset


class NF4Weight:
    """A frozen 4-bit NF4 weight of logical shape [out_features, in_features].

    Attributes:
        packed: uint8 [out*in/2], two 4-bit codes per byte (first element in the high nibble).
        absmax: fp32 [nblocks], or uint8 [nblocks] when double-quantized.
        nested_absmax, nested_code, nested_offset: the double-quantization state (fp32 [ceil(nblocks/256)],
            fp32 [256], float), or None/None/0.0.
        shape: (out_features, in_features); blocksize: elements per absmax block; dtype: the dtype
            dequantization produces (the compute dtype).
    """

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                 dtype: torch.dtype = torch.bfloat16, nested_absmax: Optional[torch.Tensor] = None,
                 nested_code: Optional[torch.Tensor] = None, nested_offset: float = 0.0):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"shape must be (out_features, in_features) with positive sizes, got {shape}")
        n = shape[0] * shape[1]
        if blocksize not in VALID_BLOCKSIZES:
            raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize}")
        if n % 2:
            raise ValueError(f"an NF4 weight needs an even number of elements, got {shape[0]}x{shape[1]}")
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            raise TypeError("packed must be a uint8 tensor")
        packed = packed.reshape(-1)
        if packed.numel() != n // 2:
            raise ValueError(f"packed must have {n // 2} bytes for shape {shape}, got {packed.numel()}")
        nblocks = (n + blocksize - 1) // blocksize
        absmax = absmax.reshape(-1)
        if absmax.numel() != nblocks:
            raise ValueError(f"absmax must have {nblocks} entries (blocksize {blocksize}), got {absmax.numel()}")
        if absmax.dtype == torch.uint8:
            if nested_absmax is None or nested_code is None:
                raise ValueError("a uint8 absmax (double quantization) needs nested_absmax and nested_code")
            nested_absmax = nested_absmax.reshape(-1).float().contiguous()
            nested_code = nested_code.reshape(-1).float().contiguous()
            if nested_code.numel() != 256:
                raise ValueError(f"nested_code must have 256 values, got {nested_code.numel()}")
            want = (nblocks + NESTED_BLOCKSIZE - 1) // NESTED_BLOCKSIZE
            if nested_absmax.numel() != want:
                raise ValueError(f"nested_absmax must have {want} entries, got {nested_absmax.numel()}")
        elif absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be float32 (or uint8 when double-quantized), got {absmax.dtype}")
        else:
            nested_absmax = nested_code = None
            nested_offset = 0.0
        self.packed = packed.contiguous()
        self.absmax = absmax.contiguous()
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.nested_offset = float(nested_offset)
        self.shape = torch.Size(shape)
        self.blocksize = int(blocksize)
        self.dtype = dtype

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def quantize(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 dtype: Optional[torch.dtype] = None) -> "NF4Weight":
        """Quantize a 2-D float weight (through the dispatched ``spiel::nf4_quantize`` op)."""
        from ..ops.nf4 import nf4_quantize

        return nf4_quantize(weight, blocksize=blocksize, double_quant=double_quant, dtype=dtype)

    @classmethod
    def from_bnb(cls, weight, quant_state=None) -> "NF4Weight":
        """Wrap a bitsandbytes NF4 weight without copying or re-quantizing.

        Accepts a ``bnb.nn.Params4bit`` (quant_state read from it), a ``bnb.nn.Linear4bit`` or a packed
        tensor plus its ``QuantState``.
        """
        if hasattr(weight, "weight") and hasattr(weight.weight, "quant_state"):
            weight = weight.weight  # a Linear4bit
        if quant_state is None:
            quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise ValueError("weight has no quant_state: is it a quantized bitsandbytes Params4bit on its device?")
        if getattr(quant_state, "quant_type", "nf4") != "nf4":
            raise ValueError(f"only NF4 is supported, got quant_type {quant_state.quant_type!r}")
        packed = weight.data if isinstance(weight, torch.nn.Parameter) else weight
        if packed.dtype != torch.uint8:
            packed = packed.view(torch.uint8)
        shape = tuple(quant_state.shape)
        if quant_state.nested:
            s2 = quant_state.state2
            return cls(packed, quant_state.absmax, shape, quant_state.blocksize, quant_state.dtype,
                       nested_absmax=s2.absmax, nested_code=s2.code, nested_offset=float(quant_state.offset))
        return cls(packed, quant_state.absmax, shape, quant_state.blocksize, quant_state.dtype)

    def to_bnb(self):
        """Return ``(packed [n/2, 1] uint8, QuantState)`` as ``bitsandbytes.functional.quantize_4bit`` does."""
        from bitsandbytes.functional import QuantState

        state2 = None
        offset = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code, blocksize=NESTED_BLOCKSIZE,
                                dtype=torch.float32)
            offset = torch.tensor(self.nested_offset, device=self.device)
        state = QuantState(absmax=self.absmax, shape=self.shape, code=NF4_CODE.to(self.device),
                           blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype, offset=offset,
                           state2=state2)
        return self.packed.view(-1, 1), state

    # ---- use ------------------------------------------------------------------------------------
    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def op_args(self) -> tuple:
        """The tensors/scalars the ``spiel::nf4_*`` ops take, in schema order."""
        return (self.packed, self.absmax, self.nested_absmax, self.nested_code, self.nested_offset,
                self.blocksize, self.shape[0], self.shape[1])

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        from ..ops.nf4 import nf4_dequantize

        return nf4_dequantize(self, dtype=dtype)

    def absmax_fp32(self) -> torch.Tensor:
        return dequantize_absmax(self.absmax, self.nested_absmax, self.nested_code, self.nested_offset)

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "NF4Weight":
        """Move the storage to ``device``; ``dtype`` changes only the compute dtype."""
        move = (lambda t: None if t is None else t.to(device)) if device is not None else (lambda t: t)
        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.blocksize,
                         dtype or self.dtype, move(self.nested_absmax), move(self.nested_code),
                         self.nested_offset)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in
                   (self.packed, self.absmax, self.nested_absmax, self.nested_code) if t is not None)

    def __repr__(self) -> str:
        return (f"NF4Weight(shape={tuple(self.shape)}, blocksize={self.blocksize}, dtype={self.dtype}, "
                f"double_quant={self.double_quant}, device={self.device})")
