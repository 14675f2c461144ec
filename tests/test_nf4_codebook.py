"""nf4/codebook.py: the NF4 table and bitsandbytes' dynamic map, against bitsandbytes and from first principles."""
import torch
from reference_libs import reference

import nf4


def test_nf4_code_is_bitsandbytes_table():
    bnb = reference("bitsandbytes")
    assert nf4.NF4_CODE.dtype == torch.float32
    assert torch.equal(nf4.NF4_CODE, bnb.functional.get_4bit_type("nf4", device="cpu"))


def test_nf4_code_from_normal_quantiles_agrees_to_1e6():
    derived = nf4.nf4_code_from_normal()
    assert derived.shape == (16,) and derived.dtype == torch.float32
    assert (derived - nf4.NF4_CODE).abs().max().item() < 1e-6


def test_nf4_code_structure():
    """8 positive and 7 negative levels, an exact zero, ends at -1 and +1, sorted."""
    code = nf4.nf4_code_from_normal()
    assert (code > 0).sum() == 8 and (code < 0).sum() == 7 and (code == 0).sum() == 1
    assert code[0] == -1.0 and code[-1] == 1.0
    assert torch.all(code[1:] > code[:-1])


def test_nf4_code_depends_on_offset():
    """The check can fail: another outer quantile gives other levels."""
    assert (nf4.nf4_code_from_normal(offset=0.99) - nf4.NF4_CODE).abs().max() > 1e-3


def test_dynamic_code_is_bitsandbytes_signed_dynamic_map():
    bnb = reference("bitsandbytes")
    assert torch.equal(nf4.dynamic_code(), bnb.functional.create_dynamic_map(signed=True))


def test_dynamic_code_structure():
    code = nf4.dynamic_code()
    assert code.shape == (256,) and torch.all(code[1:] > code[:-1])
    assert code.max() == 1.0 and (code == 0).sum() == 1 and (code > 0).sum() == 128 and (code < 0).sum() == 127
